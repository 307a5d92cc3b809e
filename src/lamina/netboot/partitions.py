"""A disk's partitions, read from its MBR or GPT (sans-I/O: bytes in, ranges out).

Formats, as parsed here:

- MBR: sector 0 ends with ``55 AA``; four 16-byte entries at 446 (type at +4, first LBA
  at +8, sector count at +12, little-endian). Type 0xEE marks a protective MBR (the disk
  is GPT); types 0x05, 0x0F and 0x85 an extended partition, whose chain of EBRs holds
  the logical partitions, numbered from 5 as Linux numbers them.
- GPT: the header at LBA 1 starts with ``EFI PART`` (revision 1.0, checked); the entry
  array's LBA at +72, entry count at +80 and entry size at +84; an entry is used when its
  type GUID (16 bytes at 0) is not zero, and spans first LBA (+32) to last LBA (+40),
  inclusive. Partition N is entry N-1.

Sectors are 512 bytes (a 4 KiB-sector GPT is found by its header at byte 4096).
No partition table at all: the whole disk is one file system, numbered 0.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from lamina.errors import InvalidInput

ReadAt = Callable[[int, int], bytes]  # (offset, length) -> exactly length bytes

SECTOR = 512
_GPT_MAGIC = b"EFI PART"
_GPT_REVISION = 0x00010000
_EXTENDED = frozenset({0x05, 0x0F, 0x85})
_PROTECTIVE = 0xEE
_MAX_LOGICAL = 64  # an EBR chain longer than this is a loop in a damaged table
_MAX_GPT_ENTRIES = 1024


@dataclass(frozen=True, slots=True)
class Partition:
    number: int  # as Linux names it (/dev/nbd0pN); 0 for a disk without a table
    offset: int  # bytes from the start of the disk
    size: int  # bytes


def partitions(read: ReadAt, disk_size: int) -> list[Partition]:
    """The partitions of the disk, in table order; the whole disk when it has no table."""
    sector0 = read(0, SECTOR)
    if sector0[510:512] != b"\x55\xaa":
        return [Partition(0, 0, disk_size)]
    entries = _mbr_entries(sector0)
    if any(kind == _PROTECTIVE for kind, _, _ in entries):
        return _gpt(read, disk_size)
    found: list[Partition] = []
    for number, (kind, first, count) in enumerate(entries, start=1):
        if kind == 0 or count == 0:
            continue
        if kind in _EXTENDED:
            found += _logical(read, first, disk_size)
        else:
            found.append(_checked(Partition(number, first * SECTOR, count * SECTOR), disk_size))
    return found


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int]]:
    out = []
    for i in range(4):
        base = 446 + 16 * i
        kind = sector[base + 4]
        first, count = struct.unpack_from("<II", sector, base + 8)
        out.append((kind, first, count))
    return out


def _logical(read: ReadAt, extended_start: int, disk_size: int) -> list[Partition]:
    """The logical partitions of an extended partition: each EBR's first entry is one,
    its second points at the next EBR (relative to the extended partition's start)."""
    found: list[Partition] = []
    ebr = extended_start
    for number in range(5, 5 + _MAX_LOGICAL):
        sector = read(ebr * SECTOR, SECTOR)
        if sector[510:512] != b"\x55\xaa":
            break
        (kind, first, count), (next_kind, next_first, _), *_ = _mbr_entries(sector)
        if kind and count:
            found.append(
                _checked(Partition(number, (ebr + first) * SECTOR, count * SECTOR), disk_size)
            )
        if next_kind not in _EXTENDED or next_first == 0:
            break
        ebr = extended_start + next_first
    return found


def _gpt(read: ReadAt, disk_size: int) -> list[Partition]:
    for sector in (SECTOR, 4096):
        header = read(sector, 92)
        if header[:8] == _GPT_MAGIC:
            break
    else:
        raise InvalidInput("the disk has a protective MBR but no GPT header")
    revision = struct.unpack_from("<I", header, 8)[0]
    if revision != _GPT_REVISION:
        raise InvalidInput(f"GPT revision {revision:#x} is not 1.0")
    table_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    if not 0 < count <= _MAX_GPT_ENTRIES or not 128 <= entry_size <= 1024:
        raise InvalidInput(f"GPT header lists {count} entries of {entry_size} bytes")
    table = read(table_lba * sector, count * entry_size)
    found = []
    for i in range(count):
        entry = table[i * entry_size : (i + 1) * entry_size]
        if entry[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last < first:
            raise InvalidInput(f"GPT partition {i + 1} ends before it starts")
        found.append(
            _checked(Partition(i + 1, first * sector, (last - first + 1) * sector), disk_size)
        )
    return found


def _checked(part: Partition, disk_size: int) -> Partition:
    if part.offset + part.size > disk_size:
        raise InvalidInput(
            f"partition {part.number} ends at byte {part.offset + part.size}, "
            f"past the end of the {disk_size}-byte disk"
        )
    return part
