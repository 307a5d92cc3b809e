"""The qemu command line and the console parser, without a VM."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamina.demo.pxe import clean
from lamina.demo.vm import drive, parse_console, qemu_command
from lamina.errors import ToolError, UsageError


def test_drive_specs(tmp_path: Path) -> None:
    disk = tmp_path / "a,b.img"
    disk.write_bytes(b"")
    assert (
        drive(disk, "disk", readonly=False)
        == f"file={tmp_path}/a,,b.img,format=raw,if=none,id=disk"
    )
    url = "nbd://127.0.0.1:10809/machine/desk-001/seed"
    assert drive(url, "seed", readonly=True) == f"file={url},format=raw,if=none,id=seed,readonly=on"
    with pytest.raises(ToolError, match="unsupported"):
        drive("http://example.org/x.img", "disk", readonly=False)
    with pytest.raises(ToolError, match="no such"):
        drive(tmp_path / "missing.img", "disk", readonly=False)


def test_qemu_command_boots_the_first_disk_without_network_by_default() -> None:
    url = "nbd://127.0.0.1:1/machine/a"
    cmd = qemu_command(url, url + "/seed")
    assert "-nodefaults" in cmd and "-no-reboot" in cmd and "pc,accel=tcg" in cmd
    assert "virtio-blk-pci,drive=disk,bootindex=0" in cmd
    assert not any("netdev" in a for a in cmd)
    with_nic = qemu_command(url, None, mac="52:54:00:AB:cd:01")
    assert "virtio-net-pci,netdev=net,mac=52:54:00:ab:cd:01,romfile=" in with_nic
    assert not any("id=seed" in a for a in with_nic)
    with pytest.raises(UsageError, match="multicast"):
        qemu_command(url, None, mac="01:00:00:00:00:01")


def test_parse_console() -> None:
    console = (
        "SeaBIOS\r\n[    1.2] noise\r\n"
        "lamina-boot hostname=desk-001 machine-id=" + "a" * 32 + " marker=present\r\n"
        "[    2.3] reboot: Power down\r\n"
    )
    report = parse_console(console, 3.14159)
    assert (report.hostname, report.machine_id, report.marker) == ("desk-001", "a" * 32, True)
    assert report.seconds == 3.14 and report.line in console
    # the firmware's last line cut short by the init's reset (seen in a network boot)
    cut = "initrd.img... o\x1bc\x1b[?7l\x1b[2J" + console.split("\r\n", 2)[2]
    assert parse_console(clean(cut), 1).hostname == "desk-001"
    with pytest.raises(ToolError, match="cannot-mount-seed"):
        parse_console("lamina-boot error=cannot-mount-seed\n", 1)
    with pytest.raises(ToolError, match="no console output"):
        parse_console("", 1)


def test_qemu_command_over_tls_names_the_credentials_for_nbd_disks(tmp_path: Path) -> None:
    url = "nbd://127.0.0.1:1/machine/a"
    cmd = qemu_command(url, url + "/seed", tls=tmp_path)
    assert f"tls-creds-x509,id=tls0,dir={tmp_path},endpoint=client" in cmd
    drives = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-drive"]
    assert len(drives) == 2 and all("file.tls-creds=tls0" in d for d in drives)
    assert not any("tls" in a for a in qemu_command(url, None))
