"""The agent API (machine tokens) and layer-data uploads.

    POST /api/v1/agent/boot                  identity, image version, mode
    POST /api/v1/agent/login   {"user": U}   layers to attach (first wins) + writable layer
    POST /api/v1/agent/logout  {"user": U, "writable": {...}}   ends the session, saves
    GET  /api/v1/agent/desired?wait=30       long-poll (``rev`` or If-None-Match: the rev
                                             the agent has; returns when it changes)
    POST /api/v1/chunks/missing {"ids": []}  which of these chunks the manager lacks
    POST /api/v1/chunks                      chunk envelopes: (32-byte id, u32 length,
                                             envelope)*, each checked against its id

The four agent calls are async and do their database work in one transaction through
``HotDb`` (token lookup included), and answer with orjson-encoded bytes.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response, status
from sqlalchemy import Connection

from lamina.errors import CorruptObject
from lamina.manager.deps import CallerDep, HomeDep
from lamina.manager.hot import Batcher, HotDb, Watcher
from lamina.manager.schemas import (
    BootResult,
    Desired,
    LoginRequest,
    LogoutRequest,
    LogoutResult,
    Missing,
    SessionState,
)
from lamina.manager.services import agents, settings
from lamina.store import codec

router = APIRouter(prefix="/api/v1", tags=["agent"])
_RECORD = struct.Struct(">32sI")
MAX_UPLOAD = 256 << 20


class Hot:
    """Per-app database executor and change watcher (created on first use)."""

    def __init__(self, db: HotDb) -> None:
        self.db = db
        self.watcher = Watcher(db)
        self.batcher = Batcher(db)


def hot(request: Request) -> Hot:
    state = request.app.state
    found: Hot | None = getattr(state, "hot", None)
    if found is None:
        found = state.hot = Hot(HotDb(state.home.sessionmaker.kw["bind"]))
    return found


def _token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing bearer token", {"WWW-Authenticate": "Bearer"}
        )
    return token.strip()


def _machine(conn: Connection, token: str) -> agents.AgentMachine:
    machine = agents.by_token(conn, token)
    if machine is not None:
        return machine
    from sqlalchemy.orm import Session

    with Session(bind=conn) as orm:
        admin = settings.get(orm, settings.ADMIN_TOKEN)
    if admin is not None and admin == token:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "machine token required")
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED, "invalid token", {"WWW-Authenticate": "Bearer"}
    )


def _json(data: Any) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")


AUTH: dict[int | str, dict[str, Any]] = {401: {}, 403: {}}


@router.post("/agent/boot", response_model=BootResult, responses=AUTH)
async def boot(request: Request) -> Response:
    token = _token(request)

    def run(conn: Connection) -> dict[str, Any]:
        return agents.boot(conn, machine=_machine(conn, token))

    return _json(await hot(request).db.run(run))


@router.post(
    "/agent/login", response_model=SessionState, responses={**AUTH, 404: {}, 409: {}, 422: {}}
)
async def login(request: Request, body: LoginRequest) -> Response:
    token = _token(request)

    def run(conn: Connection) -> dict[str, Any]:
        return agents.login(conn, machine=_machine(conn, token), user=body.user)

    return _json(await hot(request).db.run(run))


@router.post(
    "/agent/logout", response_model=LogoutResult, responses={**AUTH, 404: {}, 409: {}, 422: {}}
)
async def logout(request: Request, body: LogoutRequest) -> Response:
    token = _token(request)
    saved = body.writable.model_dump() if body.writable is not None else None
    store = request.app.state.home.store

    def run(conn: Connection) -> dict[str, Any]:
        machine = _machine(conn, token)
        return agents.logout(conn, store=store, machine=machine, user=body.user, saved=saved)

    return _json(await hot(request).db.run(run))


@router.get("/agent/desired", response_model=Desired, responses=AUTH)
async def desired(
    request: Request,
    wait: Annotated[float, Query(ge=0, le=60)] = 0,
    rev: Annotated[str | None, Query(max_length=64)] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The machine's desired state; with ``wait`` and the rev the agent has (``rev`` or
    If-None-Match), answers when it differs or after ``wait`` seconds, whichever first."""
    token = _token(request)
    h = hot(request)
    machine = await h.db.run(_machine, token)
    have = rev or (if_none_match.strip().strip('"') if if_none_match else None)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        # Registered before reading: a change committed after the read wakes this waiter.
        fut = h.watcher.register(machine.id)
        try:
            state = await h.batcher.desired(machine)
            remaining = deadline - loop.time()
            if have is None or state["rev"] != have or remaining <= 0:
                break
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                break
        finally:
            h.watcher.unregister(machine.id, fut)
    response = _json(state)
    response.headers["ETag"] = f'"{state["rev"]}"'
    return response


# -- uploads ----------------------------------------------------------------------------------


@router.post("/chunks/missing", response_model=Missing, tags=["data"], responses=AUTH)
def missing(body: Missing, caller: CallerDep, home: HomeDep) -> Missing:
    """Of these chunk ids, the ones the manager does not have (upload only those)."""
    return Missing(ids=[c for c in body.ids if not home.store.has(bytes.fromhex(c))])


@router.post(
    "/chunks",
    tags=["data"],
    responses={**AUTH, 413: {}, 422: {}},
    openapi_extra={
        "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string"}}}}
    },
)
def upload(
    caller: CallerDep,
    home: HomeDep,
    data: Annotated[bytes, Body(media_type="application/octet-stream")] = b"",
) -> dict[str, int]:
    """Store chunk envelopes (each verified against its id before anything is kept)."""
    if len(data) > MAX_UPLOAD:
        raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, "upload at most 256 MiB")
    records: list[tuple[bytes, memoryview]] = []
    view, pos = memoryview(data), 0
    try:
        while pos < len(view):
            cid, size = _RECORD.unpack_from(view, pos)
            pos += _RECORD.size
            envelope = view[pos : pos + size]
            if len(envelope) != size:
                raise CorruptObject("truncated upload")
            pos += size
            codec.decode(envelope, expected=cid)
            records.append((cid, envelope))
    except (struct.error, CorruptObject) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"bad upload: {exc}") from None
    stored = added = 0
    with home.store.writer() as writer:
        for cid, envelope in records:
            if not writer.has(cid):
                added += writer.put_envelope(cid, envelope).stored
                stored += 1
    return {"received": len(records), "stored": stored, "bytes": added}
