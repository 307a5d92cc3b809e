"""Read files out of an ext2/3/4 file system without mounting it (read-only, no root).

Enough of the on-disk format to fetch a kernel, an initrd and a boot loader's
configuration from an image version, reading only the blocks they occupy:

- superblock at byte 1024: magic ``0xEF53`` at +0x38; block size ``1024 << u32@0x18``;
  blocks per group u32@0x20, inodes per group u32@0x28; revision u32@0x4C (0: 128-byte
  inodes), inode size u16@0x58; incompatible features u32@0x60; descriptor size
  u16@0xFE when the 64bit feature is on (else 32 bytes);
- group descriptors from the block after the superblock's; the inode table's block
  u32@0x08 (high half u32@0x28 in 64-byte descriptors);
- inodes: mode u16@0x00, size u32@0x04 + u32@0x6C << 32, flags u32@0x20, the 60-byte
  ``i_block`` at 0x28, which holds an extent tree (flag 0x80000, header magic
  ``0xF30A``), the classic block map (12 direct, one single, double and triple indirect),
  or a short symlink's target;
- directories as linear lists of records (inode u32, record length u16, name length u8,
  type u8, name): hashed directories read the same way, their index blocks look like
  empty records.

Features that change where data lives and that this reader does not follow (meta_bg,
inline data, encryption, a journal on another device) are refused by name.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass

from lamina.errors import InvalidInput, NotFound
from lamina.netboot.partitions import ReadAt

MAGIC = 0xEF53
_EXTENT_MAGIC = 0xF30A
_EXTENTS_FL = 0x80000
_INLINE_DATA_FL = 0x10000000
_ROOT_INODE = 2
_INCOMPAT_64BIT = 0x80
# Features whose data this reader cannot find, by name for the error message.
_UNSUPPORTED = {
    0x8: "journal_dev",
    0x10: "meta_bg",
    0x1000: "dirdata",
    0x8000: "inline_data",
    0x10000: "encrypt",
}
MAX_FILE = 512 << 20  # a kernel or an initrd; a bigger "file" is a damaged or hostile fs
_MAX_LINKS = 40  # symlinks followed in one lookup, as Linux's MAXSYMLINKS
_MAX_DEPTH = 5  # extent trees are at most 5 deep (ext4's own bound)


@dataclass(frozen=True, slots=True)
class Inode:
    number: int
    mode: int
    size: int
    flags: int
    block: bytes  # i_block, 60 bytes

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


class Ext4:
    """One ext2/3/4 file system that starts at ``offset`` on a disk read by ``read``."""

    def __init__(self, read: ReadAt, offset: int = 0) -> None:
        self._read_disk = read
        self.offset = offset
        sb = read(offset + 1024, 1024)
        if struct.unpack_from("<H", sb, 0x38)[0] != MAGIC:
            raise InvalidInput("no ext2/3/4 file system here (superblock magic not 0xEF53)")
        (log_block,) = struct.unpack_from("<I", sb, 0x18)
        if log_block > 6:
            raise InvalidInput(f"ext4 block size 1024 << {log_block} is not supported")
        self.block_size = 1024 << log_block
        (self.first_data_block,) = struct.unpack_from("<I", sb, 0x14)
        (self.inodes_per_group,) = struct.unpack_from("<I", sb, 0x28)
        (revision,) = struct.unpack_from("<I", sb, 0x4C)
        self.inode_size = struct.unpack_from("<H", sb, 0x58)[0] if revision else 128
        (incompat,) = struct.unpack_from("<I", sb, 0x60)
        refused = [name for bit, name in _UNSUPPORTED.items() if incompat & bit]
        if refused:
            raise InvalidInput(f"ext4 features this reader does not follow: {', '.join(refused)}")
        wide = incompat & _INCOMPAT_64BIT
        self.desc_size = struct.unpack_from("<H", sb, 0xFE)[0] if wide else 32
        if self.inodes_per_group == 0 or self.inode_size < 128 or self.desc_size < 32:
            raise InvalidInput("ext4 superblock is damaged (zero inodes per group or sizes)")
        self._dirs: dict[int, dict[str, int]] = {}  # directories read, by inode number

    # -- blocks and inodes ------------------------------------------------------------

    def _block(self, number: int, count: int = 1) -> bytes:
        return self._read_disk(self.offset + number * self.block_size, count * self.block_size)

    def inode(self, number: int) -> Inode:
        if number < 1:
            raise InvalidInput(f"ext4 inode number {number} is invalid")
        group, index = divmod(number - 1, self.inodes_per_group)
        desc_at = (self.first_data_block + 1) * self.block_size + group * self.desc_size
        desc = self._read_disk(self.offset + desc_at, self.desc_size)
        table = struct.unpack_from("<I", desc, 0x08)[0]
        if self.desc_size >= 64:
            table |= struct.unpack_from("<I", desc, 0x28)[0] << 32
        raw = self._read_disk(self.offset + table * self.block_size + index * self.inode_size, 128)
        mode, size_lo = struct.unpack_from("<HxxI", raw, 0)
        (flags,) = struct.unpack_from("<I", raw, 0x20)
        (size_hi,) = struct.unpack_from("<I", raw, 0x6C)
        return Inode(number, mode, size_lo | size_hi << 32, flags, raw[0x28:0x64])

    def _runs(self, inode: Inode) -> list[tuple[int, int, int]]:
        """(first logical block, count, first physical block or 0 for a hole), in order."""
        if inode.flags & _INLINE_DATA_FL:
            raise InvalidInput(f"ext4 inode {inode.number} keeps its data inline (not supported)")
        if inode.flags & _EXTENTS_FL:
            runs = self._extents(inode.block, _MAX_DEPTH)
        else:
            runs = self._block_map(inode.block)
        return sorted(runs)

    def _extents(self, node: bytes, depth_left: int) -> list[tuple[int, int, int]]:
        magic, entries, _max, depth = struct.unpack_from("<HHHH", node, 0)
        if magic != _EXTENT_MAGIC or depth_left < 0 or 12 + entries * 12 > len(node):
            raise InvalidInput("ext4 extent tree is damaged")
        runs: list[tuple[int, int, int]] = []
        for i in range(entries):
            at = 12 + 12 * i
            if depth == 0:
                logical, length, start_hi, start_lo = struct.unpack_from("<IHHI", node, at)
                if length > 32768:  # an unwritten extent: reads as zeros
                    runs.append((logical, length - 32768, 0))
                else:
                    runs.append((logical, length, start_hi << 32 | start_lo))
            else:
                _logical, leaf_lo, leaf_hi = struct.unpack_from("<IIH", node, at)
                child = self._block(leaf_hi << 32 | leaf_lo)
                runs += self._extents(child, depth_left - 1)
        return runs

    def _block_map(self, block: bytes) -> list[tuple[int, int, int]]:
        pointers = struct.unpack_from("<15I", block, 0)
        per_block = self.block_size // 4
        runs: list[tuple[int, int, int]] = []
        logical = 0
        for p in pointers[:12]:
            runs.append((logical, 1, p))
            logical += 1
        for level, p in enumerate(pointers[12:], start=1):
            logical = self._indirect(p, level, logical, per_block, runs)
        return [r for r in runs if r[2]]

    def _indirect(
        self,
        pointer: int,
        level: int,
        logical: int,
        per_block: int,
        runs: list[tuple[int, int, int]],
    ) -> int:
        span: int = per_block**level
        if pointer == 0:
            return logical + span
        children = struct.unpack(f"<{per_block}I", self._block(pointer))
        for child in children:
            if level == 1:
                runs.append((logical, 1, child))
                logical += 1
            else:
                logical = self._indirect(child, level - 1, logical, per_block, runs)
            if logical * self.block_size >= MAX_FILE:
                break
        return logical

    def data(self, inode: Inode) -> bytes:
        """The whole content of a file, directory or long symlink."""
        if inode.size > MAX_FILE:
            raise InvalidInput(f"ext4 inode {inode.number} is {inode.size} bytes, over {MAX_FILE}")
        out = bytearray(inode.size)
        for logical, count, physical in self._runs(inode):
            start = logical * self.block_size
            if physical == 0 or start >= inode.size:
                continue
            n = min(count * self.block_size, inode.size - start)
            chunk = self._block(physical, -(-n // self.block_size))
            out[start : start + n] = chunk[:n]
        return bytes(out)

    # -- names ------------------------------------------------------------------------

    def entries(self, directory: Inode) -> dict[str, int]:
        """A directory's names and their inode numbers (``.`` and ``..`` included)."""
        if not directory.is_dir:
            raise InvalidInput(f"ext4 inode {directory.number} is not a directory")
        cached = self._dirs.get(directory.number)
        if cached is not None:
            return cached
        data = self.data(directory)
        names: dict[str, int] = {}
        for base in range(0, len(data), self.block_size):
            pos, end = base, min(base + self.block_size, len(data))
            while pos + 8 <= end:
                number, rec_len, name_len = struct.unpack_from("<IHB", data, pos)
                if rec_len in (0, 65535) and self.block_size == 65536:
                    rec_len = 65536
                if rec_len < 8 or pos + rec_len > end or 8 + name_len > rec_len:
                    raise InvalidInput(f"ext4 directory inode {directory.number} is damaged")
                if number:
                    name = data[pos + 8 : pos + 8 + name_len].decode(errors="surrogateescape")
                    names[name] = number
                pos += rec_len
        self._dirs[directory.number] = names
        return names

    def link_target(self, inode: Inode) -> str:
        # A short target lives in i_block itself (no blocks, no extent tree).
        if inode.size < 60 and not inode.flags & _EXTENTS_FL:
            raw = inode.block[: inode.size]
        else:
            raw = self.data(inode)
        return raw.decode(errors="surrogateescape")

    def lookup_no_follow(self, path: str) -> Inode:
        """The inode at ``path``; a symlink at its end is returned, not followed."""
        parent, _, name = path.rstrip("/").rpartition("/")
        number = self.entries(self.lookup(parent or "/")).get(name)
        if number is None:
            raise NotFound(f"{path}: no such file in the image")
        return self.inode(number)

    def lookup(self, path: str) -> Inode:
        """The inode at ``path`` (absolute, from the file system's root), following
        symlinks as the system booted from it would see them."""
        links = 0
        todo = [p for p in path.split("/") if p]
        trail: list[Inode] = [self.inode(_ROOT_INODE)]
        while todo:
            name = todo.pop(0)
            current = trail[-1]
            if name == ".":
                continue
            if name == "..":
                if len(trail) > 1:
                    trail.pop()
                continue
            number = self.entries(current).get(name)
            if number is None:
                raise NotFound(f"{path}: no such file in the image")
            found = self.inode(number)
            if found.is_link:
                links += 1
                if links > _MAX_LINKS:
                    raise InvalidInput(f"{path}: too many levels of symbolic links")
                target = self.link_target(found)
                if target.startswith("/"):
                    trail = trail[:1]
                todo = [p for p in target.split("/") if p] + todo
                continue
            trail.append(found)
        return trail[-1]

    def read_file(self, path: str) -> bytes:
        inode = self.lookup(path)
        if not inode.is_file:
            raise InvalidInput(f"{path} in the image is not a regular file")
        return self.data(inode)

    def listdir(self, path: str) -> dict[str, int]:
        return self.entries(self.lookup(path))


def is_ext(read: ReadAt, offset: int) -> bool:
    """Whether an ext2/3/4 superblock sits at ``offset``."""
    try:
        magic: int = struct.unpack_from("<H", read(offset + 1024 + 0x38, 2))[0]
        return magic == MAGIC
    except (InvalidInput, struct.error):
        return False
