"""`lamina stream` against a real `lamina serve`, read by qemu-img and qemu-io: on-demand
reads, hydration, offline service, corrupt transfers, outages, kill -9."""

from __future__ import annotations

import filecmp
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Cli
from tests.servers import Server, wait_for
from tests.stream.conftest import (
    CHUNK,
    PATTERN_AT,
    Endpoint,
    convert,
    make_image,
    qemu_io,
    read_range,
)
from tests.stream.proxy import Proxy

pytestmark = pytest.mark.peers


def test_reads_before_any_hydration_fetch_only_what_they_need(
    image: Path, admin: str, server: Server, stream: Callable[..., Endpoint], tmp_path: Path
) -> None:
    server.start()
    ep = stream("img", "--from", server.http_url, "--token", admin, "--no-hydrate")
    status = ep.status()
    assert status["running"] and status["cached_data_bytes"] == 0 and not status["complete"]
    src = image.read_bytes()
    # a pattern check by qemu-io: one chunk fetched, nothing else
    done = qemu_io(ep.url, f"read -P 0xa5 {PATTERN_AT} 65536", read_only=True)
    assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, done.stdout
    assert ep.status()["cached_data_bytes"] == CHUNK
    # a range straddling two chunks, one of them a zero chunk (never fetched)
    got = read_range(ep.port, "img", 2 * 1024 * 1024 - 1024, 5120, tmp_path / "r1")
    assert got == src[2 * 1024 * 1024 - 1024 : 2 * 1024 * 1024 + 4096]
    status = ep.status()
    assert status["cached_data_bytes"] == 2 * CHUNK and status["demand_chunks"] == 2
    # every byte, read before anything else was hydrated
    assert filecmp.cmp(convert(ep.url, tmp_path / "all.raw"), image, shallow=False)
    status = ep.status()
    assert status["complete"] and status["fetched_chunks"] == status["demand_chunks"]
    # the duplicated chunk was fetched once for both places
    assert status["fetched_chunks"] == (status["data_bytes"] // CHUNK) - 1


def test_hydration_then_offline_with_the_manager_killed_and_after_a_restart(
    image: Path, admin: str, server: Server, stream: Callable[..., Endpoint], tmp_path: Path
) -> None:
    server.start()
    ep = stream("img", "--from", server.http_url, "--token", admin)
    status = ep.wait_complete()
    assert status["cached_bytes"] == status["size"] == 8 << 20
    assert status["demand_chunks"] == 0  # all of it by background hydration
    server.stop(signal.SIGKILL)
    assert filecmp.cmp(convert(ep.url, tmp_path / "a.raw"), image, shallow=False)
    ep.stop(signal.SIGKILL)
    ep.start()  # the manager is still gone
    assert ep.status()["complete"]
    assert filecmp.cmp(convert(ep.url, tmp_path / "b.raw"), image, shallow=False)
    write = qemu_io(ep.url, "write -P 0x11 0 4096")
    assert write.returncode != 0  # an image without --machine is read-only


def test_a_chunk_corrupted_in_transit_is_fetched_again(
    image: Path, admin: str, server: Server, stream: Callable[..., Endpoint], tmp_path: Path
) -> None:
    server.start()
    proxy = Proxy(server.http_url)
    try:
        proxy.corrupt_left = 3  # the first three chunk answers are damaged
        ep = stream("img", "--from", proxy.url, "--token", admin, "--no-hydrate")
        assert filecmp.cmp(convert(ep.url, tmp_path / "a.raw"), image, shallow=False)
        status = ep.status()
        assert proxy.corrupted == 3 and status["corrupt_refetched"] >= 3
        assert any(e["event"] == "corrupt-chunk" for e in ep.events())
        # and with hydration (chunk batches) too, on a fresh cache
        proxy.corrupt_left = 2
        ep2 = stream("img", "--from", proxy.url, "--token", admin, cache="cache2")
        ep2.wait_complete()
        assert ep2.status()["corrupt_refetched"] >= 2
        server.stop(signal.SIGKILL)
        assert filecmp.cmp(convert(ep2.url, tmp_path / "b.raw"), image, shallow=False)
    finally:
        proxy.close()


def test_manager_outage_mid_hydration_recovers_by_itself(
    image: Path, admin: str, server: Server, stream: Callable[..., Endpoint], tmp_path: Path
) -> None:
    server.start()
    proxy = Proxy(server.http_url)
    try:
        ep = stream("img", "--from", proxy.url, "--token", admin, "--rate", "1M", "--timeout", "2")
        wait_for(lambda: ep.status()["cached_data_bytes"] >= 2 * CHUNK, 20)
        proxy.down = True  # the manager goes away mid-hydration
        time.sleep(1.5)
        status = ep.status()
        assert status["online"] is False and not status["complete"]
        cached = status["cached_data_bytes"]
        time.sleep(1.0)
        assert ep.status()["cached_data_bytes"] == cached  # no progress while away
        # cached chunks still read (chunk 0 comes first: there is no profile)
        src = image.read_bytes()
        assert read_range(ep.port, "img", 0, CHUNK, tmp_path / "r0") == src[:CHUNK]
        # a missing one waits --timeout, then EIO
        started = time.monotonic()
        failed = qemu_io(ep.url, "read 7340032 4096", read_only=True)
        waited = time.monotonic() - started
        assert failed.returncode != 0 or "error" in (failed.stdout + failed.stderr).lower()
        assert 1.5 <= waited < 15, waited
        # a restart while the manager is away: serves at once from what it has
        ep.stop(signal.SIGKILL)
        ep.start()
        status = ep.status()
        assert status["running"] and status["cached_data_bytes"] >= cached
        assert read_range(ep.port, "img", 0, CHUNK, tmp_path / "r1") == src[:CHUNK]
        proxy.down = False  # it comes back: hydration resumes without help
        status = ep.wait_complete(timeout=60)
        assert status["online"] is True
        events = [e["event"] for e in ep.events()]
        assert "offline" in events and events.index("offline") < len(events) - 1
        server.stop(signal.SIGKILL)
        assert filecmp.cmp(convert(ep.url, tmp_path / "a.raw"), image, shallow=False)
    finally:
        proxy.close()


def test_kill_9_at_any_time_never_serves_wrong_data(
    image: Path, admin: str, server: Server, stream: Callable[..., Endpoint], tmp_path: Path
) -> None:
    server.start()
    ep = stream("img", "--from", server.http_url, "--token", admin, "--rate", "2M")
    rng = random.Random(8)
    for round_ in range(4):
        time.sleep(rng.uniform(0.1, 0.6))
        ep.stop(signal.SIGKILL)
        # whatever the index says is cached must be exactly the image's bytes
        data = (ep.cache / "data").read_bytes()
        index = (ep.cache / "index").read_bytes()[4096:]
        src = image.read_bytes()
        for i, mark in enumerate(index):
            if mark == 1:
                assert data[i * CHUNK : (i + 1) * CHUNK] == src[i * CHUNK : (i + 1) * CHUNK], (
                    round_,
                    i,
                )
        ep.start()
    status = ep.wait_complete(timeout=60)
    assert status["complete"]
    server.stop(signal.SIGKILL)
    assert filecmp.cmp(convert(ep.url, tmp_path / "a.raw"), image, shallow=False)


def test_a_repeated_chunk_with_a_mark_lost_in_a_crash_is_fetched_again_and_completes(
    image: Path, admin: str, server: Server, stream: Callable[..., Endpoint], tmp_path: Path
) -> None:
    server.start()
    ep = stream("img", "--from", server.http_url, "--token", admin)
    ep.wait_complete()
    ep.stop(signal.SIGKILL)
    # the chunk at 5 MiB is also at 6 MiB; a crash between the runs of marks kept only
    # the first of its two marks
    first, second = (5 << 20) // CHUNK, (6 << 20) // CHUNK
    with open(ep.cache / "index", "r+b") as f:
        f.seek(4096 + first)
        assert f.read(1) == b"\x01"
        f.seek(4096 + second)
        f.write(b"\x00")
    ep.start()
    status = ep.wait_complete(timeout=30)
    assert status["fetched_chunks"] == 1
    marks = (ep.cache / "index").read_bytes()[4096:]
    assert marks[first] == marks[second] == 1
    server.stop(signal.SIGKILL)
    assert filecmp.cmp(convert(ep.url, tmp_path / "a.raw"), image, shallow=False)


def test_a_cache_whose_version_the_manager_holds_with_other_content_is_refused(
    image: Path, admin: str, server: Server, stream: Callable[..., Endpoint], tmp_path: Path
) -> None:
    server.start()
    ep = stream("img", "--from", server.http_url, "--token", admin)
    ep.wait_complete()
    ep.stop()
    # the manager is rebuilt (a new database): img@1 comes back with other content
    other_home = tmp_path / "other-home"
    other = Cli(other_home)
    other("init")
    other("image", "import", "img", str(make_image(tmp_path / "other.raw")))
    assert other("image", "list", "--json").json()[0]["latest"] == 1
    rebuilt = Server(other_home, tmp_path / "other-serve.log")
    rebuilt.start()
    try:
        token = other("admin", "token").out.strip()
        ep.args = ["img", "--from", rebuilt.http_url, "--token", token]
        ep.start(wait=False)
        assert ep.proc is not None and ep.proc.wait(timeout=30) == 9
        error = ep.log.read_text().strip().splitlines()[-1]
        assert "caches img@1 with manifest" in error and "new --cache" in error
    finally:
        rebuilt.stop()
    # offline there is nothing to check against: what is cached is served, and said so
    ep.start()
    assert any(e["event"] == "manifest-unchecked" for e in ep.events())
    assert filecmp.cmp(convert(ep.url, tmp_path / "a.raw"), image, shallow=False)


def test_boot_profile_recorded_by_the_server_leads_hydration(
    cli: Cli, image: Path, admin: str, server: Server, stream: Callable[..., Endpoint]
) -> None:
    cli("machine", "add", "m1", "--image", "img")
    server.start()
    # a "boot": first reads of chunk 28, then 4, then 28 again, on the machine export
    read = qemu_io(
        server.url("machine/m1"), "read 7340032 4096", "read 1048576 4096", "read 7340032 512"
    )
    assert read.returncode == 0, read.stderr
    url = f"{server.http_url}/api/v1/images/img/versions/1/profile"
    deadline = time.monotonic() + 10
    while True:  # recorded when the export closes, on a thread of its own
        answer = httpx.get(url, headers={"Authorization": f"Bearer {admin}"}).json()
        if answer["boots"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert answer["boots"] == 1 and answer["chunks"] == [28, 4]
    token = cli.json("machine", "add", "m2", "--image", "img")["token"]
    assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert httpx.get(url).status_code == 401
    ep = stream("img", "--from", server.http_url, "--token", token)
    ep.wait_complete()
    hydrating = next(e for e in ep.events() if e["event"] == "hydrating")
    assert hydrating["profile_chunks"] == 2


def test_on_the_managers_home_no_token_is_needed_elsewhere_it_is(
    cli: Cli, image: Path, server: Server, stream: Callable[..., Endpoint], tmp_path: Path
) -> None:
    server.start()
    # as the CLI contract writes it: IMAGE --from URL --cache DIR --nbd ADDR
    ep = stream("img", "--from", server.http_url, "--no-hydrate")
    assert filecmp.cmp(convert(ep.url, tmp_path / "all.raw"), image, shallow=False)
    elsewhere = cli(
        "stream", "img", "--from", server.http_url, "--cache", str(tmp_path / "c2"),
        "--home", str(tmp_path / "endpoint-home"), check=False,
    )  # fmt: skip
    assert elsewhere.code == 2 and "--token" in elsewhere.err
