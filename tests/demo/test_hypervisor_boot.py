"""The demo VM boots from `lamina serve` with the command `lamina machine qemu` prints,
over TLS with the machine's credential: the identity it reports is the machine's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lamina.demo.image import DemoImage
from lamina.demo.vm import parse_console
from tests.conftest import Cli
from tests.servers import Server

pytestmark = [pytest.mark.e2e, pytest.mark.peers, pytest.mark.slow]


def test_the_printed_qemu_command_boots_the_machine(
    cli: Cli, server: Server, demo: DemoImage, tmp_path: Path
) -> None:
    cli("image", "import", "demo", str(demo.path))
    added = cli.json("machine", "add", "desk-001", "--image", "demo@1")
    server.args = ("--tls",)
    server.start()
    creds = tmp_path / "creds"
    cli("machine", "credentials", "desk-001", "--out", str(creds))
    argv = cli.json(
        "machine", "qemu", "desk-001", "--server", f"127.0.0.1:{server.port}",
        "--credentials", str(creds), "--memory", "128", "--vcpus", "1",
    )  # fmt: skip
    # No KVM here; the demo's init powers off, a panic must not loop.
    argv = [a.replace("accel=kvm:tcg", "accel=tcg") for a in argv] + ["-no-reboot"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    report = parse_console(done.stdout, 0.0)
    assert report.hostname == "desk-001" and report.machine_id == added["machine_id"]
