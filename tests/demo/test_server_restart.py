"""A real VM rides out a `kill -9` of `lamina serve`: qemu reconnects (reconnect-delay),
the guest reads back what it wrote before the kill and goes on; it powers off cleanly,
and at its next power-on the stateless machine starts clean."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from lamina.demo.image import DemoImage
from lamina.demo.vm import boot
from tests.conftest import Cli
from tests.demo.scripted import ScriptedVm
from tests.servers import Server, wait_for

# 1 MiB of random data written and synced before the kill, read back after the restart
# with the page cache dropped (so the reads go to the server), then a write after it.
RESTART = r"""
dd if=/dev/urandom of=/mnt/root/data bs=64k count=16 2>/dev/null
sync
echo "lamina-step wrote $(md5sum /mnt/root/data | cut -c1-32)"
read go
echo 3 > /proc/sys/vm/drop_caches
echo "lamina-step read $(md5sum /mnt/root/data | cut -c1-32)"
echo written after the restart > /mnt/root/after && sync
echo "lamina-step done $(cat /mnt/root/after)"
"""


@pytest.mark.e2e  # boots a VM under TCG: in make e2e, beside the other VM runs
def test_a_vm_rides_out_a_server_kill_and_its_next_boot_is_clean(
    cli: Cli, server: Server, demo: DemoImage, tmp_path: Path
) -> None:
    cli("image", "import", "demo", str(demo.path))
    cli("machine", "add", "desk", "--image", "demo", "--mode", "stateless")
    server.start()
    disk, seed = server.url("machine/desk"), server.url("machine/desk/seed")
    with ScriptedVm(disk, seed, RESTART, tmp_path, reconnect_delay=60) as vm:
        assert "hostname=desk" in vm.expect("lamina-boot ")
        wrote = vm.step("wrote")
        server.stop(signal.SIGKILL)
        server.start()
        vm.send("go")
        assert vm.step("read") == wrote
        assert vm.step("done") == "written after the restart"
        vm.wait()

    # the power-off said goodbye: the boot's end is on disk, then the next boot is clean
    wait_for((cli.home / "deltas" / "desk" / "ended").exists, 10)
    again = boot(disk, seed)
    assert again.hostname == "desk" and not again.marker
    boots = [json.loads(ln) for ln in server.log_lines() if '"new-boot"' in ln]
    assert [(b["machine"], b["delta"]) for b in boots] == [("desk", "dropped")]


# Files rewritten in a loop, each with its checksum beside it, while the server is killed
# under the running I/O; then every file is checked against its checksum from disk.
CHURN = r"""
mkdir -p /tmp
( i=0; while [ ! -e /tmp/stop ]; do
    f=/mnt/root/f$((i % 8))
    dd if=/dev/urandom of=$f bs=64k count=4 2>/dev/null
    md5sum $f > $f.md5 && sync
    i=$((i + 1)); echo $i > /tmp/rounds
  done ) &
echo "lamina-step writing"
read stop
touch /tmp/stop
wait
echo 3 > /proc/sys/vm/drop_caches
bad=0
for f in /mnt/root/f?; do md5sum -c $f.md5 >/dev/null 2>&1 || bad=$((bad + 1)); done
echo "lamina-step verified $(cat /tmp/rounds) $bad"
"""


@pytest.mark.e2e
def test_a_vm_writing_through_repeated_server_kills_loses_nothing(
    cli: Cli, server: Server, demo: DemoImage, tmp_path: Path
) -> None:
    cli("image", "import", "demo", str(demo.path))
    cli("machine", "add", "desk", "--image", "demo", "--mode", "stateful")
    server.start()
    disk, seed = server.url("machine/desk"), server.url("machine/desk/seed")
    with ScriptedVm(disk, seed, CHURN, tmp_path, reconnect_delay=60) as vm:
        vm.step("writing")
        for _ in range(3):
            time.sleep(3)
            server.stop(signal.SIGKILL)
            server.start()
        time.sleep(3)
        vm.send("stop")
        rounds, bad = (int(n) for n in vm.step("verified", 300).split())
        vm.wait()
    assert bad == 0 and rounds > 4
    assert boot(disk, seed).marker  # stateful: its next boot finds its disk as it left it
