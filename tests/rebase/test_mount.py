"""A real writable layer, made by a real overlayfs session, rebased onto a patched base and
mounted again on it: what the user sees afterwards."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from lamina.home import Home
from lamina.layer import roots
from lamina.layer.importer import import_layer
from lamina.manager.layer_records import DatabaseRecords
from tests.conftest import Cli
from tests.trees import mounted, needs_root, write_tree

pytestmark = [needs_root, pytest.mark.peers]

CONF = "a=1\nb=2\nc=3\nd=4\n"
V1: dict[str, str | bytes | None] = {
    "etc/app.conf": CONF,
    "etc/hosts": "127.0.0.1 localhost\n",
    "usr/bin/tool": "tool v1\n",
    "usr/share/doc/readme": "doc v1\n",
    "opt/app/config": "x\n",
    "home/alice/notes": "hi\n",
    "var/lib/app/state": "s1\n",
}
V2: dict[str, str | bytes | None] = {
    **V1,
    "etc/app.conf": CONF.replace("a=1", "a=2"),
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
    "usr/bin/tool": "tool v2\n",
    "usr/share/doc/readme": "doc v2\n",
    "opt/app/config": "y\n",
    "var/lib/app/state": "s2\n",
    "usr/lib/libnew.so": "new\n",
}


def test_session_rebased_and_mounted_on_the_new_base(cli: Cli, home: Home, tmp_path: Path) -> None:
    import_layer(home, DatabaseRecords(home), "base", write_tree(tmp_path / "v1", dict(V1)))
    root = tmp_path / "root"
    root.mkdir()
    roots.mount(home, DatabaseRecords(home), root, ["base@1"], writable="alice")
    try:
        with open(root / "etc/app.conf", "a") as f:
            f.write("e=alice\n")
        (root / "usr/bin/tool").write_text("alice's tool\n")
        (root / "usr/share/doc/readme").unlink()
        os.chmod(root / "opt/app/config", 0o600)
        (root / "home/alice/notes").write_text("alice's notes\n")
        (root / "home/alice/new").write_text("new\n")
        shutil.rmtree(root / "var/lib/app")  # removed and made again: an opaque directory
        (root / "var/lib/app").mkdir()
        (root / "var/lib/app/mine").write_text("mine\n")
    finally:
        saved = roots.umount(home, DatabaseRecords(home), root)
    assert saved.saved == "alice@1"
    import_layer(home, DatabaseRecords(home), "base", write_tree(tmp_path / "v2", dict(V2)))

    report = cli.json("rebase", "alice", "--onto", "base@2")
    assert (report["ref"], report["bases"]["new"]) == ("alice@2", ["base@2"])
    assert {m["path"] for m in report["merged"]} == {"/etc/app.conf", "/opt/app/config"}
    assert {c["path"]: c.get("saved") for c in report["conflicts"]} == {
        "/usr/bin/tool": "/var/lib/lamina/conflicts/usr/bin/tool",
        "/usr/share/doc/readme": None,
        "/var/lib/app/state": "/var/lib/app/state.lamina-new",
    }

    mount = roots.mount(home, DatabaseRecords(home), root, ["base@2"], writable="alice")
    assert mount.writable_version == "alice@2"
    try:
        assert (root / "etc/app.conf").read_text() == CONF.replace("a=1", "a=2") + "e=alice\n"
        assert (root / "etc/hosts").read_text() == V2["etc/hosts"]  # only the admin changed it
        assert (root / "usr/bin/tool").read_text() == "tool v2\n"
        assert (root / "var/lib/lamina/conflicts/usr/bin/tool").read_text() == "alice's tool\n"
        assert (root / "usr/share/doc/readme").read_text() == "doc v2\n"
        config = root / "opt/app/config"
        assert config.read_text() == "y\n" and stat.S_IMODE(config.stat().st_mode) == 0o600
        assert (root / "home/alice/notes").read_text() == "alice's notes\n"
        assert (root / "home/alice/new").read_text() == "new\n"
        assert sorted(os.listdir(root / "var/lib/app")) == ["mine", "state.lamina-new"]
        assert (root / "var/lib/app/state.lamina-new").read_text() == "s2\n"
        assert (root / "usr/lib/libnew.so").read_text() == "new\n"
    finally:
        again = roots.umount(home, DatabaseRecords(home), root)
    assert again.saved is None and not mounted(root)  # the rebased version was what it showed
