"""``lamina guest install ROOT`` on a Debian root made elsewhere (the bootstrapped root the
image build keeps in its cache): everything of the kit in place, and working in the root."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from lamina.guest import build, chroot, debian
from tests.conftest import Cli
from tests.e2e.conftest import image_cache

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_guest_install_puts_the_kit_into_a_root(
    e2e_cli: Cli, debian_image: dict[str, Any], tmp_path: Path
) -> None:
    # the root the image build bootstrapped (the cache may hold others')
    tarball = build.root_tarball(build.Spec("debian12"), debian.sources("bookworm"), image_cache())
    root = tmp_path / "root"
    debian.extract(tarball, root)
    assert list((root / "etc/ssh").glob("ssh_host_*_key"))  # what a bootstrap leaves
    done = e2e_cli("guest", "install", str(root), "--base", "debbase", "--json", timeout=900)
    assert done.json()["python"] == "3.11"
    # the agent, runnable by the root's own Python
    assert "lamina" in chroot.run(root, ["/opt/lamina/bin/lamina", "--help"], "lamina")
    assert list((root / "opt/lamina/lib/python3.11/site-packages/lamina").rglob("*.pyc"))
    unit = root / "etc/systemd/system/lamina-agent.service"
    assert "EnvironmentFile=/etc/lamina/agent.env" in unit.read_text()
    assert (root / "etc/systemd/system/multi-user.target.wants/lamina-agent.service").is_symlink()
    # PAM, through Debian's pam-auth-update
    session = (root / "etc/pam.d/common-session").read_text()
    assert "pam_exec.so stdout /opt/lamina/libexec/lamina-pam-session" in session
    assert mode(root / "opt/lamina/libexec/lamina-pam-session") == 0o755
    # the initramfs carries the identity script, isofs, blkid and FSTYPE; for a network
    # boot nbd-client's nbdroot= script and the nbd module, the seed script, the wrapper
    listing = chroot.run(root, ["sh", "-c", "lsinitramfs /boot/initrd.img-*"], "lsinitramfs")
    for wanted in (
        "scripts/init-bottom/lamina-identity", "isofs.ko", "sbin/blkid",
        "scripts/local-top/nbd", "nbd.ko", "scripts/local-top/lamina-nbd",
        "sbin/lamina-nbd-client", "sbin/nbd-client",
    ):  # fmt: skip
        assert wanted in listing, wanted
    conf = (root / "etc/initramfs-tools/conf.d/lamina").read_text()
    assert "FSTYPE=ext4" in conf and "export NBDCLIENT=/sbin/lamina-nbd-client" in conf
    wants = root / "etc/systemd/system/sysinit.target.wants/lamina-netroot.service"
    assert str(wants.readlink()) == "/etc/systemd/system/lamina-netroot.service"
    unit = root / "etc/systemd/system/lamina-netroot.service"
    assert "python3 -m lamina.guest.netroot" in unit.read_text()
    # no identity of its own; the seed readable by root only
    assert (root / "etc/machine-id").read_text() == ""
    assert not list((root / "etc/ssh").glob("ssh_host_*"))
    assert 'MODE="0600"' in (root / "etc/udev/rules.d/61-lamina-seed.rules").read_text()
    assert json.loads((root / "etc/lamina/system.json").read_text()) == {"base": "debbase"}
    # cloud-init's locale is there; the agent's home is made and closed to others
    assert "en_US.utf8" in chroot.run(root, ["locale", "-a"], "locale").split()
    assert (root / "var/lib/lamina/lamina.db").is_file()
    assert mode(root / "var/lib/lamina") == 0o700
    # a second run replaces what the first did
    e2e_cli("guest", "install", str(root), "--base", "debbase", timeout=900)
    assert session == (root / "etc/pam.d/common-session").read_text()


def test_guest_install_refuses_what_is_not_a_root(e2e_cli: Cli, tmp_path: Path) -> None:
    result = e2e_cli("guest", "install", str(tmp_path), check=False)
    assert result.code == 3 and result.err.strip().splitlines() == [
        f"lamina: {tmp_path}: not a root file system (no etc/ or usr/bin/)"
    ]
