"""Boot profiles: an image version's chunks in the order a boot first read them.

The block server records one while a machine boots (``lamina.serve.profile``), the manager
keeps it per image version (``lamina.manager.services.profiles``: the order as u32 chunk
indices, little-endian), and a stream endpoint fetches those chunks first
(``lamina.stream.schedule``). After ``MAX_BOOTS`` boots a profile is settled.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Iterable
from typing import Final

# Desktop boots reach a login screen in 20-60 s; the demo VM is done in ~3 s.
WINDOW: Final = 60.0
MAX_BOOTS: Final = 8


def encode(order: Iterable[int]) -> bytes:
    data = array.array("I", order)
    if sys.byteorder != "little":
        data.byteswap()
    return data.tobytes()


def decode(blob: bytes) -> list[int]:
    data = array.array("I")
    data.frombytes(blob[: len(blob) - len(blob) % 4])
    if sys.byteorder != "little":
        data.byteswap()
    return data.tolist()


def merge(old: list[int], new: list[int]) -> list[int]:
    """The profile after one more boot: known chunks keep their rank, new ones follow."""
    known = set(old)
    out = list(old)
    for i in new:
        if i not in known:
            known.add(i)
            out.append(i)
    return out
