"""Named admin accounts: a role each, a token each (shown once, kept as its SHA-256).

``admin`` may do everything; ``helpdesk`` may read what the admin API and the console
show, and change nothing. The built-in account ``admin`` is the installation's first
token (``lamina admin token``, kept in settings); it cannot be removed.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from lamina.errors import AlreadyExists, InvalidInput, NotFound
from lamina.manager.models import AdminAccount
from lamina.manager.services import audit, settings
from lamina.manager.services.machines import hash_token
from lamina.names import check_name

ROLES = ("admin", "helpdesk")
BUILT_IN = "admin"


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    role: str
    built_in: bool = False


def _role(role: str) -> str:
    if role not in ROLES:
        raise InvalidInput(f"bad role {role!r}: expected one of {', '.join(ROLES)}")
    return role


def add(session: Session, *, name: str, role: str) -> tuple[Account, str]:
    """A new account and its token (the only time the token is shown)."""
    check_name(name, "account name")
    _role(role)
    if (
        name == BUILT_IN
        or session.scalars(select(AdminAccount).where(AdminAccount.name == name)).first()
    ):
        raise AlreadyExists(f"account {name!r} already exists")
    token = secrets.token_urlsafe(32)
    session.add(AdminAccount(name=name, role=role, token_hash=hash_token(token)))
    audit.record(session, "account.add", name, role=role)
    return Account(name, role), token


def _get(session: Session, name: str) -> AdminAccount:
    row = session.scalars(select(AdminAccount).where(AdminAccount.name == name)).first()
    if row is None:
        raise NotFound(f"no account {name!r}")
    return row


def list_all(session: Session) -> list[Account]:
    rows = session.scalars(select(AdminAccount).order_by(AdminAccount.name))
    return [Account(BUILT_IN, "admin", built_in=True), *(Account(r.name, r.role) for r in rows)]


def remove(session: Session, *, name: str) -> None:
    if name == BUILT_IN:
        raise InvalidInput("the built-in account 'admin' cannot be removed")
    session.delete(_get(session, name))
    audit.record(session, "account.remove", name)


def new_token(session: Session, *, name: str) -> str:
    """A new token for ``name``; its previous one stops working at once."""
    if name == BUILT_IN:
        token = settings.rotate_admin_token(session)
    else:
        token = secrets.token_urlsafe(32)
        _get(session, name).token_hash = hash_token(token)
    audit.record(session, "account.token", name)
    return token


def by_token(session: Session, token: str) -> Account | None:
    """The account a bearer token stands for, or None."""
    first = settings.get(session, settings.ADMIN_TOKEN)  # none yet: nobody can hold it
    if first is not None and hmac.compare_digest(token.encode(), first.encode()):
        return Account(BUILT_IN, "admin", built_in=True)
    row = session.scalars(
        select(AdminAccount).where(AdminAccount.token_hash == hash_token(token))
    ).first()
    return Account(row.name, row.role) if row is not None else None
