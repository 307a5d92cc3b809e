"""One certificate authority for every folder of a home: the block servers of a cluster.

A machine credential is checked by the TLS handshake against the CA in the serving home's
``tls`` folder. The folders of one home on several hosts (``lamina init --join``) must
therefore hold the same CA, or a credential issued on one is refused by the others. The
CA's *certificate* is recorded in the shared database (``settings``, key
``tls_ca_cert``) by the first folder that makes or takes one; its *key* never enters the
database (whoever reads the database would mint credentials): the admin copies it once,
by hand, and ``lamina init --join --ca DIR`` (or ``lamina init --ca DIR`` on a folder
made before) takes it.

A folder whose CA is not the recorded one, or that has none while one is recorded,
refuses to issue credentials or serve TLS, saying how to take the right one. A home on
SQLite is alone with its database and keeps its CA to itself, as before.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy.exc import IntegrityError

from lamina.errors import InvalidInput
from lamina.manager.models import Setting
from lamina.trust.authority import CA_CERT, Authority, install, load_copy

if TYPE_CHECKING:
    from lamina.home import Home

CA_SETTING = "tls_ca_cert"


def shared(home: Home) -> bool:
    """Whether other folders may share this home's database (PostgreSQL)."""
    return not home.database_url.startswith("sqlite")


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate (DER): the same CA whatever its PEM's line endings."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def same(a: bytes, b: bytes) -> bool:
    return fingerprint(a) == fingerprint(b)


def describe(cert_pem: bytes) -> str:
    """``lamina CA 1a2b3c4d (sha256 0f1e...)``: which CA, for people."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    common = str(names[0].value) if names else cert.subject.rfc4514_string()
    return f"{common} (sha256 {fingerprint(cert_pem)[:16]})"


def recorded(home: Home) -> bytes | None:
    """The CA certificate the home's folders share, as recorded in the database."""
    with home.session(read_only=True) as session:
        row = session.get(Setting, CA_SETTING)
        return row.value.encode() if row is not None else None


def _record(home: Home, cert_pem: bytes) -> bytes:
    """Record ``cert_pem`` unless one is recorded already; the recorded one."""
    try:
        with home.session() as session:
            if session.get(Setting, CA_SETTING) is None:
                session.add(Setting(key=CA_SETTING, value=cert_pem.decode()))
                return cert_pem
    except IntegrityError:  # another folder recorded its own at the same moment
        pass
    found = recorded(home)
    assert found is not None
    return found


def _how_to_take(home: Home, wanted: bytes) -> str:
    return (
        f"this home's folders share the certificate authority {describe(wanted)}: copy"
        f" {CA_CERT} and ca-key.pem from the tls folder of a home that has it (mode 600)"
        f" and run `lamina init --ca DIR --home {home.root}`"
    )


def authority(home: Home) -> Authority:
    """The home's CA (made on first use), checked against the one its folders share: the
    CA that issues credentials and server certificates on this folder."""
    if not shared(home):
        return Authority.open(home.tls_dir)
    wanted = recorded(home)
    if wanted is not None and not (home.tls_dir / CA_CERT).exists():
        raise InvalidInput(
            f"{home.tls_dir} holds no certificate authority, and " + _how_to_take(home, wanted)
        )
    ca = Authority.open(home.tls_dir)
    if wanted is None:
        wanted = _record(home, ca.cert_pem)
    if not same(wanted, ca.cert_pem):
        raise InvalidInput(
            f"{home.tls_dir} holds the certificate authority {describe(ca.cert_pem)}, but "
            + _how_to_take(home, wanted)
        )
    return ca


def take(home: Home, source: Path) -> bool:
    """Install the CA copied into ``source`` in this folder (``lamina init --ca``): it
    must be the one the home's folders share, if one is recorded; recorded otherwise.
    False when the folder held it already."""
    cert_pem, key_pem = load_copy(source)
    wanted = recorded(home) if shared(home) else None
    if wanted is not None and not same(wanted, cert_pem):
        raise InvalidInput(
            f"{source} holds the certificate authority {describe(cert_pem)}, not the one"
            f" this home's folders share: {describe(wanted)}"
        )
    placed = install(home.tls_dir, cert_pem, key_pem)
    if shared(home) and wanted is None:
        _record(home, cert_pem)
    return placed
