"""A backup taken while a VM writes to its disk, restored into a fresh home, boots: the
restored disk holds what the guest had synced before the backup (its file system
recovers from its journal at mount, as after a power cut)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamina.demo.image import DemoImage
from tests.conftest import Cli
from tests.demo.scripted import ScriptedVm
from tests.servers import Server

WRITE_ON = r"""
dd if=/dev/urandom of=/mnt/root/data bs=64k count=16 2>/dev/null
sync
echo "lamina-step wrote $(md5sum /mnt/root/data | cut -c1-32)"
( i=0; while :; do
    dd if=/dev/urandom of=/mnt/root/churn$((i % 4)) bs=64k count=8 2>/dev/null; sync
    i=$((i + 1)); done ) &
echo "lamina-step writing"
read stop
kill $!
wait
echo "lamina-step stopped"
"""
CHECK = r"""
echo "lamina-step check $(md5sum /mnt/root/data | cut -c1-32)"
"""


@pytest.mark.e2e  # boots a VM under TCG: in make e2e, beside the other VM runs
def test_a_backup_taken_while_a_vm_writes_restores_and_boots(
    cli: Cli, server: Server, demo: DemoImage, tmp_path: Path
) -> None:
    cli("image", "import", "demo", str(demo.path))
    cli("machine", "add", "desk", "--image", "demo", "--mode", "stateful")
    server.start()
    backup = tmp_path / "backup"
    first = tmp_path / "first"
    first.mkdir()
    with ScriptedVm(
        server.url("machine/desk"), server.url("machine/desk/seed"), WRITE_ON, first
    ) as vm:
        wrote = vm.step("wrote")
        vm.step("writing")
        report = cli.json("backup", str(backup))
        vm.send("stop")
        vm.step("stopped")
        vm.wait()
    assert report["deltas"] == ["desk"]
    server.stop()

    restored = Cli(tmp_path / "restored")
    assert restored.json("restore", str(backup))["deltas"] == ["desk"]
    again = Server(restored.home, tmp_path / "restored.log")
    again.start()
    second = tmp_path / "second"
    second.mkdir()
    try:
        disk, seed = again.url("machine/desk"), again.url("machine/desk/seed")
        with ScriptedVm(disk, seed, CHECK, second) as vm:
            line = vm.expect("lamina-boot ")
            assert "hostname=desk" in line and "marker=present" in line
            assert vm.step("check") == wrote
            vm.wait()
    finally:
        again.stop()
