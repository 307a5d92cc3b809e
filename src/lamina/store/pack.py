"""Pack files: many envelopes in one immutable object, with a trailer to rebuild the index.

    offset        size  field
    0             4     magic b"LMPK"
    4             1     pack version (1)
    5             3     reserved, zero
    8             ...   envelopes back to back (see codec)
    ...           < 4K  zero padding, so that the pack's size is a multiple of 4096
    T             44*n  trailer: per envelope, chunk id (32), offset (u64), size (u32)
    end-48        48    footer: trailer offset (u64), count (u32), BLAKE3 of the trailer
                        (32), magic b"LMPE"

Packs are written whole (the backend's put is atomic), so a crash leaves either a complete
pack or none; the trailer lets the index be rebuilt from the packs alone. The padding lets
a local backend write packs with O_DIRECT.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

import blake3

from lamina.errors import CorruptObject
from lamina.store import codec

PACK_MAGIC: Final = b"LMPK"
PACK_VERSION: Final = 1
PACK_HEADER: Final = PACK_MAGIC + bytes([PACK_VERSION, 0, 0, 0])
ENTRY = struct.Struct("<32sQI")
FOOTER = struct.Struct("<QI32s4s")
FOOTER_MAGIC: Final = b"LMPE"
PACK_ALIGN: Final = 4096

ReadFn = Callable[[int, int], bytes]  # read(offset, length) -> bytes
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Entry:
    chunk_id: bytes
    offset: int
    size: int  # envelope size, header included


class PackBuilder:
    """Collects envelopes (as header and payload parts, never concatenated) until the pack
    is sealed and written with one gathered write."""

    def __init__(self) -> None:
        self.parts: list[Buffer] = [PACK_HEADER]
        self.size = len(PACK_HEADER)
        self.entries: list[Entry] = []
        self.ids: set[bytes] = set()

    def __len__(self) -> int:
        return self.size

    def __contains__(self, cid: bytes) -> bool:
        return cid in self.ids

    def add(self, cid: bytes, *parts: Buffer) -> Entry:
        n = sum(len(p) for p in parts)
        entry = Entry(cid, self.size, n)
        self.parts.extend(parts)
        self.size += n
        self.entries.append(entry)
        self.ids.add(cid)
        return entry

    def seal(self) -> list[Buffer]:
        trailer = b"".join(ENTRY.pack(e.chunk_id, e.offset, e.size) for e in self.entries)
        pad = -(self.size + len(trailer) + FOOTER.size) % PACK_ALIGN
        digest = blake3.blake3(trailer).digest()
        footer = FOOTER.pack(self.size + pad, len(self.entries), digest, FOOTER_MAGIC)
        self.parts += [bytes(pad), trailer, footer]
        self.size += pad + len(trailer) + len(footer)
        return self.parts


def read_trailer(read: ReadFn, size: int, name: str) -> list[Entry]:
    """The entries of a pack from its trailer, checked against the footer's hash."""
    if size < len(PACK_HEADER) + FOOTER.size:
        raise CorruptObject(f"pack {name}: too small ({size} bytes)")
    trailer_at, count, digest, magic = FOOTER.unpack(read(size - FOOTER.size, FOOTER.size))
    if magic != FOOTER_MAGIC or trailer_at + count * ENTRY.size + FOOTER.size != size:
        raise CorruptObject(f"pack {name}: bad footer")
    trailer = read(trailer_at, count * ENTRY.size)
    if blake3.blake3(trailer).digest() != digest:
        raise CorruptObject(f"pack {name}: trailer hash mismatch")
    return [Entry(*ENTRY.unpack_from(trailer, i * ENTRY.size)) for i in range(count)]


def scan(data: bytes, name: str) -> Iterator[tuple[Entry, bytes | CorruptObject]]:
    """Walk every envelope of a whole pack, yielding its plaintext or what is wrong with it.

    Every byte of the pack is accounted for: header, each envelope, trailer and footer.
    Raises CorruptObject when the pack's structure itself is broken.
    """
    if data[:8] != PACK_HEADER:
        raise CorruptObject(f"pack {name}: bad header")
    entries = read_trailer(lambda o, n: data[o : o + n], len(data), name)
    expect = len(PACK_HEADER)
    for entry in entries:
        if entry.offset != expect:
            raise CorruptObject(f"pack {name}: trailer entry out of sequence at {entry.offset}")
        expect += entry.size
        blob = data[entry.offset : entry.offset + entry.size]
        try:
            head = codec.parse_header(blob, f"pack {name} @{entry.offset}")
            if head.size != entry.size:
                raise CorruptObject(f"pack {name} @{entry.offset}: size disagrees with trailer")
            codec.decode(blob, expected=entry.chunk_id)
            yield entry, blob
        except CorruptObject as exc:
            if exc.chunk_id is None:
                exc.chunk_id = entry.chunk_id
            yield entry, exc
    trailer_at = FOOTER.unpack(data[-FOOTER.size :])[0]
    padding = data[expect:trailer_at]
    if not 0 <= trailer_at - expect < PACK_ALIGN or padding.count(0) != len(padding):
        raise CorruptObject(f"pack {name}: {trailer_at - expect} unaccounted bytes before trailer")
