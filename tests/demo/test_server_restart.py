"""A real VM rides out a `kill -9` of `lamina serve`: qemu reconnects (reconnect-delay),
the guest reads back what it wrote before the kill and goes on; it powers off cleanly,
and at its next power-on the stateless machine starts clean."""

from __future__ import annotations

import json
import signal
from pathlib import Path

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
