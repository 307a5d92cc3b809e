"""Real overlayfs mounts: merged view and priority, policies across sessions, one root per
writable layer, conflicts, live attach/detach under a process that stays inside."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lamina.errors import Conflict, NotFound
from lamina.home import Home
from lamina.layer import attach, roots
from lamina.layer.importer import import_layer
from lamina.layer.overlay import mountinfo
from lamina.manager.layer_records import DatabaseRecords
from lamina.manager.services import layers
from lamina.names import parse_ref
from tests.conftest import Cli
from tests.trees import mounted, needs_root, rich_tree, snapshot, write_tree

pytestmark = [needs_root, pytest.mark.peers]


def _layer(home: Home, tmp_path: Path, name: str, files: dict[str, str | bytes | None]) -> str:
    return import_layer(
        home, DatabaseRecords(home), name, write_tree(tmp_path / "src" / name, files)
    )[0]


@pytest.fixture
def base(home: Home, tmp_path: Path) -> str:
    return _layer(
        home,
        tmp_path,
        "base",
        {
            "etc/motd": "welcome\n",
            "etc/app.conf": "base\n",
            "home/alice/notes": "hi\n",
            "usr/share/doc/readme": "doc\n",
            "usr/local/bin": None,
        },
    )


def test_merged_view_priority_and_conflicts(
    cli: Cli, home: Home, tmp_path: Path, base: str
) -> None:
    _layer(home, tmp_path, "one", {"etc/app.conf": "one\n", "opt/one/x": "1"})
    _layer(home, tmp_path, "two", {"etc/app.conf": "two\n", "opt/two/y": "2", "etc/motd": "two\n"})
    root = tmp_path / "root"
    root.mkdir()
    args = ["mount", str(root), "--layer", "one", "--layer", "two", "--layer", "base"]
    refused = cli(*args, "--strict", check=False)
    assert refused.code == 9 and "etc/app.conf" in refused.err and not mounted(root)
    info = cli.json(*args)
    # one and two disagree on app.conf; two overriding the base's motd is no conflict
    assert info["conflicts"] == [{"path": "/etc/app.conf", "first": "one@1", "second": "two@1"}]
    assert (root / "etc/app.conf").read_text() == "one\n"  # first wins
    assert (root / "etc/motd").read_text() == "two\n"
    assert (root / "opt/one/x").exists() and (root / "opt/two/y").exists()
    assert (root / "home/alice/notes").read_text() == "hi\n"
    (root / "scratch").write_text("gone at umount")
    busy = cli("layer", "rm", "two", check=False)
    assert busy.code == 9 and "mounted" in busy.err
    done = cli.json("umount", str(root))
    assert done["writable"] is None and done["saved"] is None
    assert not mounted(root) and list(root.iterdir()) == []
    assert roots.mounts(home, DatabaseRecords(home)) == []
    assert not any(p.is_mount() for p in (home.root / "run" / "layers").iterdir())  # released


def _session(home: Home, root: Path, policy: str) -> None:
    roots.mount(home, DatabaseRecords(home), root, ["base"], writable="alice", policy=policy)
    (root / "home/alice/new").write_text("mine\n")
    (root / "home/alice/notes").unlink()
    (root / "usr/local/bin/tool").write_text("installed\n")
    (root / "usr/share/doc/readme").unlink()
    (root / "etc/motd").write_text("changed\n")
    roots.umount(home, DatabaseRecords(home), root)


@pytest.mark.parametrize(
    ("policy", "home_kept", "system_kept"),
    [("all", True, True), ("profile", True, False), ("apps", False, True)],
)
def test_policies_keep_and_drop_across_sessions(
    home: Home, tmp_path: Path, base: str, policy: str, home_kept: bool, system_kept: bool
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _session(home, root, policy)
    roots.mount(home, DatabaseRecords(home), root, ["base"], writable="alice", policy=policy)
    try:
        assert (root / "home/alice/new").exists() is home_kept
        assert (root / "home/alice/notes").exists() is not home_kept  # deletions too
        assert (root / "usr/local/bin/tool").exists() is system_kept
        assert (root / "usr/share/doc/readme").exists() is not system_kept
        assert (root / "etc/motd").read_text() == ("changed\n" if system_kept else "welcome\n")
    finally:
        second = roots.umount(home, DatabaseRecords(home), root)
    assert second.saved is None  # nothing changed in the second session: no new version
    with home.session() as session:
        v = layers.get_version(session, parse_ref("alice"))
        assert (v.ref, [b.base_ref for b in v.bases], v.policy) == ("alice@1", ["base@1"], policy)


def test_versions_chain_and_record_their_bases(home: Home, tmp_path: Path, base: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for text in ("one", "two"):
        roots.mount(home, DatabaseRecords(home), root, ["base"], writable="w")
        (root / "home/alice/file").write_text(text)
        assert roots.umount(home, DatabaseRecords(home), root).saved is not None
    with home.session() as session:
        v1, v2 = layers.list_versions(session, name="w")
        assert v2.parent_id == v1.id and [b.base_ref for b in v2.bases] == ["base@1"]
        assert [
            v.ref
            for v in layers.based_on(session, version=layers.get_version(session, parse_ref(base)))
        ] == [
            "w@1",
            "w@2",
        ]
    roots.mount(home, DatabaseRecords(home), root, ["base"], writable="w")
    try:
        assert (root / "home/alice/file").read_text() == "two"
    finally:
        roots.umount(home, DatabaseRecords(home), root)
    with pytest.raises(Conflict, match="base of writable"):
        layers.remove(home, ref=parse_ref("base@1"))  # a rebase of w needs it


def test_one_image_mount_per_version_shared_by_roots(home: Home, tmp_path: Path, base: str) -> None:
    paths = [tmp_path / "a", tmp_path / "b"]
    for root in paths:
        root.mkdir()
        roots.mount(home, DatabaseRecords(home), root, ["base"])
    try:
        images = [m for m in mountinfo() if m.fstype == "erofs" and str(home.root) in m.mountpoint]
        assert len(images) == 1 and images[0].source.endswith(".erofs")  # file-backed
        (paths[0] / "etc/motd").write_text("a's own\n")
        assert (paths[1] / "etc/motd").read_text() == "welcome\n"  # uppers stay apart
    finally:
        for root in paths:
            roots.umount(home, DatabaseRecords(home), root)


def test_writable_layer_mounts_on_one_root_at_a_time(home: Home, tmp_path: Path, base: str) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    roots.mount(home, DatabaseRecords(home), one, ["base"], writable="w")
    with pytest.raises(Conflict, match="mounted on"):
        roots.mount(home, DatabaseRecords(home), two, ["base"], writable="w")
    assert not mounted(two)
    with pytest.raises(Conflict, match="already mounted"):
        roots.mount(home, DatabaseRecords(home), one, ["base"])
    roots.umount(home, DatabaseRecords(home), one)
    roots.mount(home, DatabaseRecords(home), two, ["base"], writable="w")
    roots.umount(home, DatabaseRecords(home), two)


def test_crashed_session_is_kept_on_next_mount(home: Home, tmp_path: Path, base: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    roots.mount(home, DatabaseRecords(home), root, ["base"], writable="w")
    (root / "home/alice/unsaved").write_text("survives")
    subprocess.run(["umount", "-l", str(root)], check=True)  # behind lamina's back
    roots.mount(home, DatabaseRecords(home), root, ["base"], writable="w")
    try:
        assert (root / "home/alice/unsaved").read_text() == "survives"
    finally:
        roots.umount(home, DatabaseRecords(home), root)
    with home.session() as session:
        assert [v.ref for v in layers.list_versions(session, name="w")] == ["w@1"]


_HOLDER = textwrap.dedent(
    """
    import os, sys
    os.chdir(sys.argv[1])
    log = open("log", "a", buffering=1)
    held = None
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "write":
            log.write(arg + "\\n")
            out = "ok"
        elif cmd == "create":
            with open(arg, "w") as f:
                f.write("made")
            out = "ok"
        elif cmd == "ls":
            out = ",".join(sorted(os.listdir(arg)))
        elif cmd == "hold":
            held = open(arg)
            out = "ok"
        elif cmd == "read-held":
            held.seek(0)
            out = held.read().strip()
        print(out, flush=True)
    """
)


class _Holder:
    """A process with its cwd inside the root and a file there open for writing."""

    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(cwd)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.ask_line() == "ready"

    def ask_line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def __call__(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.poll() is None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.ask_line()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)


def test_attach_and_detach_live_under_a_busy_process(home: Home, tmp_path: Path, base: str) -> None:
    _layer(home, tmp_path, "app", {"opt/app/bin/run": "app v1\n"})
    root = tmp_path / "root"
    root.mkdir()
    roots.mount(home, DatabaseRecords(home), root, ["base"], writable="w")
    holder = _Holder(root / "home/alice")
    try:
        assert holder("write before") == "ok"
        attached = attach.attach(home, DatabaseRecords(home), root, "app")
        assert attached.layers == ["app@1", "base@1"]
        assert (root / "opt/app/bin/run").read_text() == "app v1\n"  # new lookups: at once
        assert holder("write after-attach") == "ok"  # the open file keeps working
        assert holder("create made-after-attach") == "ok"  # relative to the old cwd
        assert (root / "home/alice/made-after-attach").read_text() == "made"  # seen anew
        assert holder("ls ../..") == "etc,home,usr"  # its old cwd: the old layer set
        assert holder(f"hold {root}/opt/app/bin/run") == "ok"
        detached = attach.detach(home, DatabaseRecords(home), root, "app")
        assert detached.layers == ["base@1"] and detached.generation == 3
        assert not (root / "opt").exists()
        assert holder("read-held") == "app v1"  # a file of the detached layer stays open
        assert holder("write after-detach") == "ok"
        with pytest.raises(Conflict, match="in use"):
            roots.umount(
                home, DatabaseRecords(home), root
            )  # the holder is inside (an old generation)
        assert mounted(root)
    finally:
        holder.close()
    saved = roots.umount(home, DatabaseRecords(home), root)
    assert saved.saved == "w@1"
    roots.mount(home, DatabaseRecords(home), root, ["base"], writable="w")
    try:
        log = (root / "home/alice/log").read_text().split()
        assert log == ["before", "after-attach", "after-detach"]  # no write lost
        assert (root / "home/alice/made-after-attach").exists()
    finally:
        roots.umount(home, DatabaseRecords(home), root)


def test_attach_reports_conflicts_and_strict_refuses(home: Home, tmp_path: Path, base: str) -> None:
    _layer(home, tmp_path, "one", {"etc/shared.conf": "one"})
    _layer(home, tmp_path, "two", {"etc/shared.conf": "two"})
    root = tmp_path / "root"
    root.mkdir()
    roots.mount(home, DatabaseRecords(home), root, ["one", "base"])
    try:
        with pytest.raises(Conflict, match=r"etc/shared\.conf"):
            attach.attach(home, DatabaseRecords(home), root, "two", strict=True)
        assert roots.mounts(home, DatabaseRecords(home))[0].layers == ["one@1", "base@1"]
        assert (root / "etc/shared.conf").read_text() == "one"
        result = attach.attach(home, DatabaseRecords(home), root, "two")
        assert [(c.path, c.first, c.second) for c in result.conflicts] == [
            ("etc/shared.conf", "two@1", "one@1")
        ]
        assert (root / "etc/shared.conf").read_text() == "two"  # attached on top: it wins
        with pytest.raises(Conflict, match="already attached"):
            attach.attach(home, DatabaseRecords(home), root, "two")
        with pytest.raises(NotFound):
            attach.detach(home, DatabaseRecords(home), root, "nope")
    finally:
        roots.umount(home, DatabaseRecords(home), root)


def test_cli_errors_are_one_line(cli: Cli, home: Home, tmp_path: Path, base: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for args, code in [
        (["mount", str(root), "--layer", "missing"], 3),
        (["mount", str(tmp_path / "nowhere"), "--layer", "base"], 3),
        (["mount", str(root), "--layer", "base", "--policy", "some"], 2),
        (["umount", str(root)], 3),
        (["attach", str(root), "base"], 3),
        (["mount", str(root), "--layer", "base", "--writable", "base"], 2),
    ]:
        result = cli(*args, check=False)
        assert (result.code, result.err.count("\n")) == (code, 1), (args, result.err)
        assert not mounted(root)


def test_mounted_layer_shows_what_was_imported(home: Home, tmp_path: Path) -> None:
    """Through EROFS and overlayfs: owners, modes, setuid, xattrs, mtimes, links, fifos."""
    src = rich_tree(tmp_path / "rich")
    os.chmod(src / "srv/data/one", 0o4755)
    import_layer(home, DatabaseRecords(home), "rich", src, allow_setuid=True)
    root = tmp_path / "root"
    root.mkdir()
    roots.mount(home, DatabaseRecords(home), root, ["rich"])
    try:
        assert snapshot(root) == snapshot(src)
        assert (root / "srv/data/one").stat().st_ino == (root / "srv/data/two").stat().st_ino
    finally:
        roots.umount(home, DatabaseRecords(home), root)
