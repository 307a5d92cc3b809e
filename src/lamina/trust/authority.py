"""The home's certificate authority: one CA key, the server certificate, client credentials.

Files, in ``HOME/tls`` (qemu's names, so the folder works as a qemu-nbd server ``dir=``):

    ca-cert.pem       the CA certificate (what clients are given to check the server)
    ca-key.pem        the CA key (0600; never leaves the home)
    server-cert.pem   the server certificate: every name and address the server answers on
    server-key.pem    its key (0600)

Client credentials are issued to a folder of their own with qemu's client names
(``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``); their keys are not kept here,
only their serial numbers (in the database, by the caller).

Keys are ECDSA P-256: what gnutls (qemu, libnbd) and OpenSSL all take, and fast to make.
Leaf certificates carry both digitalSignature and keyEncipherment key usages because
qemu up to 10.0 refuses a certificate without the latter (whatever its key type).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lamina.errors import InvalidInput
from lamina.files import write_atomic
from lamina.trust.files import (
    CA_CERT,
    CA_KEY,
    CLIENT_CERT,
    CLIENT_KEY,
    SERVER_CERT,
    SERVER_KEY,
)
from lamina.trust.principal import ORGANIZATION

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "Authority",
    "Issued",
]


CA_DAYS = 3650
SERVER_DAYS = 365
CLIENT_DAYS = 365
# A server certificate this close to its end is replaced at the next start.
RENEW_BEFORE = dt.timedelta(days=30)
# Certificates start a little in the past: a client whose clock runs behind the server's
# would otherwise refuse a certificate issued a second ago.
BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM."""

    cert_pem: bytes
    key_pem: bytes
    serial: int
    not_after: dt.datetime

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(unit: str, common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def san_entries(names: Iterable[str]) -> list[x509.GeneralName]:
    """subjectAltName entries: IP addresses as IPAddress (qemu and OpenSSL match an
    address only against those), everything else as a DNS name."""
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


class Authority:
    """The CA of one home (``Authority.open(home.tls_dir)``)."""

    def __init__(self, directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
        self.directory = directory
        self.cert = cert
        self.key = key

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def open(cls, directory: Path) -> Authority:
        """The CA kept in ``directory``, created on first use. Two processes creating it
        at once agree: the files appear together by one rename, and the loser reads the
        winner's."""
        if not (directory / CA_CERT).exists():
            _create(directory)
        try:
            cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
            key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        except (ValueError, OSError) as exc:
            raise InvalidInput(
                f"{directory}: the certificate authority is unreadable: {exc}"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidInput(f"{directory / CA_KEY}: not an EC key")
        return cls(directory, cert, key)

    def _sign(
        self,
        builder: x509.CertificateBuilder,
        key: ec.EllipticCurvePrivateKey,
        purpose: x509.ObjectIdentifier,
        not_before: dt.datetime,
        not_after: dt.datetime,
    ) -> Issued:
        serial = x509.random_serial_number()
        cert = (
            builder.issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return Issued(
            cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), serial, not_after
        )

    def issue_client(
        self,
        unit: str,
        name: str,
        *,
        days: int = CLIENT_DAYS,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Issued:
        """A client certificate for ``OU=unit, CN=name`` (``machine``/NAME, ``admin``)."""
        end = not_after or now() + dt.timedelta(days=days)
        start = not_before or min(now() - BACKDATE, end - dt.timedelta(days=1))
        builder = x509.CertificateBuilder().subject_name(_name(unit, name))
        return self._sign(builder, _new_key(), ExtendedKeyUsageOID.CLIENT_AUTH, start, end)

    def issue_server(self, names: Iterable[str], *, days: int = SERVER_DAYS) -> Issued:
        listed = list(dict.fromkeys(names))
        if not listed:
            raise InvalidInput("a server certificate needs at least one name")
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name("server", listed[0]))
            .add_extension(x509.SubjectAlternativeName(san_entries(listed)), critical=False)
        )
        end = now() + dt.timedelta(days=days)
        return self._sign(
            builder, _new_key(), ExtendedKeyUsageOID.SERVER_AUTH, now() - BACKDATE, end
        )

    def server_certificate(self, names: Iterable[str]) -> tuple[Path, Path]:
        """The paths of a server certificate and key naming every one of ``names``,
        issued anew when the one kept does not (or is near its end, or is another CA's)."""
        wanted = list(dict.fromkeys(names))
        cert_path, key_path = self.directory / SERVER_CERT, self.directory / SERVER_KEY
        if not _covers(self, cert_path, key_path, wanted):
            issued = self.issue_server(wanted)
            write_atomic(key_path, issued.key_pem, mode=0o600)
            write_atomic(cert_path, issued.cert_pem, mode=0o644)
        return cert_path, key_path


_LEAF_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def load_copy(source: Path) -> tuple[bytes, bytes]:
    """The CA certificate and key in ``source`` (a copy of another home's ``tls`` folder,
    or a folder with just those two files), checked: a CA certificate, the key that is
    its own, and a key file no one but its owner may read (ssh's rule for private keys)."""
    cert_path, key_path = source / CA_CERT, source / CA_KEY
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        mode = key_path.stat().st_mode
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, OSError) as exc:
        raise InvalidInput(f"{source}: no certificate authority to take: {exc}") from None
    if mode & 0o077:
        raise InvalidInput(
            f"{key_path} may be read by other users (mode {mode & 0o777:o}): chmod 600 it"
        )
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise InvalidInput(f"{cert_path} is not a certificate authority's certificate")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise InvalidInput(f"{key_path} is not the key of {cert_path}")
    return cert_pem, key_pem


def install(directory: Path, cert_pem: bytes, key_pem: bytes) -> bool:
    """Make ``directory`` hold this CA (from ``load_copy``); False when it held it
    already. A folder holding another CA is refused: its credentials would stop working."""
    if (directory / CA_CERT).exists():
        held = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        if held == x509.load_pem_x509_certificate(cert_pem):
            return False
        raise InvalidInput(
            f"{directory} holds another certificate authority: the credentials it issued"
            " would no longer open anything; move it away first"
        )
    _place(directory, cert_pem, key_pem)
    return True


def _create(directory: Path) -> None:
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, f"lamina CA {os.urandom(4).hex()}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - BACKDATE)
        .not_valid_after(now() + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _place(directory, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _place(directory: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """The two files appear together by one rename of a private staging folder."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tls-", dir=directory.parent))
    os.chmod(staging, 0o700)
    write_atomic(staging / CA_KEY, key_pem, mode=0o600)
    write_atomic(staging / CA_CERT, cert_pem, mode=0o644)
    try:
        os.rename(staging, directory)  # fails when the folder exists (another process won)
    except OSError:
        for item in staging.iterdir():
            item.unlink()
        staging.rmdir()
        if not (directory / CA_CERT).exists():
            raise InvalidInput(
                f"{directory} exists but holds no {CA_CERT}: move it away to start a new CA"
            ) from None


def _covers(ca: Authority, cert_path: Path, key_path: Path, names: list[str]) -> bool:
    if not cert_path.exists() or not key_path.exists():
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    if cert.issuer != ca.cert.subject or cert.not_valid_after_utc - now() < RENEW_BEFORE:
        return False
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return set(san_entries(names)) <= set(sans)
