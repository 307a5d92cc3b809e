"""Rebase through the store, the database and the CLI: one layer, the rule table, layers in
use, errors, and many layers at once (in parallel, interrupted, run again)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lamina.errors import Conflict
from lamina.home import Home
from lamina.layer.tree import Kind
from lamina.manager.rebase_records import DatabaseRebase
from lamina.manager.services import layers as svc
from lamina.names import parse_ref
from lamina.rebase.run import rebase_all, rebase_one
from lamina.rebase.views import flatten
from tests.conftest import LAMINA, Cli
from tests.rebase.layers import base, tree_of, writable
from tests.rebase.trees import W

CONF = "a=1\nb=2\nc=3\nd=4\n"
V1 = {
    "etc/app.conf": CONF,
    "etc/hosts": "127.0.0.1 localhost\n",
    "usr/bin/tool": "tool v1\n",
    "usr/share/doc/readme": "doc v1\n",
    "home/alice/notes": "hi\n",
}
V2 = {
    **V1,
    "etc/app.conf": CONF.replace("a=1", "a=2"),
    "usr/bin/tool": "tool v2\n",
    "usr/share/doc/readme": "doc v2\n",
    "usr/lib/new.so": "new\n",
}
ALICE = {
    "etc/app.conf": CONF.replace("d=4", "d=alice"),
    "usr/bin/tool": "alice's tool\n",
    "usr/share/doc/readme": W,
    "home/alice/notes": "alice's notes\n",
    "home/alice/new": "new\n",
}


@pytest.fixture
def bases(home: Home, tmp_path: Path) -> tuple[str, str]:
    old = base(home, tmp_path, "base", dict(V1))
    new = base(home, tmp_path, "base", dict(V2))
    return old, new


def _shown(home: Home, ref: str, on: str) -> dict[str, bytes | None]:
    view = flatten([tree_of(home, ref), tree_of(home, on)])
    return {
        p: (read_store(home, e) if e.kind is Kind.FILE else None)
        for p, e in view.entries.items()
        if p
    }


def read_store(home: Home, e: object) -> bytes:
    from lamina.rebase.run import reader

    return reader(home.store)(e)  # type: ignore[arg-type]


def test_one_layer_end_to_end(cli: Cli, home: Home, bases: tuple[str, str]) -> None:
    writable(home, "alice", ["base@1"], ALICE)
    report = cli.json("rebase", "alice", "--onto", "base@2")
    assert (report["from"], report["ref"], report["status"]) == ("alice@1", "alice@2", "rebased")
    assert report["bases"] == {"old": ["base@1"], "new": ["base@2"]}
    assert [m["path"] for m in report["merged"]] == ["/etc/app.conf"]
    assert report["conflicts"] == [
        {
            "path": "/usr/bin/tool",
            "reason": "both changed: update's wins, user's saved",
            "rule": "admin",
            "saved": "/var/lib/lamina/conflicts/usr/bin/tool",
        },
        {
            "path": "/usr/share/doc/readme",
            "reason": "deleted by the user, changed by the update: the update's version is back",
            "rule": "admin",
        },
    ]
    kept = {k["path"] for k in report["kept"]}
    assert {"/home/alice/notes", "/home/alice/new"} <= kept
    shown = _shown(home, "alice@2", "base@2")
    assert shown["etc/app.conf"] == CONF.replace("a=1", "a=2").replace("d=4", "d=alice").encode()
    assert shown["usr/bin/tool"] == b"tool v2\n"
    assert shown["var/lib/lamina/conflicts/usr/bin/tool"] == b"alice's tool\n"
    assert shown["usr/share/doc/readme"] == b"doc v2\n"
    assert shown["usr/lib/new.so"] == b"new\n"
    assert shown["home/alice/notes"] == b"alice's notes\n"
    with home.session() as session:
        v = svc.get_version(session, parse_ref("alice"))
        parent = v.parent_id
        assert [b.base_ref for b in v.bases] == ["base@2"] and v.policy == "all"
        assert parent == svc.get_version(session, parse_ref("alice@1")).id
        assert v.source == "rebase of alice@1 onto base@2"
    again = cli.json("rebase", "alice", "--onto", "base@2")  # nothing to do: no new version
    assert again["status"] == "already" and again["ref"] is None
    assert cli.json("layer", "log", "alice")[-1]["ref"] == "alice@2"


def test_text_report_dry_run_and_verbose(cli: Cli, home: Home, bases: tuple[str, str]) -> None:
    writable(home, "alice", ["base@1"], ALICE)
    dry = cli("rebase", "alice", "--onto", "base@2", "--dry-run")
    lines = dry.out.splitlines()
    assert lines[0] == "alice@1 -> (dry run: nothing stored): base@1 -> base@2"
    assert lines[1].startswith(
        "kept 2, applied 0, merged 1, conflicts 2 (the update changed 5 paths)"
    )
    assert "M /etc/app.conf: both changed: lines merged" in lines
    assert any(
        line.startswith("C /usr/bin/tool:") and "conflicts/usr/bin/tool" in line for line in lines
    )
    assert not any(line.startswith("K ") for line in lines)
    assert [v["ref"] for v in cli.json("layer", "log", "alice")] == ["alice@1"]  # nothing stored
    loud = cli("rebase", "alice", "--onto", "base@2", "--dry-run", "-v")
    assert "K /home/alice/new: made by the user" in loud.out.splitlines()


def test_rule_table_cli_changes_the_outcome(cli: Cli, home: Home, bases: tuple[str, str]) -> None:
    writable(home, "alice", ["base@1"], ALICE)
    assert cli.json("rebase", "policy", "show")[0] == {"glob": "/home/**", "rule": "user"}
    table = cli.json("rebase", "policy", "set", "/etc/app.conf", "admin")
    assert table[0] == {"glob": "/etc/app.conf", "rule": "admin"}
    assert cli.json("rebase", "policy", "which", "/etc/app.conf")["rule"] == "admin"
    assert cli.json("rebase", "policy", "which", "/etc/hosts") == {
        "path": "/etc/hosts",
        "rule": "merge",
        "glob": "/etc/**",
    }
    report = cli.json("rebase", "alice", "--onto", "base@2")
    assert "/etc/app.conf" in [c["path"] for c in report["conflicts"]]
    shown = _shown(home, "alice@2", "base@2")
    assert shown["etc/app.conf"] == CONF.replace("a=1", "a=2").encode()
    assert shown["var/lib/lamina/conflicts/etc/app.conf"] == CONF.replace("d=4", "d=alice").encode()
    assert cli.json("rebase", "policy", "rm", "/etc/app.conf")[0]["glob"] == "/home/**"
    cli("rebase", "policy", "set", "/srv/**", "user", "--at", "3")
    assert cli.json("rebase", "policy", "show")[2] == {"glob": "/srv/**", "rule": "user"}
    assert cli.json("rebase", "policy", "reset")[2] == {"glob": "/etc/**", "rule": "merge"}
    bad = cli("rebase", "policy", "set", "etc/**", "nobody", check=False)
    assert (bad.code, bad.err.count("\n")) == (2, 1)


def test_layer_in_use_is_refused(cli: Cli, home: Home, bases: tuple[str, str]) -> None:
    writable(home, "alice", ["base@1"], ALICE)
    with home.session() as session:
        layer = svc.get_layer(session, "alice")
        svc.add_mount(
            session,
            host="elsewhere",
            root="/srv/roots/alice",
            layers=[svc.get_version(session, parse_ref("base@1"))],
            writable=layer,
            writable_version=svc.latest_version(session, layer),
            policy="all",
        )
    refused = cli("rebase", "alice", "--onto", "base@2", check=False)
    assert refused.code == 9 and "mounted on elsewhere:/srv/roots/alice" in refused.err
    with pytest.raises(Conflict):
        rebase_one(home, DatabaseRebase(home), "alice", "base@2")
    assert [v["ref"] for v in cli.json("layer", "log", "alice")] == ["alice@1"]


def test_layer_held_by_a_users_session_is_refused(home: Home, bases: tuple[str, str]) -> None:
    from lamina.manager.models import Image, ImageVersion, Machine, UserSession, WritableLayer
    from lamina.manager.services import access

    with home.session() as session:
        user = access.add_user(session, name="bob")
        image = Image(name="golden")
        session.add(image)
        session.flush()
        iv = ImageVersion(image_id=image.id, version=1, size=0, chunk_size=65536, manifest_id="0")
        session.add(iv)
        session.flush()
        machine = Machine(
            name="pc1",
            image_version_id=iv.id,
            hostname="pc1",
            machine_id="0" * 32,
            mac="52:54:00:00:00:01",
            token_hash="0" * 64,
        )
        session.add(machine)
        session.flush()
        wl = session.query(WritableLayer).filter_by(user_id=user.id).one()
        session.add(UserSession(user_id=user.id, machine_id=machine.id, writable_id=wl.id))
    writable(home, "writable-bob", ["base@1"], {"home/bob/x": "x"})
    with pytest.raises(Conflict, match="in a session on machine pc1"):
        rebase_one(home, DatabaseRebase(home), "writable-bob", "base@2")
    bulk = rebase_all(home, DatabaseRebase(home), "base@1", "base@2", jobs=1)
    assert [(r.writable, r.status) for r in bulk.results] == [("writable-bob", "in-use")]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["alice", "--onto", "other@1"], 2, "not made on other"),
        (["alice", "--onto", "alice@1"], 2, "writable layer"),
        (["base", "--onto", "base@2"], 2, "only writable layers"),
        (["nobody", "--onto", "base@2"], 3, "no layer named"),
        (["alice", "--onto", "base@9"], 3, "no layer version base@9"),
        (["alice@1", "--onto", "base@2"], 2, "not the latest"),
        (["alice"], 2, "--onto"),
        (["--all", "--onto", "base@2"], 2, "--from"),
        (["--all", "--from", "other@1", "--onto", "base@2"], 2, "not one layer"),
    ],
)
def test_errors_are_one_line(
    cli: Cli,
    home: Home,
    tmp_path: Path,
    bases: tuple[str, str],
    args: list[str],
    code: int,
    message: str,
) -> None:
    base(home, tmp_path, "other", {"x": "1"})
    writable(home, "alice", ["base@1"], ALICE)
    writable(home, "alice", ["base@1"], {"home/alice/more": "x"})
    result = cli("rebase", *args, check=False)
    assert (result.code, result.err.count("\n")) == (code, 1), result.err
    assert message in result.err


def test_stack_of_layers_keeps_the_others(
    cli: Cli, home: Home, tmp_path: Path, bases: tuple[str, str]
) -> None:
    base(home, tmp_path, "app", {"opt/app/run": "app\n", "etc/app.conf": "app's\n"})
    writable(home, "alice", ["app@1", "base@1"], {"opt/app/run": "mine\n", "etc/hosts": "mine\n"})
    report = cli.json("rebase", "alice", "--onto", "base@2")
    assert report["bases"] == {"old": ["app@1", "base@1"], "new": ["app@1", "base@2"]}
    # the app layer hides the base's app.conf in both stacks: the update's change to it
    # does not show, and the user's files are kept
    assert report["counts"]["conflict"] == 0 and report["counts"]["kept"] >= 2
    view = _shown(home, "alice@2", "base@2")
    assert view["opt/app/run"] == b"mine\n"


def _bulk_setup(home: Home, tmp_path: Path, n: int) -> None:
    base(home, tmp_path, "base", dict(V1))
    base(home, tmp_path, "base", dict(V2))
    for i in range(n):
        specs = {f"home/u{i}/file": f"user {i}\n", "etc/app.conf": CONF + f"e={i}\n"}
        if i % 3 == 0:
            specs["usr/bin/tool"] = f"tool of {i}\n"
        writable(home, f"w{i:03d}", ["base@1"], specs)


def _on(home: Home, ref: str) -> dict[str, list[str]]:
    """Writable layer -> its versions made on ``ref``."""
    with home.session(read_only=True) as session:  # polled while workers write
        found: dict[str, list[str]] = {}
        for v in svc.based_on(session, version=svc.get_version(session, parse_ref(ref))):
            found.setdefault(v.layer.name, []).append(v.ref)
        return found


def test_all_in_parallel_idempotent(cli: Cli, home: Home, tmp_path: Path) -> None:
    _bulk_setup(home, tmp_path, 40)
    base(home, tmp_path, "other", {"x": "1"})
    writable(home, "elsewhere", ["other@1"], {"x": "2"})
    dry = cli.json("rebase", "--all", "--from", "base@1", "--onto", "base@2", "--dry-run")
    assert dry["counts"] == {"dry-run": 40} and _on(home, "base@2") == {}
    result = cli.json("rebase", "--all", "--from", "base@1", "--onto", "base@2", "--jobs", "2")
    assert result["counts"] == {"rebased": 40} and not result["interrupted"]
    layers = {r["writable"]: r for r in result["layers"]}
    assert layers["w003"]["conflicts"][0]["saved"] == "/var/lib/lamina/conflicts/usr/bin/tool"
    assert layers["w004"]["merged"][0]["path"] == "/etc/app.conf"
    on_new = _on(home, "base@2")
    assert sorted(on_new) == [f"w{i:03d}" for i in range(40)]
    assert all(v == [f"{name}@2"] for name, v in on_new.items())
    shown = _shown(home, "w007@2", "base@2")
    assert shown["etc/app.conf"] == (CONF.replace("a=1", "a=2") + "e=7\n").encode()
    again = cli.json("rebase", "--all", "--from", "base@1", "--onto", "base@2")
    assert again["counts"] == {"already": 40}
    assert _on(home, "base@2") == on_new  # nothing recorded twice
    text = cli("rebase", "--all", "--from", "base@1", "--onto", "base@2")
    assert text.out.startswith("rebased 0 writable layers from base@1 onto base@2")
    assert "40 already on base@2" in text.out.splitlines()


def test_all_interrupted_then_run_again(home: Home, tmp_path: Path) -> None:
    _bulk_setup(home, tmp_path, 240)
    env = {**os.environ, "LAMINA_HOME": str(home.root)}
    cmd = [LAMINA, "rebase", "--all", "--from", "base@1", "--onto", "base@2", "--jobs", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _on(home, "base@2") and time.monotonic() < deadline:
        time.sleep(0.05)  # wait for the first recorded layer, then interrupt
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    first = _on(home, "base@2")
    assert proc.returncode == 130 and "run the same command again" in err
    assert 0 < len(first) < 240, len(first)
    assert all(v == [f"{name}@2"] for name, v in first.items())
    bulk = rebase_all(home, DatabaseRebase(home), "base@1", "base@2", jobs=2)
    statuses = {r.writable: r.status for r in bulk.results}
    assert {n for n, s in statuses.items() if s == "already"} == set(first)
    assert {n for n, s in statuses.items() if s == "rebased"} == {
        f"w{i:03d}" for i in range(240)
    } - set(first)
    final = _on(home, "base@2")
    assert len(final) == 240 and all(v == [f"{name}@2"] for name, v in final.items())


def test_profile_layer_keeps_the_users_version(
    home: Home, tmp_path: Path, bases: tuple[str, str]
) -> None:
    """A profile layer keeps only home directories: the conflicts directory would be dropped
    at its next umount, so a rule that would move the user's version there keeps it."""
    from lamina.manager.services import rebase as rsvc

    with home.session() as session:
        rsvc.set_rules(session, rsvc.get_rules(session).set("/home/**", "admin"))
    three = base(home, tmp_path, "base", {**V2, "home/alice/notes": "admin's\n"})
    writable(home, "p", ["base@1"], {"home/alice/notes": "mine\n"}, policy="profile")
    writable(home, "a", ["base@1"], {"home/alice/notes": "mine\n"}, policy="all")
    kept = rebase_one(home, DatabaseRebase(home), "p", three)
    assert [(i.path, i.action.value, i.rule) for i in kept.items] == [
        ("home/alice/notes", "kept", "user")
    ]
    assert "policy drops /var/lib/lamina/conflicts" in kept.items[0].reason
    shown = _shown(home, "p@2", three)
    assert shown["home/alice/notes"] == b"mine\n"
    assert not any(p.startswith("var/") for p in shown)
    moved = rebase_one(
        home, DatabaseRebase(home), "a", three
    )  # the same change in an "all" layer: moved aside
    assert [(i.action.value, i.saved) for i in moved.items] == [
        ("conflict", "var/lib/lamina/conflicts/home/alice/notes")
    ]
