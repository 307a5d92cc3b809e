"""The line-level 3-way merge: clean merges, overlaps, edges (pure)."""

from __future__ import annotations

import pytest

from lamina.rebase.diff3 import TEXT_LIMIT, is_text, merge3

BASE = b"one\ntwo\nthree\nfour\nfive\nsix\n"


@pytest.mark.parametrize(
    ("mine", "theirs", "merged"),
    [
        (BASE, BASE, BASE),
        (BASE.replace(b"one", b"ONE"), BASE, BASE.replace(b"one", b"ONE")),
        (BASE, BASE.replace(b"six", b"SIX"), BASE.replace(b"six", b"SIX")),
        (
            BASE.replace(b"one", b"ONE"),
            BASE.replace(b"six", b"SIX"),
            b"ONE\ntwo\nthree\nfour\nfive\nSIX\n",
        ),
        (b"zero\n" + BASE, BASE + b"seven\n", b"zero\n" + BASE + b"seven\n"),
        (BASE.replace(b"two\n", b""), BASE.replace(b"five", b"5"), b"one\nthree\nfour\n5\nsix\n"),
        (BASE.replace(b"three", b"3"), BASE.replace(b"three", b"3"), BASE.replace(b"three", b"3")),
        (b"one\r\ntwo\r\n", b"one\r\ntwo\r\n", b"one\r\ntwo\r\n"),
        (
            BASE + b"no newline",
            BASE.replace(b"one", b"1"),
            BASE.replace(b"one", b"1") + b"no newline",
        ),
    ],
)
def test_clean_merges(mine: bytes, theirs: bytes, merged: bytes) -> None:
    result = merge3(BASE, mine, theirs)
    assert result.clean and result.data == merged and result.overlaps == 0


@pytest.mark.parametrize(
    ("mine", "theirs", "overlaps"),
    [
        (BASE.replace(b"three", b"mine"), BASE.replace(b"three", b"theirs"), 1),
        # adjacent lines with nothing unchanged between them overlap, as for GNU diff3
        (BASE.replace(b"three", b"mine"), BASE.replace(b"four", b"theirs"), 1),
        (
            BASE.replace(b"one", b"m1").replace(b"six", b"m6"),
            BASE.replace(b"one", b"t1").replace(b"six", b"t6"),
            2,
        ),
        (BASE + b"mine\n", BASE + b"theirs\n", 1),
    ],
)
def test_overlaps_keep_the_users_file(mine: bytes, theirs: bytes, overlaps: int) -> None:
    result = merge3(BASE, mine, theirs)
    assert not result.clean and result.data == mine and result.overlaps == overlaps


def test_both_added_from_nothing() -> None:
    assert not merge3(b"", b"a\n", b"b\n").clean
    assert merge3(b"", b"a\n", b"").data == b"a\n"
    assert merge3(b"", b"", b"b\n").data == b"b\n"


def test_text_detection() -> None:
    assert is_text(b"a=1\n", b"")
    assert not is_text(b"a\0b")
    assert not is_text(b"x" * (TEXT_LIMIT + 1))
