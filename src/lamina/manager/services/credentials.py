"""TLS client credentials: issue (and rotate) them, and tell at a handshake whom a
certificate stands for. The CA signs; the database remembers every serial it signed, so
a certificate the database does not hold as good is refused even though it verifies."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from lamina.errors import UsageError
from lamina.manager.models import Credential, Machine
from lamina.manager.services import audit, machines
from lamina.trust.authority import CLIENT_DAYS, Authority, Issued
from lamina.trust.principal import (
    ADMIN_NAME,
    NO_CERTIFICATE,
    Kind,
    Presented,
    Principal,
    serial_text,
)
from lamina.units import timestamp


def issue(
    session: Session,
    authority: Authority,
    kind: Kind,
    name: str = ADMIN_NAME,
    *,
    days: int = CLIENT_DAYS,
    rotate: bool = False,
    not_after: datetime | None = None,
) -> Issued:
    """A new client credential for machine ``name`` (or the admin); ``rotate`` revokes
    every earlier one of the same holder."""
    if days < 1:
        raise UsageError("--days must be at least 1")
    holder_id = ""
    if kind is Kind.MACHINE:
        holder_id = machines.get(session, name).machine_id
    elif kind is Kind.ADMIN:
        name = ADMIN_NAME
    else:
        raise UsageError(f"no credentials are issued to {kind}")
    if rotate:
        revoke(session, kind, name)
    issued = authority.issue_client(kind.value, name, days=days, not_after=not_after)
    session.add(
        Credential(
            serial=serial_text(issued.serial),
            kind=kind.value,
            name=name,
            holder_id=holder_id,
            expires_at=issued.not_after,
        )
    )
    session.flush()
    audit.record(
        session,
        "credential.issue",
        f"{kind.value} {name}",
        serial=serial_text(issued.serial),
        rotate=rotate,
        days=days,
    )
    return issued


def revoke(session: Session, kind: Kind, name: str) -> int:
    """Revoke every good credential of a holder; returns how many."""
    result = session.execute(
        update(Credential)
        .where(
            Credential.kind == kind.value,
            Credential.name == name,
            Credential.revoked_at.is_(None),
        )
        .values(revoked_at=datetime.now(UTC))
    )
    revoked = int(result.rowcount)  # type: ignore[attr-defined]
    if revoked:
        audit.record(session, "credential.revoke", f"{kind.value} {name}", revoked=revoked)
    return revoked


def principal_of(session: Session, shown: Presented | None) -> Principal:
    """Whom a verified client certificate stands for, as the database has it now."""
    if shown is None:
        return NO_CERTIFICATE
    row = session.get(Credential, serial_text(shown.serial))
    if row is None or row.kind != shown.unit or row.name != shown.name:
        return Principal(Kind.NOBODY, reason="this credential is unknown to this server")
    if row.revoked_at is not None:
        when = timestamp(row.revoked_at)
        return Principal(Kind.NOBODY, reason=f"this credential was revoked ({when}, rotated)")
    if _aware(row.expires_at) <= datetime.now(UTC):
        return Principal(Kind.NOBODY, reason="this credential has expired")
    if row.kind == Kind.MACHINE:
        machine = session.scalars(select(Machine).where(Machine.name == row.name)).one_or_none()
        if machine is None or machine.machine_id != row.holder_id:
            return Principal(
                Kind.NOBODY, reason=f"machine {row.name} of this credential no longer exists"
            )
        return Principal(Kind.MACHINE, row.name)
    return Principal(Kind.ADMIN, row.name)


def _aware(when: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored as UTC)."""
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
