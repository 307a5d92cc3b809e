"""Lazily attached layers end to end: a real manager (which builds the layer's EROFS image),
an agent started with ``--lazy-layers`` behind a misbehaving proxy, the FUSE file and the
file-backed EROFS mount on it, read by the test as any program would.

What is checked: a login fetches the layer's metadata, not its data; files read while the
manager was there keep reading once it is away (from the host's cache, the page cache
dropped), an unread one fails with EIO at once and ``agent status`` says the host is
offline and lacks chunks; chunks damaged on the wire are refused and fetched again; and
the lazily attached layer reads identically to the same version exported whole.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lamina.layer import prepare
from tests.agent.agents import AgentProc
from tests.conftest import Cli, write_sparse
from tests.servers import Server, wait_for
from tests.stream.proxy import Proxy
from tests.trees import needs_root, rich_tree, snapshot

pytestmark = [pytest.mark.peers, needs_root]


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.stop()


def drop_cached(*paths: Path) -> None:
    """Drop the page cache of ``paths`` (clean pages only), so a read goes below it."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def lazy_status(agent: AgentProc) -> dict[str, Any]:
    import json

    layers = json.loads(agent.run("status", "--json").stdout)["lazy_layers"]
    assert len(layers) == 1, layers
    found: dict[str, Any] = layers[0]
    return found


def settled(agent: AgentProc, check: str, timeout: float = 5.0) -> dict[str, Any]:
    """The status once ``check`` (a key) is true (the server writes it every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        status = lazy_status(agent)
        if status.get(check) or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def test_lazy_layer_reads_like_the_exported_one_offline_and_corrupt(
    cli: Cli, server: Server, tmp_path: Path, agents: list[AgentProc]
) -> None:
    cli("image", "import", "base", str(write_sparse(tmp_path / "d.raw", 1 << 20, [])))
    token = cli.json("machine", "add", "m1", "--image", "base")["token"]
    manifest = cli.json(
        "layer",
        "import",
        "app",
        str(rich_tree(tmp_path / "src")),
        "--allow-setuid",
        "--allow-devices",
    )["manifest"]
    cli("user", "add", "alice")
    cli("entitle", "app", "--user", "alice")
    exported = tmp_path / "exported"
    cli("layer", "export", "app@1", str(exported))
    server.start()
    proxy = Proxy(server.http_url)
    try:
        agent = AgentProc(tmp_path / "a1", proxy.url, token, "--lazy-layers").start()
        agents.append(agent)
        agent.run("login", "alice")
        lower = prepare.mountpoint(agent.home, bytes.fromhex(manifest))
        image = prepare.cache_dir(agent.home) / f"{manifest}.erofs"
        status = settled(agent, "pid")
        # metadata only: the 3 MiB of the tool's data are not here yet
        assert status["cached_data_bytes"] < status["data_bytes"] // 2, status
        assert (agent.root / "alice/etc/app.conf").read_text() == "key=value\n"

        # the manager goes away: what was read keeps reading, from the host's cache
        proxy.down = True
        drop_cached(lower / "etc/app.conf", image)
        assert (lower / "etc/app.conf").read_text() == "key=value\n"
        started = time.monotonic()
        with pytest.raises(OSError) as missing:
            (lower / "usr/bin/tool").read_bytes()
        assert missing.value.errno == errno.EIO
        assert time.monotonic() - started < 10  # an error, not a hang
        status = settled(agent, "offline")
        assert status["offline"] is True and status["missing_chunks"] > 0, status
        shown = agent.run("status").stdout
        assert "lazy layer app@1" in shown and "offline" in shown and "missing" in shown

        # back, with two chunk answers damaged on the way: refused and fetched again
        proxy.down = False
        proxy.corrupt_left = 2
        tool = (exported / "usr/bin/tool").read_bytes()
        assert (lower / "usr/bin/tool").read_bytes() == tool
        assert proxy.corrupted == 2
        status = settled(agent, "corrupt")
        assert status["corrupt"] == 2 and status["offline"] is False, status

        # the whole layer, as a reader sees it, is the layer exported whole
        assert snapshot(lower) == snapshot(exported)
        assert (agent.root / "alice/usr/bin/tool").read_bytes() == tool

        # logout sends the order chunks were first read in: the layer's read-ahead profile
        agent.run("logout", "alice")
        admin = cli("admin", "token").out.strip()
        answer = httpx.get(
            f"{server.http_url}/api/v1/layers/app/versions/1/image",
            headers={"Authorization": f"Bearer {admin}"},
            timeout=60,
        ).json()
        assert len(answer["profile"]) > 1, answer
        # removing the version's image here ends its file server
        prepare.forget(agent.home, bytes.fromhex(manifest))
        assert not image.exists()
        wait_for(lambda: not os.path.exists(f"/proc/{status['pid']}"), 10.0)
    finally:
        proxy.close()
