"""Installation settings kept in the database (shared by every manager)."""

from __future__ import annotations

import secrets

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lamina.manager.models import Setting

ADMIN_TOKEN = "admin_token"
# The key machine agent tokens are derived from, so a machine's seed can carry its token
# while the database keeps only the token's hash next to the machine.
TOKEN_KEY = "agent_token_key"
# The manager's URL as machines reach it, written into their seeds (``serve --agent-url``).
AGENT_URL = "agent_url"


def get(session: Session, key: str) -> str | None:
    row = session.get(Setting, key)
    return row.value if row else None


def put(session: Session, key: str, value: str | None) -> None:
    row = session.get(Setting, key)
    if value is None:
        if row is not None:
            session.delete(row)
    elif row is None:
        session.add(Setting(key=key, value=value))
    else:
        row.value = value
    session.flush()


def secret(session: Session, key: str) -> str:
    """A random secret, created on first use (managers racing to create it agree)."""
    value = get(session, key)
    if value is not None:
        return value
    try:
        with session.begin_nested():
            session.add(Setting(key=key, value=secrets.token_urlsafe(32)))
    except IntegrityError:
        pass
    value = get(session, key)
    assert value is not None
    return value


def admin_token(session: Session) -> str:
    """The admin token, created on first use."""
    return secret(session, ADMIN_TOKEN)


def rotate_admin_token(session: Session) -> str:
    """A new admin token: the old one is refused from now on."""
    value = secrets.token_urlsafe(32)
    put(session, ADMIN_TOKEN, value)
    return value
