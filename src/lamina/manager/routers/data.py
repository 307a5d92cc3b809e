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
A machine token may read what its pinned image version references; the admin anything.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Header, Response, status
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from lamina.errors import NotFound, Refused
from lamina.home import Home
from lamina.image import Manifest
from lamina.image.manifest import MAGIC as IMAGE_MAGIC
from lamina.layer.importer import load_tree
from lamina.manager.deps import Caller, CallerDep, HomeDep, ReadSessionDep
from lamina.manager.models import Machine
from lamina.manager.schemas import HexId
from lamina.manager.services import agents, images
from lamina.names import Ref, check_name

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


class _Referenced:
    """Chunk ids referenced by recently used manifests, for access checks (bounded)."""

    def __init__(
        self, capacity: int = 64, load: Callable[[Home, bytes], frozenset[bytes]] | None = None
    ) -> None:
        self._sets: OrderedDict[bytes, frozenset[bytes]] = OrderedDict()
        self._load = load or _image_refs
        self._lock = threading.Lock()
        self.capacity = capacity

    def get(self, home: Home, manifest_id: bytes) -> frozenset[bytes]:
        with self._lock:
            found = self._sets.get(manifest_id)
            if found is not None:
                self._sets.move_to_end(manifest_id)
                return found
        refs = self._load(home, manifest_id)
        with self._lock:
            self._sets[manifest_id] = refs
            while len(self._sets) > self.capacity:
                self._sets.popitem(last=False)
        return refs


def _image_refs(home: Home, manifest_id: bytes) -> frozenset[bytes]:
    return frozenset(Manifest.from_bytes(home.store.get(manifest_id)).referenced() | {manifest_id})


def _tree_refs(home: Home, manifest_id: bytes) -> frozenset[bytes]:
    """A layer version's references: its tree's, or its EROFS image's (an image manifest)."""
    data = home.store.get(manifest_id)
    if data[:4] == IMAGE_MAGIC:
        return frozenset(Manifest.from_bytes(data).referenced() | {manifest_id})
    return frozenset(load_tree(home.store, manifest_id).referenced() | {manifest_id})


REFERENCED = _Referenced()


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    return if_none_match is not None and etag in {t.strip() for t in if_none_match.split(",")}


@router.get(
    "/images/{name}/versions/{version}/manifest",
    response_class=Response,
    responses={200: {"content": {MANIFEST_TYPE: {}}}, 304: {}, 401: {}, 403: {}, 404: {}},
)
def get_manifest(
    name: str,
    version: int,
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
    _check_readable(caller, home, session, cid)
    etag = f'"{chunk_id.lower()}"'
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
    if _etag_matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    try:
        body = home.store.get_envelope(cid)
    except NotFound:
        raise NotFound("no such chunk") from None
    return Response(body, media_type=CHUNK_TYPE, headers=headers)


def _check_readable(caller: Caller, home: Home, session: Session, cid: bytes) -> None:
    """Refused (403) unless the caller may read ``cid`` (the admin anything, a machine what its
    image version and its layers reference)."""
    if caller.admin:
        return
    machine = caller.machine
    assert machine is not None
    allowed = REFERENCED.get(home, bytes.fromhex(machine.image_version.manifest_id))
    if cid not in allowed and not _layer_allows(session, home, machine, cid):
        raise Refused("chunk not referenced by this machine")


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
    for cid in ids:  # every one checked before anything is read: no existence answers
        _check_readable(caller, home, session, cid)
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


class _Allowed:
    """Per machine, the layer manifests it may read, remembered for ``TTL`` seconds (a
    cache of the database: a chunk not allowed by the cached set is checked afresh)."""

    TTL = 2.0

    def __init__(self) -> None:
        self._sets: dict[int, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def manifests(self, session: Session, machine_id: int, *, fresh: bool) -> frozenset[str]:
        now = time.monotonic()
        with self._lock:
            found = self._sets.get(machine_id)
        if found is not None and not fresh and now - found[0] < self.TTL:
            return found[1]
        conn = session.connection()
        manifests = frozenset(agents.allowed_manifests(conn, machine_id=machine_id))
        with self._lock:
            if len(self._sets) > 10_000:
                self._sets.clear()
            self._sets[machine_id] = (now, manifests)
        return manifests


ALLOWED = _Allowed()
TREES = _Referenced(capacity=256, load=_tree_refs)


def _layer_allows(session: Session, home: Home, machine: Machine, cid: bytes) -> bool:
    """Whether one of the layers entitled to this machine (or its logged-in users), or one
    of those users' writable layers, references ``cid``; layers reach agents through this
    same endpoint."""
    for fresh in (False, True):
        manifests = ALLOWED.manifests(session, machine.id, fresh=fresh)
        if cid.hex() in manifests:
            return True
        if any(cid in TREES.get(home, bytes.fromhex(m)) for m in manifests):
            return True
    return False
