"""FastAPI dependencies: the home, a database session per request, who is calling.

Tokens travel as ``Authorization: Bearer <token>``: the admin token opens the admin API,
a machine's token opens only that machine's part of the agent and data APIs.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session

from lamina.home import Home
from lamina.manager.models import Machine
from lamina.manager.services import machines, settings


def get_home(request: Request) -> Home:
    home: Home = request.app.state.home
    return home


HomeDep = Annotated[Home, Depends(get_home)]


def get_session(home: HomeDep) -> Iterator[Session]:
    with home.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_read_session(home: HomeDep) -> Iterator[Session]:
    """A session that only reads: on SQLite it never holds the write lock, so a request
    that streams chunks for seconds does not hold up logins."""
    with home.session(read_only=True) as session:
        yield session


ReadSessionDep = Annotated[Session, Depends(get_read_session)]


@dataclass(frozen=True, slots=True)
class Caller:
    admin: bool
    machine: Machine | None = None


def bearer(request: Request) -> str:
    """The request's bearer token (401 without one)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing bearer token", {"WWW-Authenticate": "Bearer"}
        )
    return token.strip()


def get_caller(request: Request, session: ReadSessionDep) -> Caller:
    token = bearer(request)
    admin = settings.get(session, settings.ADMIN_TOKEN)  # none yet: nobody can hold it
    if admin is not None and hmac.compare_digest(token, admin):
        return Caller(admin=True)
    machine = machines.by_token(session, token)
    if machine is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "invalid token", {"WWW-Authenticate": "Bearer"}
        )
    return Caller(admin=False, machine=machine)


CallerDep = Annotated[Caller, Depends(get_caller)]


def require_admin(caller: CallerDep) -> Caller:
    if not caller.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin token required")
    return caller


def require_machine(caller: CallerDep) -> Machine:
    if caller.machine is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "machine token required")
    return caller.machine


AdminDep = Annotated[Caller, Depends(require_admin)]
MachineDep = Annotated[Machine, Depends(require_machine)]
ReaderDep = AdminDep  # routes that only read the admin API
