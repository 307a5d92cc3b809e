"""``lamina stream sync``: hand a stateful machine's local writes back to the manager.

Steps (see ``stack.py``): seal the active delta, write it as a blob, upload the blob in
parts under a fixed upload id (resuming where the manager says it stopped), ask the
manager to apply it, record the confirmation, merge the sealed delta into the synced
layer and drop it. Every step is idempotent and recorded before the next, so a retry
after a crash or an outage at any point finishes the same sync, never a different one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lamina.delta import transfer
from lamina.delta.convert import apply_runs, read_blob, write_blob
from lamina.errors import LaminaError, UsageError
from lamina.stream.cache import StreamConfig
from lamina.stream.remote import Remote
from lamina.stream.stack import DeltaStack, blob_name

# 8 MiB per PUT: large enough that request overhead does not matter, small enough that
# an interrupted part costs little to resend.
PART = 8 << 20


def check_syncable(config: StreamConfig) -> str:
    if config.machine is None:
        raise UsageError("this stream has no machine (start it with --machine NAME)")
    if config.mode != "stateful":
        raise UsageError(
            f"machine {config.machine} is stateless: its local writes are dropped at restart"
        )
    return config.machine


async def sync(
    stack: DeltaStack,
    remote: Remote,
    config: StreamConfig,
    *,
    changed: Callable[[], None] = lambda: None,
    stop_after: str | None = None,
) -> dict[str, Any]:
    """Run the sync to the end; ``changed`` is called after the stack's layers changed
    (the endpoint rebuilds its device). ``stop_after`` (tests) stops after one step."""
    machine = check_syncable(config)
    result: dict[str, Any] = {"machine": machine, "blocks": 0, "bytes": 0, "resumed": False}
    if stack.state.next_step() == "seal":
        if stack.active.used_blocks == 0:
            result["status"] = "nothing to sync"
            return result
        stack.seal(uuid.uuid4().hex)
        changed()
    else:
        result["resumed"] = True
    upload_id = stack.state.upload_id
    assert upload_id is not None and stack.sealed is not None
    result["upload_id"] = upload_id
    result["blocks"] = stack.sealed.used_blocks
    path = stack.root / blob_name(upload_id)
    if stack.state.next_step() == "upload":
        if not path.exists():
            await asyncio.to_thread(write_blob, stack.sealed, stack.base_id, path)
        if stop_after == "blob":
            return result | {"status": "stopped"}
        await _upload(remote, machine, upload_id, path, stop_after)
        if stop_after == "apply":
            return result | {"status": "stopped"}
        stack.confirm()
    result["bytes"] = path.stat().st_size if path.exists() else 0
    if stop_after == "confirm":
        return result | {"status": "stopped"}
    await asyncio.to_thread(_merge, stack, path)
    stack.finish_merge()
    changed()
    result["status"] = "synced"
    return result


async def _upload(
    remote: Remote, machine: str, upload_id: str, path: Path, stop_after: str | None
) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - transfer.TRAILER))
        digest = f.read(transfer.TRAILER).hex()
        state = await remote.upload_state(machine, upload_id)
        if state.get("applied"):
            return
        offset = int(state.get("received", 0))
        if offset > size:
            offset = 0  # the manager kept more than this blob has: start over
        while offset < size:
            f.seek(offset)
            offset = await remote.upload_part(machine, upload_id, offset, f.read(PART))
            if stop_after == "part":
                raise LaminaError("sync stopped after one part (test hook)")
    answer = await remote.apply(machine, upload_id, size, digest)
    if not answer.get("applied"):
        raise LaminaError(f"the manager did not apply upload {upload_id}: {answer}")


def _merge(stack: DeltaStack, path: Path) -> None:
    """Write the sealed blocks into the synced layer (from the blob: one read pass)."""
    apply_runs(stack.synced, read_blob(path).runs)
