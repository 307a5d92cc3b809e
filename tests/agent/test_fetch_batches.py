"""The agent's chunk batches: a prefix per answer, asked again for the rest; an envelope
damaged in transit is asked for again, three bad rounds are an error."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from lamina.agent.fetch import _batches_from
from lamina.errors import CorruptObject
from lamina.store import codec

HEAD = struct.Struct(">32sI")


class Manager:
    """Answers ``/chunks/batch`` with at most ``per_answer`` records."""

    def __init__(self, chunks: dict[bytes, bytes], per_answer: int, damage: int = 0) -> None:
        self.chunks, self.per_answer, self.damage = chunks, per_answer, damage
        self.asked: list[int] = []

    def request(self, method: str, path: str, **kw: Any) -> Any:
        assert (method, path) == ("POST", "/chunks/batch")
        ids = [bytes.fromhex(c) for c in kw["json"]["ids"]]
        self.asked.append(len(ids))
        body = b""
        for cid in ids[: self.per_answer]:
            envelope = self.chunks[cid]
            if self.damage:
                self.damage -= 1
                envelope = envelope[:-1] + bytes([envelope[-1] ^ 1])
            body += HEAD.pack(cid, len(envelope)) + envelope
        return type("Answer", (), {"content": body})()


def envelopes(n: int) -> dict[bytes, bytes]:
    out = {}
    for i in range(n):
        data = f"chunk {i}".encode() * 100
        cid = codec.chunk_id(data)
        out[cid] = codec.encode(data, cid)
    return out


def test_prefix_answers_are_continued_until_all_arrived() -> None:
    chunks = envelopes(7)
    manager = Manager(chunks, per_answer=3)
    got = dict(_batches_from(manager, list(chunks)))  # type: ignore[arg-type]
    assert got == chunks and manager.asked == [7, 4, 1]


def test_damaged_envelopes_are_asked_again_then_refused() -> None:
    chunks = envelopes(2)
    manager = Manager(chunks, per_answer=2, damage=1)
    assert dict(_batches_from(manager, list(chunks))) == chunks  # type: ignore[arg-type]
    assert manager.asked == [2, 1]
    hopeless = Manager(chunks, per_answer=1, damage=10)
    with pytest.raises(CorruptObject, match="three times"):
        list(_batches_from(hopeless, list(chunks)))  # type: ignore[arg-type]
