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
