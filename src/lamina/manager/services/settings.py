"""Installation settings kept in the database (shared by every manager)."""

from __future__ import annotations

import secrets

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lamina.manager.models import Setting

ADMIN_TOKEN = "admin_token"


def get(session: Session, key: str) -> str | None:
    row = session.get(Setting, key)
    return row.value if row else None


def admin_token(session: Session) -> str:
    """The admin token, created on first use (managers racing to create it agree)."""
    token = get(session, ADMIN_TOKEN)
    if token is not None:
        return token
    try:
        with session.begin_nested():
            session.add(Setting(key=ADMIN_TOKEN, value=secrets.token_urlsafe(32)))
    except IntegrityError:
        pass
    token = get(session, ADMIN_TOKEN)
    assert token is not None
    return token
