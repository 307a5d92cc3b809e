"""layer capture: an installer run chrooted on a busybox base; only its change is stored."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lamina.home import Home
from lamina.layer import roots
from lamina.layer.importer import import_layer, load_tree
from lamina.layer.tree import Kind
from lamina.manager.layer_records import DatabaseRecords
from lamina.manager.services import layers
from lamina.names import parse_ref
from tests.conftest import Cli
from tests.trees import busybox_root, mounted, needs_root

pytestmark = [needs_root, pytest.mark.peers]

INSTALL = (
    "mkdir -p /opt/tool && echo 'tool 1.0' > /opt/tool/run && rm /etc/motd"
    " && echo scratch > /tmp/scratch && cat /etc/motd.d 2>/dev/null; echo $$ > /opt/tool/pid"
)


def test_capture_stores_only_the_change(cli: Cli, home: Home, tmp_path: Path) -> None:
    import_layer(home, DatabaseRecords(home), "base", busybox_root(tmp_path / "base"))
    info = cli(
        "layer", "capture", "tool", "--on", "base", "--json", "--", "/bin/sh", "-c", INSTALL
    ).json()
    assert info["ref"] == "tool@1" and info["bases"] == ["base@1"]
    with home.session() as session:
        version = layers.get_version(session, parse_ref("tool"))
        tree = load_tree(home.store, bytes.fromhex(version.manifest_id))
        assert [b.base_ref for b in version.bases] == ["base@1"]
    kinds = {e.path: e.kind for e in tree}
    # the change and its parent directories, the deletion as a whiteout; nothing of the
    # base (busybox), nothing from the tmpfs on /tmp
    assert kinds == {
        "etc": Kind.DIR,
        "etc/motd": Kind.WHITEOUT,
        "opt": Kind.DIR,
        "opt/tool": Kind.DIR,
        "opt/tool/pid": Kind.FILE,
        "opt/tool/run": Kind.FILE,
    }
    exported = tmp_path / "exported"
    cli("layer", "export", "tool", str(exported))
    assert (exported / "opt/tool/pid").read_text().strip() == "1"  # PID 1: own namespace
    st = (exported / "etc/motd").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0  # an overlayfs whiteout
    assert not mounted(tmp_path) and not any(
        m for m in os.listdir(home.root / "tmp") if m.startswith("capture-")
    )
    root = tmp_path / "root"
    root.mkdir()
    roots.mount(home, DatabaseRecords(home), root, ["tool", "base"])
    try:
        assert (root / "opt/tool/run").read_text() == "tool 1.0\n"
        assert not (root / "etc/motd").exists() and (root / "bin/busybox").exists()
    finally:
        roots.umount(home, DatabaseRecords(home), root)


def test_failed_command_stores_nothing(cli: Cli, home: Home, tmp_path: Path) -> None:
    import_layer(home, DatabaseRecords(home), "base", busybox_root(tmp_path / "base"))
    result = cli(
        "layer",
        "capture",
        "bad",
        "--on",
        "base",
        "--",
        "/bin/sh",
        "-c",
        "touch /x; exit 3",
        check=False,
    )
    assert result.code == 8 and "status 3" in result.err
    missing = cli("layer", "capture", "bad", "--on", "base", "--", "/no/such/cmd", check=False)
    assert missing.code == 8
    with home.session() as session:
        assert [layer.name for layer in layers.list_layers(session)] == ["base"]


PROBE = (
    "busybox hostname > /opt/hostname"
    " && cat /etc/resolv.conf > /opt/resolv"
    " && busybox test -c /dev/pts/ptmx && busybox test -L /dev/ptmx && echo pts > /opt/pts"
    " && echo shm > /dev/shm/x && busybox test -f /proc/self/status && echo proc > /opt/proc"
    " && busybox test -d /sys/kernel && ! busybox touch /sys/x 2>/dev/null && echo ro > /opt/sys"
    " && echo deb > /var/cache/apt/archives/cowsay.deb && echo list > /var/lib/apt/lists/x"
    " && busybox mkdir -p /var/cache/apt/archives/partial && echo kept > /var/lib/dpkg/status"
)


def probe_root(tmp_path: Path) -> Path:
    dirs = {d: None for d in ("dev", "proc", "sys", "opt", "var/cache/apt/archives")}
    extra = {
        **dirs,
        "etc/resolv.conf": "nameserver 192.0.2.1\n",  # the tree's own, hidden by the host's
        "var/lib/apt/lists/old": "base list\n",
        "var/lib/dpkg/status": "base\n",
    }
    return busybox_root(tmp_path / "base", extra)  # type: ignore[arg-type]


def test_capture_gives_the_command_a_real_system_and_keeps_no_caches(
    cli: Cli, home: Home, tmp_path: Path
) -> None:
    import_layer(home, DatabaseRecords(home), "base", probe_root(tmp_path))
    info = cli("layer", "capture", "app", "--on", "base", "--json", "--", "/bin/sh", "-c", PROBE)
    assert info.json()["caches_left_out"] == len("deb\n") + len("list\n")
    out = tmp_path / "out"
    cli("layer", "export", "app", str(out))
    assert (out / "opt/hostname").read_text() == "lamina-capture\n"
    assert (out / "opt/resolv").read_text() == Path("/etc/resolv.conf").read_text()
    for name, text in (("pts", "pts"), ("proc", "proc"), ("sys", "ro")):
        assert (out / "opt" / name).read_text() == f"{text}\n"
    assert (out / "var/lib/dpkg/status").read_text() == "kept\n"  # installed state is kept
    # nothing below the caches' directories: the base's list is left as it was
    assert not list((out / "var/cache/apt").rglob("*"))
    assert not list((out / "var/lib/apt/lists").rglob("*"))
    assert not (out / "etc").exists() and not (out / "dev").exists()  # resolv.conf: bound
    # --keep-caches keeps them
    kept = cli(
        "layer", "capture", "app", "--on", "base", "--keep-caches", "--json", "--",
        "/bin/sh", "-c", PROBE,
    ).json()  # fmt: skip
    assert kept["caches_left_out"] == 0
    with home.session() as session:
        version = layers.get_version(session, parse_ref("app@2"))
        paths = {e.path for e in load_tree(home.store, bytes.fromhex(version.manifest_id))}
    assert {"var/cache/apt/archives/cowsay.deb", "var/lib/apt/lists/x"} <= paths


def test_a_layer_below_its_own_base_is_refused(cli: Cli, home: Home, tmp_path: Path) -> None:
    records = DatabaseRecords(home)
    import_layer(home, records, "base", busybox_root(tmp_path / "base"))
    import_layer(home, records, "other", busybox_root(tmp_path / "other"))
    cli("layer", "capture", "tool", "--on", "base", "--", "/bin/sh", "-c", INSTALL)
    root = tmp_path / "root"
    root.mkdir()
    wrong = cli("mount", str(root), "--layer", "base", "--layer", "tool", check=False)
    assert wrong.code == 2 and wrong.err.strip().splitlines() == [
        "lamina: tool@1 was made on base@1, but base@1 is placed above it: "
        "list tool@1 before base@1 (the first layer wins, the base goes last)"
    ]
    assert not mounted(tmp_path)
    # attaching tool's base on top of it is refused the same way, and changes nothing
    roots.mount(home, records, root, ["tool", "other"])
    try:
        refused = cli("attach", str(root), "base", check=False)
        assert refused.code == 2 and "tool@1 was made on base@1" in refused.err
        assert roots.mounts(home, records)[0].layers == ["tool@1", "other@1"]
    finally:
        roots.umount(home, records, root)
