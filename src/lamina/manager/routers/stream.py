"""What stream endpoints need from the manager, beyond manifests and chunks (data.py).

    GET  /api/v1/stream/images/{name}[?version=V]          version to stream, its geometry
    GET  /api/v1/stream/machines/{name}                     a machine's version and mode
    GET  /api/v1/images/{name}/versions/{v}/profile         boot profile: chunk indices
    GET  /api/v1/stream/chunks?ids=ID,ID,...                several envelopes, concatenated
    GET  /api/v1/stream/machines/{name}/delta               a machine's delta as a blob
    GET  /api/v1/stream/machines/{name}/seed                its identity seed disk (ISO)
    GET  /api/v1/stream/machines/{name}/uploads/{id}        how much of an upload arrived
    PUT  /api/v1/stream/machines/{name}/uploads/{id}?offset=N   one part of a delta blob
    POST /api/v1/stream/machines/{name}/uploads/{id}/apply  commit it to the machine's delta

Tokens as in data.py: the admin token opens everything; a machine token opens its own
machine and the image it is pinned to.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask

from lamina.delta import transfer, uploads
from lamina.errors import Conflict, Refused
from lamina.home import Home
from lamina.identity import seed_image
from lamina.manager.deps import HomeDep, get_caller
from lamina.manager.models import ImageVersion
from lamina.manager.routers.data import CHUNK_TYPE, IMMUTABLE
from lamina.manager.services import images, machines, profiles
from lamina.manager.services.readable import IMAGES
from lamina.names import MAX_VERSION, Ref, check_name

router = APIRouter(prefix="/api/v1", tags=["stream"])
BLOB_TYPE = "application/vnd.lamina.delta"
SEED_TYPE = "application/x-iso9660-image"
MAX_IDS = 64
MAX_PART = 64 << 20
Version = Annotated[int, Path(ge=1, le=MAX_VERSION)]
AUTH: dict[int | str, dict[str, Any]] = {401: {}, 403: {}, 404: {}}


class Streamable(BaseModel):
    image: str
    version: int
    size: int
    chunk_size: int
    manifest_id: str


class MachineStream(Streamable):
    machine: str
    mode: str


class Profile(BaseModel):
    image: str
    version: int
    boots: int
    chunks: list[int]


class UploadState(BaseModel):
    received: int
    applied: bool
    blocks: int | None = None


class ApplyRequest(BaseModel):
    size: int = Field(ge=0, le=1 << 62)
    blake3: str = Field(pattern=r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class Who:
    """The caller, resolved in a short transaction of its own: these handlers do disk
    work (chunk batches, delta blobs) that must not hold the database's write lock."""

    admin: bool
    machine: str | None = None
    image_id: int | None = None
    manifest_id: str | None = None


def who(request: Request, home: HomeDep) -> Who:
    with home.session(read_only=True) as session:
        caller = get_caller(request, session)
        m = caller.machine
        if m is None:
            return Who(admin=caller.admin)
        v = m.image_version
        return Who(caller.admin, m.name, v.image_id, v.manifest_id)


WhoDep = Annotated[Who, Depends(who)]


def _version(home: Home, name: str, version: int | None, caller: Who) -> dict[str, Any]:
    with home.session() as session:
        found = images.get_version(session, Ref(check_name(name, "image name"), version))
        images.check_readable(found, admin=caller.admin, pinned_image_id=caller.image_id)
        return _streamable(found)


def _machine(home: Home, name: str, caller: Who) -> dict[str, Any]:
    if not caller.admin and caller.machine != name:
        raise Refused("a machine token opens only its machine")
    with home.session() as session:
        m = machines.get(session, check_name(name, "machine name"))
        return _streamable(m.image_version) | {"machine": m.name, "mode": m.mode}


def _streamable(v: ImageVersion) -> dict[str, Any]:
    return {
        "image": v.image.name,
        "version": v.version,
        "size": v.size,
        "chunk_size": v.chunk_size,
        "manifest_id": v.manifest_id,
    }


@router.get("/stream/images/{name}", response_model=Streamable, responses=AUTH)
def stream_image(
    name: str,
    caller: WhoDep,
    home: HomeDep,
    version: Annotated[int | None, Query(ge=1, le=MAX_VERSION)] = None,
) -> dict[str, Any]:
    return _version(home, name, version, caller)


@router.get("/stream/machines/{name}", response_model=MachineStream, responses=AUTH)
def stream_machine(name: str, caller: WhoDep, home: HomeDep) -> dict[str, Any]:
    return _machine(home, name, caller)


@router.get("/images/{name}/versions/{version}/profile", response_model=Profile, responses=AUTH)
def get_profile(name: str, version: Version, caller: WhoDep, home: HomeDep) -> dict[str, Any]:
    found = _version(home, name, version, caller)
    chunks, boots = profiles.load(home, bytes.fromhex(found["manifest_id"]))
    return {"image": found["image"], "version": found["version"], "boots": boots, "chunks": chunks}


@router.get(
    "/stream/chunks",
    response_class=Response,
    responses={200: {"content": {CHUNK_TYPE: {}}}, **AUTH},
)
def get_chunks(
    caller: WhoDep, home: HomeDep, ids: Annotated[str, Query(max_length=MAX_IDS * 65)]
) -> Response:
    """The envelopes of ``ids`` back to back, in the order asked (each says its length)."""
    try:
        wanted = [bytes.fromhex(i) for i in ids.split(",")]
    except ValueError:
        wanted = []
    if not wanted or len(wanted) > MAX_IDS or any(len(c) != 32 for c in wanted):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "ids: 1-64 chunk ids in hex")
    if not caller.admin:
        assert caller.manifest_id is not None
        allowed = IMAGES.get(home.store, bytes.fromhex(caller.manifest_id))
        if any(c not in allowed for c in wanted):
            raise Refused("chunk not referenced by this machine")
    body = b"".join(home.store.get_envelope(c) for c in wanted)
    return Response(body, media_type=CHUNK_TYPE, headers={"Cache-Control": IMMUTABLE})


@router.get(
    "/stream/machines/{name}/delta",
    response_class=Response,
    responses={200: {"content": {BLOB_TYPE: {}}}, **AUTH, 409: {}},
)
def get_delta(name: str, caller: WhoDep, home: HomeDep) -> Response:
    """A stateful machine's delta (empty for a stateless one); 409 while it is in use."""
    m = _machine(home, name, caller)
    base_id = bytes.fromhex(m["manifest_id"])
    tmp = home.tmp_dir / f"delta-{uuid.uuid4().hex}.blob"
    try:
        if m["mode"] == "stateful":
            uploads.recover(home, name)
            uploads.export(home, name, base_id, m["size"], tmp)
        else:
            tmp.write_bytes(transfer.encode(m["size"], base_id, []))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return FileResponse(tmp, media_type=BLOB_TYPE, background=BackgroundTask(tmp.unlink, True))


@router.get(
    "/stream/machines/{name}/seed",
    response_class=Response,
    responses={200: {"content": {SEED_TYPE: {}}}, **AUTH},
)
def get_seed(name: str, caller: WhoDep, home: HomeDep) -> Response:
    """The machine's NoCloud seed disk (what `machine/NAME/seed` serves over NBD), so a
    streamed machine finds its identity offline too."""
    _machine(home, name, caller)
    with home.session() as session:
        data = seed_image(*machines.seed_of(session, machines.get(session, name), home))
    return Response(data, media_type=SEED_TYPE, headers={"Cache-Control": "no-store"})


@router.get(
    "/stream/machines/{name}/uploads/{upload_id}", response_model=UploadState, responses=AUTH
)
def upload_state(name: str, upload_id: str, caller: WhoDep, home: HomeDep) -> dict[str, Any]:
    _machine(home, name, caller)
    return uploads.state(home, name, upload_id)


@router.put(
    "/stream/machines/{name}/uploads/{upload_id}",
    response_model=UploadState,
    responses={**AUTH, 409: {}, 413: {}},
)
async def upload_part(
    name: str,
    upload_id: str,
    request: Request,
    caller: WhoDep,
    home: HomeDep,
    offset: Annotated[int, Query(ge=0, le=1 << 62)] = 0,
) -> dict[str, Any]:
    m = await run_in_threadpool(_machine, home, name, caller)
    if m["mode"] != "stateful":
        raise Conflict(f"machine {name} is stateless: its delta is not kept")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_PART:
            raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, "parts up to 64 MiB")
    received = await run_in_threadpool(
        functools.partial(uploads.receive, image_size=m["size"]),
        home,
        name,
        upload_id,
        offset,
        bytes(body),
    )
    return {"received": received, "applied": False}


@router.post(
    "/stream/machines/{name}/uploads/{upload_id}/apply",
    response_model=UploadState,
    responses={**AUTH, 409: {}, 422: {}},
)
def apply_upload(
    name: str,
    upload_id: str,
    body: ApplyRequest,
    caller: WhoDep,
    home: HomeDep,
) -> dict[str, Any]:
    """Apply a complete upload to the machine's delta: all of it or (on any error) none;
    409 while the machine is connected to the block server."""
    m = _machine(home, name, caller)
    if m["mode"] != "stateful":
        raise Conflict(f"machine {name} is stateless: its delta is not kept")
    uploads.recover(home, name)
    return uploads.apply(
        home,
        name,
        upload_id,
        size=body.size,
        digest=body.blake3,
        base_id=bytes.fromhex(m["manifest_id"]),
        image_size=m["size"],
    )
