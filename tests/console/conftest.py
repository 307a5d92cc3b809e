"""Console fixtures: a small fleet on a real `lamina serve`, the login URL it prints, and
real headless Chromium (Debian's package, driven by Playwright; never a downloaded one)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import Cli, write_sparse
from tests.servers import Server

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Free text an admin can give that ends up on console pages (machine names cannot hold it).
HOSTILE_SCRIPT = "<script>alert(1)</script>"
HOSTILE_IMG = "<img src=x onerror=alert(2)>"
_LOGIN = re.compile(r"lamina console: (http://\S+/login\?token=\S+)")


def login_url(server: Server, timeout: float = 10) -> str:
    """The newest login URL `lamina serve` printed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m.group(1) for line in server.log_lines() if (m := _LOGIN.search(line))]
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError("lamina serve printed no console login URL")


@dataclass
class Fleet:
    cli: Cli
    server: Server
    tokens: dict[str, str]  # machine -> agent token

    @property
    def base(self) -> str:
        return self.server.http_url

    def admin_token(self) -> str:
        return self.cli("admin", "token").out.strip()


@pytest.fixture
def fleet(cli: Cli, server: Server, tmp_path: Path) -> Fleet:
    """Two machines on one image (one stateless, one stateful), an app layer, two users in
    a group; hostile text in the image's source path and in m2's extra cloud-config."""
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    image = write_sparse(
        src_dir / f"{HOSTILE_IMG}.raw", 8 << 20, [(0, os.urandom(1 << 20)), (4 << 20, b"x" * 4096)]
    )
    cli("image", "import", "base", str(image))
    tokens = {
        "m1": cli.json("machine", "add", "m1", "--image", "base")["token"],
        "m2": cli.json("machine", "add", "m2", "--image", "base", "--mode", "stateful")["token"],
    }
    config = tmp_path / "m2.yaml"
    config.write_text(f"write_files:\n  - path: /etc/motd\n    content: '{HOSTILE_SCRIPT}'\n")
    cli("machine", "set", "m2", "--config", str(config))
    layer = tmp_path / "office"
    (layer / "opt" / "office").mkdir(parents=True)
    (layer / "opt" / "office" / "README").write_text("office suite\n")
    cli("layer", "import", "office", str(layer))
    cli("group", "add", "staff")
    cli("user", "add", "alice", "--group", "staff")
    cli("user", "add", "bob", "--group", "staff")
    return Fleet(cli, server, tokens)


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[BrowserContext]:
    """A fresh headless Chromium profile (closed, with its process, after the test)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing (make deps installs it)"
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1360, "height": 820},
        )
        context.set_default_timeout(10_000)
        try:
            yield context
        finally:
            context.close()
