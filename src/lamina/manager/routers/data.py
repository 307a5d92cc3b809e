"""Image data over HTTP: manifests and chunks, immutable and cacheable.

    GET /api/v1/images/{name}/versions/{version}/manifest   the serialized manifest
    GET /api/v1/chunks/{id}                                  a chunk's stored envelope

Chunks travel as stored (compressed envelope, see ``lamina.store.codec``): the receiver
checks the BLAKE3 id of the plaintext, so a corrupt transfer is never used. Both carry a
strong ETag and ``Cache-Control: immutable`` so any HTTP cache can front several managers.
A machine token may read what its pinned image version references, and what the layers
it may read reference (``services.readable``, asked afresh at every request); the admin
anything.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Response, status

from lamina.errors import NotFound, Refused
from lamina.manager.deps import CallerDep, HomeDep, ReadSessionDep
from lamina.manager.services import agents, images
from lamina.manager.services.readable import Readable
from lamina.names import MAX_VERSION, Ref, check_name

router = APIRouter(prefix="/api/v1", tags=["data"])
# Private: each answer was checked against the caller's token, so a shared cache must not
# hand it to another machine; the caller's own cache may keep it for good (content-addressed).
IMMUTABLE = "private, max-age=31536000, immutable"
CHUNK_TYPE = "application/vnd.lamina.chunk"
MANIFEST_TYPE = "application/vnd.lamina.manifest"


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
    if not caller.admin:
        machine = caller.machine
        assert machine is not None
        conn = session.connection()
        may = Readable(
            home.store,
            machine.image_version.manifest_id,
            lambda: agents.allowed_manifests(conn, machine_id=machine.id),
        )
        if not may.allows(cid):
            raise Refused("chunk not referenced by this machine")
    etag = f'"{chunk_id.lower()}"'
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
    if _etag_matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    try:
        body = home.store.get_envelope(cid)
    except NotFound:
        raise NotFound("no such chunk") from None
    return Response(body, media_type=CHUNK_TYPE, headers=headers)
