from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lamina.errors import CorruptObject
from lamina.store import codec


def test_compressible_chunk_is_compressed_and_round_trips() -> None:
    data = b"lamina " * 10000
    env = codec.encode(data)
    assert env[5] == codec.CODEC_ZSTD
    assert len(env) < len(data) // 10
    assert codec.decode(env) == data


def test_incompressible_chunk_is_stored_raw() -> None:
    data = os.urandom(65536)
    env = codec.encode(data)
    assert env[5] == codec.CODEC_RAW
    assert len(env) == codec.HEADER_SIZE + len(data)
    assert codec.decode(env, expected=codec.chunk_id(data)) == data


def test_envelope_header_carries_magic_version_and_id() -> None:
    data = b"x" * 100
    env = codec.encode(data)
    assert env[:4] == b"LMOB" and env[4] == 1
    assert codec.parse_header(env).chunk_id == codec.chunk_id(data)


def test_zero_detection() -> None:
    assert codec.is_zero(bytes(4096))
    assert not codec.is_zero(bytes(4095) + b"\x01")


@pytest.mark.parametrize("data", [b"a" * 5000, os.urandom(5000)], ids=["zstd", "raw"])
def test_every_flipped_byte_is_caught(data: bytes) -> None:
    env = codec.encode(data)
    for pos in range(0, len(env), max(1, len(env) // 400)):
        bad = bytearray(env)
        bad[pos] ^= 0x40
        with pytest.raises(CorruptObject):
            codec.decode(bytes(bad))


def test_wrong_expected_id_is_refused() -> None:
    env = codec.encode(b"payload")
    with pytest.raises(CorruptObject):
        codec.decode(env, expected=codec.chunk_id(b"other"))


@given(st.binary(max_size=2000))
def test_decoding_arbitrary_bytes_raises_only_corrupt_object(blob: bytes) -> None:
    with contextlib.suppress(CorruptObject):
        codec.decode(blob)
