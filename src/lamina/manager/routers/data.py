"""Image data over HTTP: manifests and chunks, immutable and cacheable.

    GET /api/v1/images/{name}/versions/{version}/manifest   the serialized manifest
    GET /api/v1/chunks/{id}                                  a chunk's stored envelope
    POST /api/v1/chunks/batch  {"ids": [...]}                several envelopes, framed as
        uploads are (32-byte id, 4-byte big-endian length, envelope), for a prefix of the
        ids asked (at least one, up to BATCH_BYTES): the caller asks again for the rest.
        A small layer comes in one round trip instead of one per file (under emulation,
        the per-request cost made fetching a 100-file layer take 0.74 s).

Chunks travel as stored (compressed envelope, see ``lamina.store.codec``): the receiver
checks the BLAKE3 id of the plaintext, so a corrupt transfer is never used. Both carry a
strong ETag and ``Cache-Control: immutable`` so any HTTP cache can front several managers.
A machine token may read what its pinned image version references, and what the layers
it may read reference (``services.readable``, asked afresh at every request); the admin
anything.
"""

from __future__ import annotations

import struct
from typing import Annotated

from fastapi import APIRouter, Header, Path, Response, status
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from lamina.errors import NotFound, Refused
from lamina.home import Home
from lamina.manager.deps import Caller, CallerDep, HomeDep, ReadSessionDep
from lamina.manager.schemas import HexId
from lamina.manager.services import agents, images
from lamina.manager.services.readable import Readable
from lamina.names import MAX_VERSION, Ref, check_name

router = APIRouter(prefix="/api/v1", tags=["data"])
# Private: each answer was checked against the caller's token, so a shared cache must not
# hand it to another machine; the caller's own cache may keep it for good (content-addressed).
IMMUTABLE = "private, max-age=31536000, immutable"
CHUNK_TYPE = "application/vnd.lamina.chunk"
MANIFEST_TYPE = "application/vnd.lamina.manifest"
BATCH_TYPE = "application/vnd.lamina.chunks"
BATCH_IDS = 4096
BATCH_BYTES = 32 << 20
RECORD = struct.Struct(">32sI")


class ChunkBatch(BaseModel):
    ids: list[HexId] = Field(min_length=1, max_length=BATCH_IDS)


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    return if_none_match is not None and etag in {t.strip() for t in if_none_match.split(",")}


@router.get(
    "/images/{name}/versions/{version}/manifest",
    response_class=Response,
    responses={200: {"content": {MANIFEST_TYPE: {}}}, 304: {}, 401: {}, 403: {}, 404: {}},
)
def get_manifest(
    name: str,
    version: Annotated[int, Path(ge=1, le=MAX_VERSION)],
    caller: CallerDep,
    session: ReadSessionDep,
    home: HomeDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    found = images.get_version(session, Ref(check_name(name, "image name"), version))
    pinned = caller.machine.image_version.image_id if caller.machine is not None else None
    images.check_readable(found, admin=caller.admin, pinned_image_id=pinned)
    etag = f'"{found.manifest_id}"'
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
    if _etag_matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    body = home.store.get(bytes.fromhex(found.manifest_id))
    return Response(body, media_type=MANIFEST_TYPE, headers=headers)


@router.get(
    "/chunks/{chunk_id}",
    response_class=Response,
    responses={200: {"content": {CHUNK_TYPE: {}}}, 304: {}, 401: {}, 403: {}, 404: {}},
)
def get_chunk(
    chunk_id: str,
    caller: CallerDep,
    home: HomeDep,
    session: ReadSessionDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    try:
        cid = bytes.fromhex(chunk_id)
    except ValueError:
        cid = b""
    if len(cid) != 32:
        raise NotFound("chunk ids are 64 hex digits")
    _readable(caller, home, session).check(cid)
    etag = f'"{chunk_id.lower()}"'
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
    if _etag_matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    try:
        body = home.store.get_envelope(cid)
    except NotFound:
        raise NotFound("no such chunk") from None
    return Response(body, media_type=CHUNK_TYPE, headers=headers)


class _Check:
    """The one question every chunk answer asks first: may this caller read ``cid``."""

    def __init__(self, may: Readable | None) -> None:
        self.may = may  # None: the admin, who may read anything

    def check(self, cid: bytes) -> None:
        if self.may is not None and not self.may.allows(cid):
            raise Refused("chunk not referenced by this machine")


def _readable(caller: Caller, home: Home, session: Session) -> _Check:
    """What the caller may read: the admin anything, a machine what its image version and
    the layers it may read reference (asked of the database afresh, once per request)."""
    if caller.admin:
        return _Check(None)
    machine = caller.machine
    assert machine is not None
    conn = session.connection()
    return _Check(
        Readable(
            home.store,
            machine.image_version.manifest_id,
            lambda: agents.allowed_manifests(conn, machine_id=machine.id),
        )
    )


@router.post(
    "/chunks/batch",
    response_class=Response,
    responses={200: {"content": {BATCH_TYPE: {}}}, 401: {}, 403: {}, 404: {}, 422: {}},
)
def get_chunks(
    body: ChunkBatch, caller: CallerDep, home: HomeDep, session: ReadSessionDep
) -> Response:
    """Several chunks' envelopes in one answer (a prefix of ``ids``; ask for the rest)."""
    ids = [bytes.fromhex(c) for c in body.ids]
    may = _readable(caller, home, session)
    for cid in ids:  # every one checked before anything is read: no existence answers
        may.check(cid)
    out = bytearray()
    for cid in ids:
        try:
            envelope = home.store.get_envelope(cid)
        except NotFound:
            raise NotFound(f"no chunk {cid.hex()}") from None
        if out and len(out) + len(envelope) > BATCH_BYTES:
            break
        out += RECORD.pack(cid, len(envelope)) + envelope
    return Response(bytes(out), media_type=BATCH_TYPE, headers={"Cache-Control": "no-store"})
