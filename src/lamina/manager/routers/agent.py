"""The agent API (machine tokens) and layer-data uploads.

    POST /api/v1/agent/boot                  identity, image version, mode
    POST /api/v1/agent/login   {"user": U}   layers to attach (first wins) + writable layer
    POST /api/v1/agent/logout  {"user": U, "writable": {...}}   ends the session, saves
    GET  /api/v1/agent/desired?wait=30       long-poll (``rev`` or If-None-Match: the rev
                                             the agent has; returns when it changes)
    POST /api/v1/chunks/missing {"ids": []}  which of these chunks to upload: those the
                                             manager lacks, and for a machine those it
                                             may not read (it proves it has them by
                                             sending them)
    POST /api/v1/chunks                      chunk envelopes: (32-byte id, u32 length,
                                             envelope)*, each checked against its id

Uploads come from agents handing over a writable layer's new version: file chunks (at most
``CDC_MAX``, 4 MiB, of plaintext) and the version's tree manifest (one object, about
150 bytes per file). A body is read with a running limit of 256 MiB (413 as soon as it is
passed, or at once when Content-Length says so); a record may claim at most 4 MiB of
plaintext, or 256 MiB when it is a tree manifest (a layer of about 1.7 million files)
that does not claim more than ``MAX_RATIO`` times its compressed size, so no record makes
the manager decompress more than that (413 otherwise). A machine's uploads count against
its quota until a layer version it saves holds them (``services.staged``, 413 past it).

The four agent calls are async and do their database work in one transaction through
``AgentDb`` (token lookup included), and answer with orjson-encoded bytes.
"""

from __future__ import annotations

import asyncio
import hmac
import struct
from typing import Annotated, Any

import orjson
import zstandard
from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Connection

from lamina.errors import CorruptObject, InvalidInput
from lamina.home import Home
from lamina.layer import tree
from lamina.manager.agent_db import AgentDb, Batcher, Watcher
from lamina.manager.deps import Caller, CallerDep, HomeDep, ReadSessionDep, bearer
from lamina.manager.schemas import (
    BootResult,
    Desired,
    LoginRequest,
    LogoutRequest,
    LogoutResult,
    Missing,
    SessionState,
)
from lamina.manager.services import agents, settings, staged
from lamina.manager.services.readable import Readable
from lamina.store import chunker, codec

router = APIRouter(prefix="/api/v1", tags=["agent"])
_RECORD = struct.Struct(">32sI")
MAX_UPLOAD = 256 << 20
# Plaintext a record may claim: the largest chunk of file data, or a tree manifest.
MAX_CHUNK = chunker.CDC_MAX
MAX_MANIFEST = 256 << 20
# Plaintext a manifest record over MAX_CHUNK may claim per byte of payload. Tree manifests
# are mostly chunk ids and names, which zstd shrinks 3-6x; a record of zeros claiming
# 256 MiB in 332 KB (800x) cost 4.5 s of a core and 320 MB to unpack, six at once 27 s.
MAX_RATIO = 32


class Hot:
    """Per-app database executor and change watcher (created on first use)."""

    def __init__(self, db: AgentDb) -> None:
        self.db = db
        self.watcher = Watcher(db)
        self.batcher = Batcher(db)


def hot(request: Request) -> Hot:
    state = request.app.state
    found: Hot | None = getattr(state, "hot", None)
    if found is None:
        found = state.hot = Hot(AgentDb(state.home.sessionmaker.kw["bind"]))
    return found


def _machine(conn: Connection, token: str) -> agents.AgentMachine:
    machine = agents.by_token(conn, token)
    if machine is not None:
        return machine
    from sqlalchemy.orm import Session

    with Session(bind=conn) as orm:
        admin = settings.get(orm, settings.ADMIN_TOKEN)
    if admin is not None and hmac.compare_digest(admin, token):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "machine token required")
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED, "invalid token", {"WWW-Authenticate": "Bearer"}
    )


def _json(data: Any) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")


AUTH: dict[int | str, dict[str, Any]] = {401: {}, 403: {}}


@router.post("/agent/boot", response_model=BootResult, responses=AUTH)
async def boot(request: Request) -> Response:
    token = bearer(request)

    def run(conn: Connection) -> dict[str, Any]:
        return agents.boot(conn, machine=_machine(conn, token))

    return _json(await hot(request).db.run(run))


@router.post(
    "/agent/login", response_model=SessionState, responses={**AUTH, 404: {}, 409: {}, 422: {}}
)
async def login(request: Request, body: LoginRequest) -> Response:
    token = bearer(request)

    def run(conn: Connection) -> dict[str, Any]:
        return agents.login(conn, machine=_machine(conn, token), user=body.user)

    return _json(await hot(request).db.run(run))


@router.post(
    "/agent/logout", response_model=LogoutResult, responses={**AUTH, 404: {}, 409: {}, 422: {}}
)
async def logout(request: Request, body: LogoutRequest) -> Response:
    token = bearer(request)
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
    token = bearer(request)
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
def missing(body: Missing, caller: CallerDep, home: HomeDep, session: ReadSessionDep) -> Missing:
    """Of these chunk ids, the ones to upload: those the manager does not have, and for a
    machine also those it may not read and did not upload: whether the store holds a
    chunk is told only to who may read it."""
    ids = [bytes.fromhex(c) for c in body.ids]
    have = [c for c in ids if home.store.has(c)]
    machine = caller.machine
    if machine is not None and have:
        conn = session.connection()
        mine = staged.held(conn, machine.id, have)
        may = Readable(
            home.store,
            machine.image_version.manifest_id,
            lambda: agents.allowed_manifests(conn, machine_id=machine.id),
        )
        have = [c for c in have if c in mine or may.allows(c)]
    kept = set(have)
    return Missing(ids=[c.hex() for c in ids if c not in kept])


@router.post(
    "/chunks",
    tags=["data"],
    responses={**AUTH, 413: {}, 422: {}},
    openapi_extra={
        "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string"}}}}
    },
)
async def upload(request: Request, caller: CallerDep, home: HomeDep) -> dict[str, int]:
    """Store chunk envelopes (each verified against its id before anything is kept)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_UPLOAD:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, "upload at most 256 MiB")
    # Read with a running limit: a body that never says its length (chunked) or lies about
    # it must not be taken whole into memory before it is found too large.
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > MAX_UPLOAD:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, "upload at most 256 MiB")
    return await run_in_threadpool(_store_records, home, memoryview(data), caller)


def _store_records(home: Home, view: memoryview, caller: Caller) -> dict[str, int]:
    records = _checked_records(view)
    machine = caller.machine
    if machine is not None:  # a machine's uploads count against its quota
        incoming = sum(len(envelope) for _, envelope in records)
        with home.session(read_only=True) as session:
            staged.admit(session.connection(), machine.id, incoming, staged.quota())
    stored = added = 0
    with home.store.writer() as writer:
        for cid, envelope in records:
            if not writer.has(cid):
                added += writer.put_envelope(cid, envelope).stored
                stored += 1
    if machine is not None:
        with home.session() as session:
            staged.record(session.connection(), machine.id, [(c, len(e)) for c, e in records])
    return {"received": len(records), "stored": stored, "bytes": added}


def _checked_records(view: memoryview) -> list[tuple[bytes, memoryview]]:
    """The records of an upload, each checked against its id (422 at the first bad one)."""
    records: list[tuple[bytes, memoryview]] = []
    pos = 0
    try:
        while pos < len(view):
            cid, size = _RECORD.unpack_from(view, pos)
            pos += _RECORD.size
            envelope = view[pos : pos + size]
            if len(envelope) != size:
                raise CorruptObject("truncated upload")
            pos += size
            _check_plain_size(cid, envelope)
            codec.decode(envelope, expected=cid)
            records.append((cid, envelope))
    except (struct.error, CorruptObject) as exc:
        raise InvalidInput(f"bad upload: {exc}") from None
    return records


def _check_plain_size(cid: bytes, envelope: memoryview) -> None:
    """413 unless the record's plaintext fits what agents upload, before it is unpacked:
    its header may claim up to 1 GiB, which decoding would allocate."""
    head = codec.parse_header(envelope)
    if head.plain_len <= MAX_CHUNK:
        return
    if head.plain_len > MAX_MANIFEST or not _starts_with(envelope, head, tree.MAGIC):
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"chunk {cid.hex()[:16]}: {head.plain_len} bytes of plaintext; records hold at"
            f" most {MAX_CHUNK >> 20} MiB, or {MAX_MANIFEST >> 20} MiB for a layer manifest",
        )
    if head.plain_len > head.payload_len * MAX_RATIO:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"chunk {cid.hex()[:16]}: {head.plain_len} bytes of plaintext in {head.payload_len}:"
            f" a layer manifest compresses at most {MAX_RATIO}:1",
        )


def _starts_with(envelope: memoryview, head: codec.Header, prefix: bytes) -> bool:
    """Whether the plaintext begins with ``prefix``, unpacking no more than that."""
    payload = envelope[codec.HEADER_SIZE : codec.HEADER_SIZE + head.payload_len]
    if head.codec == codec.CODEC_RAW:
        return bytes(payload[: len(prefix)]) == prefix
    try:
        with zstandard.ZstdDecompressor().stream_reader(payload) as reader:
            return bool(reader.read(len(prefix)) == prefix)
    except zstandard.ZstdError:
        return False  # not a valid frame: decode refuses it anyway
