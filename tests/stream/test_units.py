"""Pure parts of streaming: cache index, hydration order, rate limit, backoff, profiles."""

from __future__ import annotations

import os
import random
import time

import pytest

from lamina.errors import CorruptObject
from lamina.image import Manifest
from lamina.image import profile as profiles
from lamina.serve import profile
from lamina.store import ZERO_ID, chunk_id
from lamina.stream import index as idx
from lamina.stream.index import CacheIndex, mark_runs
from lamina.stream.rate import Backoff, RateMeter, TokenBucket
from lamina.stream.schedule import Hydration
from lamina.stream.stack import StackState

CS = 1024


def manifest(ids: list[bytes], size: int | None = None) -> Manifest:
    return Manifest(size if size is not None else len(ids) * CS, CS, b"".join(ids))


def ids(*names: str) -> list[bytes]:
    return [ZERO_ID if n == "0" else chunk_id(n.encode()) for n in names]


# -- index ---------------------------------------------------------------------------------


def test_index_counts_zero_chunks_as_cached_and_fills_every_position_of_an_id() -> None:
    m = manifest(ids("a", "0", "b", "a", "0"), size=4 * CS + 100)  # short last chunk
    index = CacheIndex(m)
    assert index.size == 4 * CS + 100
    assert index.cached_bytes == CS + 100 and index.data_bytes == 3 * CS
    assert not index.complete and index.missing_ids == 2
    assert index.missing(0, 5 * CS) == ids("a", "b")  # once each, in order
    assert index.positions[ids("a")[0]] == [0, 3]
    assert sorted(index.add(ids("a")[0])) == [0, 3]
    assert index.add(ids("a")[0]) == []  # already there
    assert index.is_cached(3) and not index.is_cached(2)
    assert index.all_cached(3 * CS, CS + 100) and not index.all_cached(CS, 2 * CS)
    assert index.take_pending() == [0, 3] and index.take_pending() == []
    index.add(ids("b")[0])
    assert index.complete and index.missing_ids == 0 and index.missing(0, 10) == []


def test_index_marks_on_disk_only_trust_value_one_and_the_header_checks_geometry() -> None:
    m = manifest(ids("a", "b", "c"))
    mid = chunk_id(m.to_bytes())
    head = idx.header(m, mid)
    assert len(head) == idx.HEADER_SIZE
    idx.check_header(head, m, mid)
    with pytest.raises(CorruptObject):
        idx.check_header(head, m, bytes(32))
    with pytest.raises(CorruptObject):
        idx.check_header(b"LMSX" + head[4:], m, mid)
    index = CacheIndex(m, bytes([1, 7, 0]))  # 7: garbage, not a mark
    assert [index.is_cached(i) for i in range(3)] == [True, False, False]
    assert index.cached_data_bytes == CS


def test_a_chunk_with_only_some_positions_marked_loads_as_missing_and_is_marked_everywhere() -> (
    None
):
    # "a" at 0 and 2: a crash between the two runs of marks kept position 0 only
    m = manifest(ids("a", "b", "a", "c"))
    a, b, c = ids("a", "b", "c")
    index = CacheIndex(m, bytes([1, 1, 0, 0]))
    assert [index.is_cached(i) for i in range(4)] == [False, True, False, False]
    assert index.missing_ids == 2 and not index.id_cached(a) and index.id_cached(b)
    assert index.cached_data_bytes == CS and index.missing(0, CS) == [a]
    assert Hydration(index).take(10) == [a, c]  # hydration fetches it again
    assert sorted(index.add(a)) == [0, 2]  # and every position gets its mark
    assert index.take_pending() == [0, 2]
    assert index.missing(2 * CS, CS) == [] and index.missing_ids == 1
    index.add(c)
    assert index.complete and index.missing_ids == 0
    # all positions marked: cached as before
    assert CacheIndex(m, bytes([1, 1, 1, 1])).complete


def test_mark_runs_groups_positions() -> None:
    assert mark_runs([5, 1, 2, 3, 9, 2]) == [(1, 3), (5, 1), (9, 1)]
    assert mark_runs([]) == []


# -- hydration order -------------------------------------------------------------------------


def test_hydration_takes_the_profile_first_then_the_rest_by_position() -> None:
    m = manifest(ids("a", "b", "c", "0", "d", "b", "e"))
    index = CacheIndex(m)
    h = Hydration(index, profile=[4, 2, 99, 3, 4])  # 99: out of range, 3: zeros, 4: twice
    a, b, c, _, d, _, e = ids("a", "b", "c", "0", "d", "b", "e")
    assert h.order == [d, c, a, b, e] and h.profiled == 2
    assert h.profile_ids() == {d, c}
    assert h.take(2) == [d, c]
    # in flight elsewhere: skipped, and taken again once it is no longer busy
    assert h.take(10, busy={d, c}) == [a, b, e]
    index.add(d)
    assert h.take(1, busy={c}) == [a]
    for cid in (c, a, b, e):
        index.add(cid)
    assert h.take(10) == [] and h.done


def test_hydration_skips_what_reads_fetched_meanwhile() -> None:
    m = manifest(ids("a", "b", "c"))
    index = CacheIndex(m)
    h = Hydration(index)
    index.add(ids("b")[0])
    assert h.take(10) == ids("a", "c")


# -- rate and retries ---------------------------------------------------------------------------


def test_token_bucket_keeps_the_average_and_lets_demand_reads_through() -> None:
    bucket = TokenBucket(1000.0, now=0.0)
    assert bucket.delay(0.0) == 0.0
    bucket.charge(3000, 0.0)  # a burst beyond the bucket: the debt must be waited out
    assert bucket.delay(0.0) == pytest.approx(2.0)
    assert bucket.delay(1.0) == pytest.approx(1.0)
    assert bucket.delay(2.5) == 0.0
    # simulated hydration: fetch 100-byte pieces whenever allowed, for 10 s
    bucket, now, sent = TokenBucket(1000.0, now=0.0), 0.0, 0
    while now < 10.0:
        now += bucket.delay(now)
        bucket.charge(100, now)
        sent += 100
    assert 9_000 <= sent <= 11_200
    unlimited = TokenBucket(None)
    unlimited.charge(10**12, 0.0)
    assert unlimited.delay(0.0) == 0.0
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    b = Backoff(base=0.1, cap=1.0, rng=random.Random(1))
    waits = [b.next() for _ in range(10)]
    assert 0.05 <= waits[0] <= 0.1
    assert all(0.5 <= w <= 1.0 for w in waits[5:])
    b.reset()
    assert b.next() <= 0.1


def test_rate_meter_window() -> None:
    meter = RateMeter(window=2.0)
    meter.add(1000, 0.0)
    meter.add(1000, 1.0)
    assert meter.rate(1.5) == 1000.0
    assert meter.rate(2.5) == 500.0
    assert meter.rate(10.0) == 0.0 and meter.total == 2000


# -- profiles -------------------------------------------------------------------------------------


def test_boot_recorder_notes_first_reads_in_order() -> None:
    rec = profile.BootRecorder(chunk_size=CS, count=10)
    rec.note(5 * CS + 10, 10)
    rec.note(0, 2 * CS + 1)  # chunks 0, 1, 2
    rec.note(5 * CS, CS)
    rec.note(9 * CS, 5 * CS)  # clipped at the end of the image
    assert rec.order == [5, 0, 1, 2, 9]


def test_profile_merge_and_encoding() -> None:
    assert profiles.merge([3, 1], [1, 7, 3, 8]) == [3, 1, 7, 8]
    order = [random.randrange(1 << 31) for _ in range(1000)]
    assert profiles.decode(profiles.encode(order)) == order
    assert len(profiles.encode([1, 2])) == 8


class _Device:
    def __init__(self) -> None:
        self.info = None
        self.closed = False

    def read(self, offset: int, length: int) -> list[memoryview]:
        return [memoryview(bytes(length))]

    def close(self) -> None:
        self.closed = True


def test_recording_device_hands_over_the_order_once_at_close() -> None:
    got: list[list[int]] = []
    inner = _Device()
    dev = profile.RecordingDevice(inner, profile.BootRecorder(CS, 8), got.append, window=60)  # type: ignore[arg-type]
    dev.read(3 * CS, 10)
    dev.read(0, 10)
    dev.close()
    dev.finish()
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)  # handed over on a thread of its own
    time.sleep(0.05)
    assert got == [[3, 0]] and inner.closed
    dev.read(5 * CS, 1)  # after the window: forwarded, not noted
    assert got == [[3, 0]]


# -- sync state -------------------------------------------------------------------------------------


def test_stack_state_walks_seal_upload_merge() -> None:
    s = StackState()
    assert s.layers() == ["synced", "d000001"] and s.next_step() == "seal"
    sealed = s.seal("u1")
    assert sealed.layers() == ["synced", "d000001", "d000002"]
    assert sealed.next_step() == "upload" and sealed.upload_id == "u1"
    with pytest.raises(ValueError):
        sealed.seal("u2")
    with pytest.raises(ValueError):
        sealed.merged()
    confirmed = sealed.confirm()
    assert confirmed.next_step() == "merge"
    done = confirmed.merged()
    assert done.layers() == ["synced", "d000002"] and done.next_step() == "seal"
    assert StackState.from_json(confirmed.to_json()) == confirmed
    dropped = confirmed.dropped()
    assert dropped.layers() == ["synced", "d000003"] and dropped.upload_id is None
    with pytest.raises(CorruptObject):
        StackState.from_json({"format": "x"})


# -- hydration claims and batch framing ----------------------------------------------------------


def test_batch_answers_split_into_envelopes_until_the_framing_breaks() -> None:
    from lamina.store import codec
    from lamina.stream.hydrate import split_envelopes

    chunks = [os.urandom(3000), b"x" * 5000, os.urandom(10)]
    cids = [chunk_id(c) for c in chunks]
    body = b"".join(codec.encode(c) for c in chunks)
    items, error = split_envelopes(body, cids)
    assert error is None
    assert [codec.decode(env, expected=cid) for cid, env in items] == chunks
    second = len(codec.encode(chunks[0]))
    broken = body[:second] + b"XXXX" + body[second + 4 :]  # the second header's magic
    items, error = split_envelopes(broken, cids)
    assert len(items) == 1 and isinstance(error, CorruptObject)


def test_claims_hand_out_the_profile_first_and_hold_the_rest_while_a_machine_boots() -> None:
    import asyncio
    import logging
    from types import SimpleNamespace

    from lamina.stream.fetch import Fetcher

    m = manifest(ids("a", "b", "c", "d"))
    files = SimpleNamespace(index=CacheIndex(m), manifest=m)

    async def go() -> None:
        f = Fetcher(None, files, None, logging.getLogger("t"), bucket=TokenBucket(None))  # type: ignore[arg-type]
        h = Hydration(files.index, profile=[2])
        f.boot_begins()
        first = f.claim(h, 10)
        assert first.ids == ids("c") and first.reserved == CS  # the profile, booting or not
        assert f.claim(h, 10).wait > 0  # the rest waits: the profile chunk is on its way
        f.delivered(first, CS, [None])
        assert h.profile_done and f.claim(h, 10).wait > 0  # still booting
        f.boot_ends()
        rest = f.claim(h, 10)
        assert rest.ids == ids("a", "b", "d")
        f.failed(rest, LookupError("refused"))
        again = f.claim(h, 2)  # failed chunks come back
        assert again.ids == ids("a", "b")
        f.delivered(again, 2 * CS, [None, CorruptObject("bad")])
        assert f.counters.corrupt == 1 and f.claim(h, 10).ids == ids("b", "d")

    asyncio.run(go())


def test_claims_keep_to_the_rate() -> None:
    import asyncio
    import logging
    from types import SimpleNamespace

    from lamina.stream.fetch import Fetcher

    m = manifest(ids("a", "b", "c", "d"))
    files = SimpleNamespace(index=CacheIndex(m), manifest=m)

    async def go() -> None:
        bucket = TokenBucket(CS / 2, now=time.monotonic())  # half a chunk per second
        f = Fetcher(None, files, None, logging.getLogger("t"), bucket=bucket)  # type: ignore[arg-type]
        h = Hydration(files.index)
        first = f.claim(h, 1)
        assert first.ids == ids("a")
        f.delivered(first, CS, [None])
        blocked = f.claim(h, 1)
        # a chunk taken against half a chunk of tokens: a second of debt to wait out
        assert not blocked.ids and 0.9 < blocked.wait <= 1.0

    asyncio.run(go())


def test_rate_option_parsing() -> None:
    from lamina.cli.stream import parse_rate
    from lamina.errors import UsageError

    assert parse_rate("20M") == 20 << 20 and parse_rate("512KiB") == 512 << 10
    assert parse_rate("1.5G/s") == 1.5 * (1 << 30) and parse_rate("2500") == 2500
    assert parse_rate(None) is None and parse_rate("0") is None
    with pytest.raises(UsageError):
        parse_rate("fast")
