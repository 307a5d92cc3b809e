"""The demo VM boots through `lamina stream`: from an empty cache, then offline."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from lamina.demo import boot, demo_image
from tests.conftest import Cli
from tests.demo.conftest import cache_root
from tests.servers import Server
from tests.stream.conftest import Endpoint

pytestmark = [pytest.mark.peers, pytest.mark.slow]


def test_a_streamed_stateful_machine_boots_then_boots_again_offline(
    cli: Cli, server: Server, stream: Callable[..., Endpoint]
) -> None:
    demo = demo_image(cache_root() / "demo")
    cli("image", "import", "demo", str(demo.path))
    token = cli.json("machine", "add", "desk-9", "--image", "demo", "--mode", "stateful")["token"]
    server.start()
    url = server.http_url
    ep = stream("demo", "--from", url, "--token", token, "--machine", "desk-9")
    assert ep.status()["exports"] == ["demo", "demo/seed"]
    seed = f"nbd://127.0.0.1:{ep.port}/demo/seed"
    first = boot(ep.url, seed)
    assert first.hostname == "desk-9" and not first.marker
    server.stop(signal.SIGKILL)  # the manager goes away for good
    ep.stop(signal.SIGKILL)
    ep.start()
    status = ep.status()
    assert status["complete"] and status["online"] is not True
    again = boot(ep.url, seed)  # identity from the cached seed, marker from the local delta
    assert again.hostname == "desk-9" and again.marker
    assert again.machine_id == first.machine_id


def test_the_seed_export_matches_the_servers(
    cli: Cli, server: Server, stream: Callable[..., Endpoint], image: Path, tmp_path: Path
) -> None:
    from tests.stream.conftest import convert

    token = cli.json("machine", "add", "m1", "--image", "img")["token"]
    server.start()
    url = server.http_url
    ep = stream("img", "--from", url, "--token", token, "--machine", "m1", "--no-hydrate")
    ours = convert(f"nbd://127.0.0.1:{ep.port}/img/seed", tmp_path / "a.iso").read_bytes()
    theirs = convert(server.url("machine/m1/seed"), tmp_path / "b.iso").read_bytes()
    assert ours == theirs and len(ours) > 0
