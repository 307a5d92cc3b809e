"""Who a TLS client is, from the certificate it showed (pure: no database, no files).

A lamina client certificate names its holder in its subject: ``O=lamina, OU=machine,
CN=NAME`` for a machine, ``O=lamina, OU=admin, CN=admin`` for an administrator. Whether
that certificate is still good (not rotated away, its machine not removed) is decided
against the database by the caller (``manager.services.credentials``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509

ORGANIZATION = "lamina"  # the subject's O of every certificate the home's CA issues
ADMIN_NAME = "admin"


class Kind(StrEnum):
    ADMIN = "admin"  # opens every export
    MACHINE = "machine"  # opens its own disk, seed and pinned image version
    NOBODY = "nobody"  # no certificate, or one that is no longer good: opens nothing


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Kind
    name: str = ""
    reason: str = ""  # for NOBODY: what to tell the client

    def __str__(self) -> str:
        if self.kind is Kind.MACHINE:
            return f"machine {self.name}"
        return "admin" if self.kind is Kind.ADMIN else "a client without a credential"


@dataclass(frozen=True, slots=True)
class Presented:
    """What a verified client certificate claims."""

    unit: str
    name: str
    serial: int


NO_CERTIFICATE = Principal(
    Kind.NOBODY,
    reason="this server requires a client certificate"
    " (lamina machine credentials NAME --out DIR, or lamina admin credentials)",
)


def presented(der: bytes | None) -> Presented | None:
    """The holder a verified certificate names (None without a certificate, or for one
    that is not a lamina client certificate)."""
    if not der:
        return None
    # (imported here: only a TLS server reads certificates; cryptography's X.509 code is
    # about 7 MiB of an NBD worker process)
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)

    def one(oid: x509.ObjectIdentifier) -> str | None:
        values = cert.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if len(values) == 1 else None

    org, unit, name = (
        one(NameOID.ORGANIZATION_NAME),
        one(NameOID.ORGANIZATIONAL_UNIT_NAME),
        one(NameOID.COMMON_NAME),
    )
    if org != ORGANIZATION or unit not in (Kind.ADMIN, Kind.MACHINE) or not name:
        return None
    return Presented(unit, name, cert.serial_number)


def serial_text(serial: int) -> str:
    """How serial numbers are kept in the database: lower-case hex."""
    return format(serial, "x")
