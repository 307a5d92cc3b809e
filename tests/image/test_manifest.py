from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lamina.errors import CorruptObject
from lamina.image import Manifest
from lamina.store import ZERO_ID, chunk_id


def test_round_trip_and_geometry() -> None:
    m = Manifest.empty(10 * 4096 + 100, 4096)
    assert m.count == 11 and m.chunk_len(10) == 100
    m2 = m.replace({3: chunk_id(b"x")})
    assert Manifest.from_bytes(m2.to_bytes()) == m2
    assert m2.referenced() == {chunk_id(b"x")}
    assert m.id_at(3) == ZERO_ID


def test_spans_cover_a_range_exactly() -> None:
    m = Manifest.empty(1 << 20, 4096)
    assert list(m.spans(4000, 200)) == [(0, 4000, 96), (1, 0, 104)]


@given(st.integers(0, 1 << 16), st.integers(0, 1 << 16))
def test_spans_property(offset: int, length: int) -> None:
    m = Manifest.empty(1 << 18, 1000)
    spans = list(m.spans(offset, length))
    assert sum(n for _, _, n in spans) == length
    pos = offset
    for index, within, n in spans:
        assert index * 1000 + within == pos and 0 < n <= 1000 - within
        pos += n


@given(st.binary(max_size=200))
def test_parsing_garbage_raises_corrupt(blob: bytes) -> None:
    with pytest.raises(CorruptObject):
        Manifest.from_bytes(blob)


@pytest.mark.parametrize("bad", ["mx\n", "a b", "-lead", "x" * 101, "a/b", "a@1", ""])
def test_names_refuse_anything_but_the_plain_alphabet(bad: str) -> None:
    from lamina.errors import UsageError
    from lamina.names import check_name

    with pytest.raises(UsageError):
        check_name(bad)
