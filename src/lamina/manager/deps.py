"""FastAPI dependencies: the home, a database session per request, who is calling.

Tokens travel as ``Authorization: Bearer <token>``: an admin account's token opens the
admin API (a helpdesk account's, its reading routes only), a machine's token opens only
that machine's part of the agent and data APIs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session

from lamina import logs
from lamina.home import Home
from lamina.logs import event as log_event
from lamina.manager.models import Machine
from lamina.manager.services import accounts, machines
from lamina.manager.services.audit import Actor


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
    admin: bool  # an admin account of any role (what it may change: ``role``)
    machine: Machine | None = None
    account: str = ""
    role: str = ""
    address: str = ""

    def actor(self, via: str = "api") -> Actor:
        return Actor(self.account, via, self.address, self.role)


def client_address(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


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
    account = accounts.by_token(session, token)
    if account is not None:
        return Caller(True, None, account.name, account.role, client_address(request))
    machine = machines.by_token(session, token)
    if machine is None:
        log_event(
            logging.getLogger(logs.LOGGER),
            "refused",
            logging.WARNING,
            address=client_address(request),
            method=request.method,
            path=request.url.path,
            reason="invalid token",
        )
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "invalid token", {"WWW-Authenticate": "Bearer"}
        )
    return Caller(admin=False, machine=machine)


CallerDep = Annotated[Caller, Depends(get_caller)]


READING = frozenset({"GET", "HEAD", "OPTIONS"})


def require_reader(caller: CallerDep) -> Caller:
    """Any admin account (helpdesk included): for routes that only read."""
    if not caller.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin token required")
    return caller


def require_admin(request: Request, caller: CallerDep) -> Caller:
    """An admin account; a helpdesk account only on a route that reads."""
    require_reader(caller)
    if caller.role != "admin" and request.method not in READING:
        log_event(
            logging.getLogger(logs.LOGGER),
            "refused",
            logging.WARNING,
            account=caller.account,
            role=caller.role,
            address=caller.address,
            method=request.method,
            path=request.url.path,
        )
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"account {caller.account!r} ({caller.role}) is read-only"
        )
    return caller


def require_machine(caller: CallerDep) -> Machine:
    if caller.machine is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "machine token required")
    return caller.machine


AdminDep = Annotated[Caller, Depends(require_admin)]
MachineDep = Annotated[Machine, Depends(require_machine)]
ReaderDep = Annotated[Caller, Depends(require_reader)]
