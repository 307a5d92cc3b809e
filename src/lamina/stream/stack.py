"""The local delta stack of a streamed machine, and where its sync stands.

Reads go down the stack, writes go to the top:

    active    the machine's writes since the last sync started
    sealed    writes being synced (frozen when a sync starts; absent otherwise)
    synced    the machine's delta as the manager holds it (stateful machines)
    image     the streamed image version (the chunk cache)

A sync is a few steps, each recorded in ``state.json`` (written to a temporary file,
fsynced, renamed) before the next starts, so a crash at any point resumes where it was:

    seal     active becomes sealed, a new empty active takes the writes
    upload   the sealed delta goes to the manager as a blob under a fixed upload id; the
             manager applies it atomically and idempotently, then says so (confirmed)
    merge    sealed is written into synced (idempotent) and dropped

Between seal and merge the sealed layer stays in the stack, so reads never change.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

from lamina.delta.device import MachineDevice
from lamina.delta.file import Delta
from lamina.errors import CorruptObject
from lamina.files import write_json_atomic
from lamina.nbd import ExportInfo
from lamina.nbd.device import BlockDevice

FORMAT: Final = "lamina-stream-deltas"
VERSION: Final = 1
SYNCED: Final = "synced"


@dataclass(frozen=True)
class StackState:
    """Where the stack stands (pure data; transitions return new states)."""

    active: str = "d000001"
    sealed: str | None = None
    upload_id: str | None = None
    confirmed: bool = False
    next: int = 2

    def next_step(self) -> str:
        """``seal`` when no sync is under way, else ``upload`` or ``merge``."""
        if self.sealed is None:
            return "seal"
        return "merge" if self.confirmed else "upload"

    def seal(self, upload_id: str) -> StackState:
        if self.sealed is not None:
            raise ValueError("a sync is already under way")
        return replace(
            self,
            sealed=self.active,
            active=f"d{self.next:06d}",
            next=self.next + 1,
            upload_id=upload_id,
            confirmed=False,
        )

    def confirm(self) -> StackState:
        if self.sealed is None:
            raise ValueError("nothing is being synced")
        return replace(self, confirmed=True)

    def merged(self) -> StackState:
        if not self.confirmed:
            raise ValueError("merge before the manager confirmed the upload")
        return replace(self, sealed=None, upload_id=None, confirmed=False)

    def dropped(self) -> StackState:
        """A stateless restart: every local write is thrown away."""
        return StackState(active=f"d{self.next:06d}", next=self.next + 1)

    def layers(self) -> list[str]:
        """Delta directories from the bottom up."""
        return [SYNCED] + ([self.sealed] if self.sealed else []) + [self.active]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StackState:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise CorruptObject("stream deltas: unknown state format")
        return cls(
            active=str(data["active"]),
            sealed=data.get("sealed"),
            upload_id=data.get("upload_id"),
            confirmed=bool(data.get("confirmed")),
            next=int(data["next"]),
        )


class DeltaStack:
    """The open deltas of a streamed machine (they stay flock'ed while open)."""

    def __init__(self, root: Path, *, size: int, base_id: bytes) -> None:
        self.root = root
        self.size = size
        self.base_id = base_id
        root.mkdir(parents=True, exist_ok=True)
        path = root / "state.json"
        self.state = (
            StackState.from_json(json.loads(path.read_text())) if path.exists() else StackState()
        )
        self.deltas: dict[str, Delta] = {}
        try:
            for name in self.state.layers():
                self.deltas[name] = self._open(name)
        except BaseException:
            self.close()
            raise
        if not path.exists():
            self._save(self.state)
        self._sweep()

    def _open(self, name: str) -> Delta:
        return Delta(self.root / name, size=self.size, base_id=self.base_id)

    def _save(self, state: StackState) -> None:
        write_json_atomic(self.root / "state.json", state.to_json())
        self.state = state

    def _sweep(self) -> None:
        """Remove delta directories no state refers to (a crash between steps)."""
        keep = set(self.state.layers())
        for entry in self.root.iterdir():
            if entry.is_dir() and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
        for entry in self.root.glob("upload-*.blob"):
            if self.state.upload_id is None or entry.name != blob_name(self.state.upload_id):
                entry.unlink(missing_ok=True)

    # -- the device ---------------------------------------------------------------------

    def device(self, info: ExportInfo, image: BlockDevice) -> BlockDevice:
        """The machine as the stack shows it: each delta a copy-on-write layer."""
        device: BlockDevice = image
        for name in self.state.layers():
            device = MachineDevice(info, device, self.deltas[name])
        return device

    @property
    def active(self) -> Delta:
        return self.deltas[self.state.active]

    @property
    def sealed(self) -> Delta | None:
        return self.deltas[self.state.sealed] if self.state.sealed else None

    @property
    def synced(self) -> Delta:
        return self.deltas[SYNCED]

    def local_blocks(self) -> int:
        """Blocks written locally and not yet synced."""
        sealed = self.sealed
        return self.active.used_blocks + (sealed.used_blocks if sealed else 0)

    # -- transitions (each persisted before it takes effect) -------------------------------

    def seal(self, upload_id: str) -> None:
        self.active.flush()
        new = self.state.seal(upload_id)
        self.deltas[new.active] = self._open(new.active)
        self._save(new)

    def confirm(self) -> None:
        self._save(self.state.confirm())

    def finish_merge(self) -> None:
        """After the sealed delta was merged into synced: drop it."""
        sealed = self.state.sealed
        self.synced.flush()
        self._save(self.state.merged())
        if sealed is not None:
            self.deltas.pop(sealed).close()
            shutil.rmtree(self.root / sealed, ignore_errors=True)
        self._sweep()

    def drop_local(self) -> None:
        """Stateless machine: forget every local write (at start, before serving)."""
        old = [n for n in self.state.layers() if n != SYNCED]
        new = self.state.dropped()
        self.deltas[new.active] = self._open(new.active)
        self._save(new)
        for name in old:
            self.deltas.pop(name).close()
        self._sweep()

    def flush(self) -> None:
        for delta in self.deltas.values():
            delta.flush()

    def close(self) -> None:
        for delta in self.deltas.values():
            delta.flush()
            delta.close()
        self.deltas = {}


def blob_name(upload_id: str) -> str:
    return f"upload-{upload_id}.blob"
