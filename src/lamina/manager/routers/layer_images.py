"""Layer versions as lazily readable EROFS images.

    GET /api/v1/layers/{name}/versions/{version}/image     the image (built on first demand):
        {"layer", "manifest" (the tree's), "image" (the image manifest's id), "size",
        "chunk_size", "profile" (image chunk indices to fetch first)}
    PUT /api/v1/layers/{name}/versions/{version}/profile   {"chunks": [...]}: one session's
        first-read order, merged into the version's read-ahead profile

The image manifest and its chunks are then read through ``/chunks`` (data.py), which lets a
machine read the images of the layer versions it may read. Here too: the admin, or a
machine to which the version is entitled (or whose user's writable layer it is).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from lamina.errors import LaminaError, NotFound
from lamina.home import Home
from lamina.manager.deps import Caller, CallerDep, HomeDep, SessionDep
from lamina.manager.models import LayerVersion
from lamina.manager.services import agents, layer_images, layers
from lamina.names import Ref, check_name

router = APIRouter(prefix="/api/v1", tags=["data"])
AUTH: dict[int | str, dict[str, Any]] = {401: {}, 403: {}, 404: {}}
MAX_PROFILE = 1 << 20


class LayerImage(BaseModel):
    layer: str
    manifest: str
    image: str
    size: int
    chunk_size: int
    profile: list[int]


class Profile(BaseModel):
    chunks: list[int] = Field(max_length=MAX_PROFILE)


def _version(session: Session, caller: Caller, name: str, version: int) -> LayerVersion:
    try:
        lv = layers.get_version(session, Ref(check_name(name, "layer name"), version))
    except (NotFound, LaminaError) as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    if not caller.admin:
        assert caller.machine is not None
        allowed = agents.allowed_manifests(session.connection(), machine_id=caller.machine.id)
        if lv.manifest_id not in allowed:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "layer not entitled to this machine")
    return lv


def _image(session: Session, home: Home, caller: Caller, name: str, version: int) -> LayerImage:
    lv = _version(session, caller, name, version)
    lv, manifest = layer_images.ensure_image(session, home, Ref(name, lv.version))
    assert lv.image_manifest_id is not None
    return LayerImage(
        layer=lv.ref,
        manifest=lv.manifest_id,
        image=lv.image_manifest_id,
        size=manifest.size,
        chunk_size=manifest.chunk_size,
        profile=layer_images.profile(lv),
    )


@router.get("/layers/{name}/versions/{version}/image", response_model=LayerImage, responses=AUTH)
async def get_image(
    name: str, version: int, caller: CallerDep, session: SessionDep, home: HomeDep
) -> LayerImage:
    # The first call builds the image (seconds to minutes): off the event loop.
    return await run_in_threadpool(_image, session, home, caller, name, version)


@router.put("/layers/{name}/versions/{version}/profile", responses=AUTH)
def put_profile(
    name: str, version: int, body: Profile, caller: CallerDep, session: SessionDep, home: HomeDep
) -> dict[str, Any]:
    lv = _version(session, caller, name, version)
    lv, manifest = layer_images.ensure_image(session, home, Ref(name, lv.version))
    merged = layer_images.add_profile(session, lv, body.chunks, manifest.count)
    return {"merged": merged, "runs": lv.image_profile_runs}
