"""Pack files: many envelopes in one immutable object, with a trailer to rebuild the index.

    offset        size  field
    0             4     magic b"LMPK"
    4             1     pack version (1)
    5             3     reserved, zero
    8             ...   envelopes back to back (see codec)
    T             44*n  trailer: per envelope, chunk id (32), offset (u64), size (u32)
    end-48        48    footer: trailer offset (u64), count (u32), BLAKE3 of the trailer
                        (32), magic b"LMPE"

Packs are written whole (the backend's put is atomic), so a crash leaves either a complete
pack or none; the trailer lets the index be rebuilt from the packs alone.
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

ReadFn = Callable[[int, int], bytes]  # read(offset, length) -> bytes


@dataclass(frozen=True, slots=True)
class Entry:
    chunk_id: bytes
    offset: int
    size: int  # envelope size, header included


class PackBuilder:
    """Accumulates envelopes in memory until the pack is sealed."""

    def __init__(self) -> None:
        self.buf = bytearray(PACK_HEADER)
        self.entries: list[Entry] = []
        self._ids: set[bytes] = set()

    def __len__(self) -> int:
        return len(self.buf)

    def __contains__(self, cid: bytes) -> bool:
        return cid in self._ids

    def add(self, cid: bytes, envelope: bytes) -> Entry:
        entry = Entry(cid, len(self.buf), len(envelope))
        self.buf += envelope
        self.entries.append(entry)
        self._ids.add(cid)
        return entry

    def envelope(self, cid: bytes) -> bytes:
        for e in self.entries:
            if e.chunk_id == cid:
                return bytes(self.buf[e.offset : e.offset + e.size])
        raise KeyError(cid.hex())

    def seal(self) -> bytearray:
        trailer_at = len(self.buf)
        trailer = b"".join(ENTRY.pack(e.chunk_id, e.offset, e.size) for e in self.entries)
        self.buf += trailer
        self.buf += FOOTER.pack(
            trailer_at, len(self.entries), blake3.blake3(trailer).digest(), FOOTER_MAGIC
        )
        return self.buf


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
    if expect != trailer_at:
        raise CorruptObject(f"pack {name}: {trailer_at - expect} unaccounted bytes before trailer")
