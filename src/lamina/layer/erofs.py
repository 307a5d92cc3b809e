"""A layer version's EROFS image, built once where the layer is stored, the same bytes
every time, and kept in the chunk store as an image manifest (``lamina.image.manifest``).

Same tree, same image: ``mkfs.erofs`` (erofs-utils 1.5) sorts directory entries itself, so
the order files were written out in does not matter; what varies between two builds is the
superblock's build time (and the checksum over it) and the UUID. So the UUID is the first
16 bytes of the layer manifest's id, every inode is written extended
(``-E force-inode-extended``: a compact inode is chosen only when a file's mtime equals
the build time, which would make the layout depend on the clock), and the build time is
then set to zero and the superblock checksum computed again. ``-T``/``SOURCE_DATE_EPOCH``
are not used: in 1.5 they replace every file's mtime.

The superblock (at byte 1024, little-endian): magic u32 0xE0F5E1E2, checksum u32 (CRC32C
of the 3,072 bytes from 1024 with this field zero, seeded with ~0 and not inverted, when
feature_compat has bit 0), feature_compat u32, blkszbits u8, sb_extslots u8, root_nid
u16, inos u64, build_time u64, build_time_nsec u32, ...
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Final

from lamina.errors import CorruptObject, ToolError
from lamina.image.importer import import_file
from lamina.image.manifest import Manifest
from lamina.layer.materialize import materialize
from lamina.layer.tree import Tree
from lamina.store import ChunkStore

MKFS: Final = "mkfs.erofs"
# 64 KiB chunks: a small file costs at most one chunk on first read. Reckoned for the
# benchmark's layer (20,000 files of 1-8 KiB, 88 MiB, of which 600 are read at random):
# they touch ~490 of 1,408 chunks of 64 KiB (31 MiB), but ~290 of 352 chunks of 256 KiB
# (72 MiB). The table of a 2 GiB image is 1 MiB.
CHUNK: Final = 64 << 10
SB_OFFSET: Final = 1024
SB_MAGIC: Final = 0xE0F5E1E2
SB_CHECKSUM_FEATURE: Final = 1
_HEAD = struct.Struct("<IIIBBHQQI")


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE: Final = _crc32c_table()


def crc32c_raw(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """Linux's ``crc32c(seed, data)``: no final inversion."""
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def settle(image: Path) -> None:
    """Zero the superblock's build time and recompute its checksum (in place)."""
    with open(image, "r+b") as f:
        f.seek(SB_OFFSET)
        head = f.read(_HEAD.size)
        magic, _csum, compat, blkszbits, ext, root, inos, _t, _ns = _HEAD.unpack(head)
        if magic != SB_MAGIC:
            raise CorruptObject(f"{image.name}: not an EROFS image")
        block = 1 << blkszbits
        f.seek(SB_OFFSET)
        sb = bytearray(f.read(block - SB_OFFSET))
        _HEAD.pack_into(sb, 0, magic, 0, compat, blkszbits, ext, root, inos, 0, 0)
        if compat & SB_CHECKSUM_FEATURE:
            struct.pack_into("<I", sb, 4, crc32c_raw(bytes(sb)))
        f.seek(SB_OFFSET)
        f.write(sb)


def mkfs(source: Path, image: Path, fs_uuid: uuid.UUID) -> None:
    if shutil.which(MKFS) is None:
        raise ToolError(f"{MKFS} not found (install erofs-utils)")
    cmd = [
        MKFS, "--quiet", "--preserve-mtime", "-Eforce-inode-extended", f"-U{fs_uuid}",
        str(image), str(source),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise ToolError(f"{MKFS} failed: {detail[-1] if detail else proc.returncode}")
    settle(image)


def build(store: ChunkStore, tree: Tree, manifest_id: bytes, work: Path) -> Path:
    """Write ``tree`` out under ``work`` and pack it; the image's path (in ``work``)."""
    from lamina.layer.prepare import scratch

    root = work / "root"
    root.mkdir(parents=True)
    image = work / "image.erofs"
    with scratch(root, tree):
        materialize(store, tree, root)
        mkfs(root, image, uuid.UUID(bytes=manifest_id[:16]))
    return image


def store_image(
    store: ChunkStore, image: Path, commit: Callable[[bytes, Manifest], None]
) -> tuple[bytes, Manifest]:
    """Chunk ``image`` into the store and run ``commit`` (which records the manifest id)
    while the store's shared lock is held, so a gc meanwhile keeps what it reused."""
    with store.writer() as writer:
        imported = import_file(writer, image, fmt="raw", chunk_size=CHUNK)
        writer.flush()
        commit(imported.manifest_id, imported.manifest)
        return imported.manifest_id, imported.manifest
