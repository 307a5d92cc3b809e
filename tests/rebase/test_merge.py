"""Every rule of the path-by-path merge, one row each (pure: trees in memory)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from lamina.layer.changes import WritablePolicy
from lamina.layer.tree import Kind
from lamina.rebase.merge import CONFLICTS_DIR
from lamina.rebase.report import Action
from lamina.rebase.rules import RuleTable
from tests.rebase.trees import OPQ, Case, D, Dm, F, H, L, Spec, W, data

GONE = object()  # the path must not be shown
ETC = "a=1\nb=2\nc=3\nd=4\ne=5\n"


@dataclass
class Row:
    old: dict[str, Spec]
    new: dict[str, Spec]
    user: dict[str, Spec]
    report: dict[str, tuple[Action, str | None]]  # path -> (action, rule consulted)
    shows: dict[str, object] = field(default_factory=dict)  # path -> bytes/str, GONE, Kind, F
    saved: dict[str, str] = field(default_factory=dict)  # path -> where the other version went
    policy: WritablePolicy | None = None


def conflict_copy(path: str) -> str:
    return f"{CONFLICTS_DIR}/{path}"


ROWS: dict[str, Row] = {
    # -- one side only ------------------------------------------------------------------
    "only the user changed: kept": Row(
        {"usr/bin/x": "v1"},
        {"usr/bin/x": "v1"},
        {"usr/bin/x": "mine"},
        {"usr/bin/x": (Action.KEPT, None)},
        {"usr/bin/x": "mine"},
    ),
    "only the update changed: shown, nothing reported": Row(
        {"etc/a": "v1", "etc/b": "b"},
        {"etc/a": "v2", "etc/b": "b"},
        {"etc/b": "mine"},
        {"etc/b": (Action.KEPT, None)},
        {"etc/a": "v2", "etc/b": "mine"},
    ),
    "user's copy-up unchanged, update changed: applied": Row(
        {"usr/bin/x": "v1"},
        {"usr/bin/x": "v2"},
        {"usr/bin/x": "v1"},
        {"usr/bin/x": (Action.APPLIED, None)},
        {"usr/bin/x": "v2"},
    ),
    "the same change on both sides: applied": Row(
        {"etc/a": "v1"},
        {"etc/a": "v2"},
        {"etc/a": "v2"},
        {"etc/a": (Action.APPLIED, None)},
        {"etc/a": "v2"},
    ),
    "made by the user, nothing in either base: kept": Row(
        {"etc/a": "1"},
        {"etc/a": "2"},
        {"srv/new/file": "mine"},
        {"srv/new/file": (Action.KEPT, None), "srv": (Action.KEPT, None)},
        {"srv/new/file": "mine"},
    ),
    # -- both changed a text file under /etc --------------------------------------------
    "/etc, both changed, apart: lines merged": Row(
        {"etc/app.conf": ETC},
        {"etc/app.conf": ETC.replace("a=1", "a=9")},
        {"etc/app.conf": ETC.replace("e=5", "e=user")},
        {"etc/app.conf": (Action.MERGED, "merge")},
        {"etc/app.conf": "a=9\nb=2\nc=3\nd=4\ne=user\n", "etc/app.conf.lamina-new": GONE},
    ),
    "/etc, both changed, overlapping: user's kept, update's as .lamina-new": Row(
        {"etc/app.conf": ETC},
        {"etc/app.conf": ETC.replace("c=3", "c=admin")},
        {"etc/app.conf": ETC.replace("c=3", "c=user")},
        {"etc/app.conf": (Action.CONFLICT, "merge")},
        {
            "etc/app.conf": ETC.replace("c=3", "c=user"),
            "etc/app.conf.lamina-new": ETC.replace("c=3", "c=admin"),
        },
        {"etc/app.conf": "etc/app.conf.lamina-new"},
    ),
    "/etc, both changed a binary file: user's kept, update's beside it": Row(
        {"etc/db": b"\0v1"},
        {"etc/db": b"\0v2"},
        {"etc/db": b"\0mine"},
        {"etc/db": (Action.CONFLICT, "merge")},
        {"etc/db": b"\0mine", "etc/db.lamina-new": b"\0v2"},
        {"etc/db": "etc/db.lamina-new"},
    ),
    "/etc, both made the file anew, differently: overlap": Row(
        {"etc/a": "x"},
        {"etc/a": "x", "etc/new.conf": "admin\n"},
        {"etc/new.conf": "user\n"},
        {"etc/new.conf": (Action.CONFLICT, "merge")},
        {"etc/new.conf": "user\n", "etc/new.conf.lamina-new": "admin\n"},
    ),
    "/var falls back to merge": Row(
        {"var/lib/state": ETC},
        {"var/lib/state": ETC.replace("a=1", "a=0")},
        {"var/lib/state": ETC + "f=6\n"},
        {"var/lib/state": (Action.MERGED, "merge")},
        {"var/lib/state": ETC.replace("a=1", "a=0") + "f=6\n"},
    ),
    # -- both changed under /usr, /bin, /lib*, /opt: the update wins ----------------------
    **{
        f"/{top}, both changed: update's wins, user's saved": Row(
            {f"{top}/x": "v1"},
            {f"{top}/x": "v2"},
            {f"{top}/x": "mine"},
            {f"{top}/x": (Action.CONFLICT, "admin")},
            {f"{top}/x": "v2", conflict_copy(f"{top}/x"): "mine"},
            {f"{top}/x": conflict_copy(f"{top}/x")},
        )
        for top in ("usr/lib", "bin", "lib64", "lib", "opt/app")
    },
    "a name already taken in the conflicts directory gets a number": Row(
        {"usr/x": "v1"},
        {"usr/x": "v2"},
        {"usr/x": "mine", conflict_copy("usr/x"): "earlier"},
        {"usr/x": (Action.CONFLICT, "admin")},
        {conflict_copy("usr/x"): "earlier", conflict_copy("usr/x") + ".1": "mine"},
        {"usr/x": conflict_copy("usr/x") + ".1"},
    ),
    # -- home directories: the user always wins -----------------------------------------
    "/home, both changed: user's stays": Row(
        {"home/a/.profile": "v1"},
        {"home/a/.profile": "v2"},
        {"home/a/.profile": "mine"},
        {"home/a/.profile": (Action.KEPT, "user")},
        {"home/a/.profile": "mine"},
    ),
    "/root, both changed: user's stays": Row(
        {"root/.bashrc": "v1"},
        {"root/.bashrc": "v2"},
        {"root/.bashrc": "mine"},
        {"root/.bashrc": (Action.KEPT, "user")},
        {"root/.bashrc": "mine"},
    ),
    # -- deleted by one side, changed by the other --------------------------------------
    "user deleted, update left it: stays deleted": Row(
        {"etc/a": "1", "etc/b": "1"},
        {"etc/a": "1", "etc/b": "2"},
        {"etc/a": W},
        {"etc/a": (Action.KEPT, None)},
        {"etc/a": GONE},
    ),
    "user deleted, update deleted: nothing left to hide": Row(
        {"etc/a": "1", "etc/b": "1"},
        {"etc/b": "1"},
        {"etc/a": W},
        {"etc/a": (Action.KEPT, None)},
        {"etc/a": GONE},
    ),
    "/etc, user deleted, update changed: stays deleted, update's beside it": Row(
        {"etc/a": "1"},
        {"etc/a": "2"},
        {"etc/a": W},
        {"etc/a": (Action.CONFLICT, "merge")},
        {"etc/a": GONE, "etc/a.lamina-new": "2"},
    ),
    "/usr, user deleted, update changed: the update's is back": Row(
        {"usr/x": "1"},
        {"usr/x": "2"},
        {"usr/x": W},
        {"usr/x": (Action.CONFLICT, "admin")},
        {"usr/x": "2"},
    ),
    "/usr, user deleted a directory, update changed inside: all of it is back": Row(
        {"usr/share/app/a": "1", "usr/share/app/b": "1"},
        {"usr/share/app/a": "2", "usr/share/app/b": "1"},
        {"usr/share/app": W},
        {"usr/share/app": (Action.CONFLICT, "admin")},
        {"usr/share/app/a": "2", "usr/share/app/b": "1"},
    ),
    "/home, user deleted, update changed: stays deleted": Row(
        {"home/a/x": "1"},
        {"home/a/x": "2"},
        {"home/a/x": W},
        {"home/a/x": (Action.KEPT, "user")},
        {"home/a/x": GONE},
    ),
    "/usr, user changed, update deleted: deleted, user's saved": Row(
        {"usr/x": "1", "usr/y": "y"},
        {"usr/y": "y"},
        {"usr/x": "mine"},
        {"usr/x": (Action.CONFLICT, "admin")},
        {"usr/x": GONE, conflict_copy("usr/x"): "mine"},
    ),
    "/etc, user changed, update deleted: user's stays, reported": Row(
        {"etc/x": "1", "etc/y": "y"},
        {"etc/y": "y"},
        {"etc/x": "mine"},
        {"etc/x": (Action.CONFLICT, "merge")},
        {"etc/x": "mine"},
    ),
    "/home, user changed, update deleted: user's stays": Row(
        {"home/a/x": "1"},
        {"home/b": D},
        {"home/a/x": "mine"},
        {"home/a/x": (Action.KEPT, "user")},
        {"home/a/x": "mine"},
    ),
    # -- kind changes -------------------------------------------------------------------
    "user made a symlink of a file, update left it: kept": Row(
        {"etc/x": "1", "etc/y": "1"},
        {"etc/x": "1", "etc/y": "2"},
        {"etc/x": L("y")},
        {"etc/x": (Action.KEPT, None)},
        {"etc/x": Kind.SYMLINK},
    ),
    "/etc, user made a symlink, update changed the file: both kept": Row(
        {"etc/x": "1"},
        {"etc/x": "2"},
        {"etc/x": L("/srv/x")},
        {"etc/x": (Action.CONFLICT, "merge")},
        {"etc/x": Kind.SYMLINK, "etc/x.lamina-new": "2"},
    ),
    "/usr, user made a directory of a file, update changed the file: file wins, dir saved": Row(
        {"usr/lib/x": "1"},
        {"usr/lib/x": "2"},
        {"usr/lib/x": OPQ, "usr/lib/x/inner": "mine"},
        {"usr/lib/x": (Action.CONFLICT, "admin")},
        {"usr/lib/x": "2", conflict_copy("usr/lib/x") + "/inner": "mine"},
    ),
    "/home, user made a directory of a file, update changed the file: dir stays": Row(
        {"home/a/x": "1"},
        {"home/a/x": "2"},
        {"home/a/x": OPQ, "home/a/x/in": "mine"},
        {"home/a/x": (Action.KEPT, "user")},
        {"home/a/x/in": "mine", "home/a/x": Kind.DIR},
    ),
    "/etc, user made a directory of a file, update changed the file: file beside it": Row(
        {"etc/x": "1"},
        {"etc/x": "2"},
        {"etc/x": OPQ, "etc/x/in": "mine"},
        {"etc/x": (Action.CONFLICT, "merge")},
        {"etc/x/in": "mine", "etc/x.lamina-new": "2"},
    ),
    "/usr, update made a directory of a file the user changed: dir wins, file saved": Row(
        {"usr/share/x": "1"},
        {"usr/share/x/in": "2"},
        {"usr/share/x": "mine"},
        {"usr/share/x": (Action.CONFLICT, "admin")},
        {"usr/share/x/in": "2", conflict_copy("usr/share/x"): "mine"},
    ),
    "/etc, update made a directory of a file the user changed: dir beside it": Row(
        {"etc/x.d": "1"},
        {"etc/x.d/one": "2"},
        {"etc/x.d": "mine"},
        {"etc/x.d": (Action.CONFLICT, "merge")},
        {"etc/x.d": "mine", "etc/x.d.lamina-new/one": "2"},
    ),
    "/opt, user made a symlink of a directory, update changed inside: directory wins": Row(
        {"opt/app/a": "1", "opt/app/b": "1"},
        {"opt/app/a": "2", "opt/app/b": "1"},
        {"opt/app": L("/srv/app")},
        {"opt/app": (Action.CONFLICT, "admin")},
        {"opt/app/a": "2", conflict_copy("opt/app"): Kind.SYMLINK},
    ),
    "/home, user made a symlink of a directory, update changed inside: symlink stays": Row(
        {"home/a/d/x": "1"},
        {"home/a/d/x": "2"},
        {"home/a/d": L("/srv/d")},
        {"home/a/d": (Action.KEPT, "user")},
        {"home/a/d": Kind.SYMLINK, "home/a/d/x": GONE},
    ),
    "user made a symlink of a directory, update left it: kept": Row(
        {"srv/d/x": "1", "etc/a": "1"},
        {"srv/d/x": "1", "etc/a": "2"},
        {"srv/d": L("/elsewhere")},
        {"srv/d": (Action.KEPT, None)},
        {"srv/d": Kind.SYMLINK},
    ),
    "update made a file of a directory the user had not changed: applied": Row(
        {"usr/x/a": "1"},
        {"usr/x": "file"},
        {"usr/x/a": "1"},
        {"usr/x": (Action.APPLIED, None)},
        {"usr/x": "file"},
    ),
    # -- ownership and mode only --------------------------------------------------------
    "/usr, user's chmod, update's new content: both": Row(
        {"usr/bin/x": F("v1", 0o755)},
        {"usr/bin/x": F("v2", 0o755)},
        {"usr/bin/x": F("v1", 0o700)},
        {"usr/bin/x": (Action.MERGED, None)},
        {"usr/bin/x": F("v2", 0o700)},
    ),
    "/etc, user's content, update's chown: both": Row(
        {"etc/x": F("v1")},
        {"etc/x": F("v1", uid=7)},
        {"etc/x": F("mine")},
        {"etc/x": (Action.MERGED, None)},
        {"etc/x": F("mine", uid=7)},
    ),
    "/usr, both chmod differently: update's wins, user's saved": Row(
        {"usr/x": F("v", 0o755)},
        {"usr/x": F("v", 0o750)},
        {"usr/x": F("v", 0o700)},
        {"usr/x": (Action.CONFLICT, "admin")},
        {"usr/x": F("v", 0o750), conflict_copy("usr/x"): F("v", 0o700)},
    ),
    "/etc, both chmod differently: user's mode kept": Row(
        {"etc/x": F("v", 0o644)},
        {"etc/x": F("v", 0o640)},
        {"etc/x": F("v", 0o600)},
        {"etc/x": (Action.MERGED, "merge")},
        {"etc/x": F("v", 0o600)},
    ),
    "user chmod a directory, update chown it: both": Row(
        {"srv/d/f": "1"},
        {"srv/d": Dm(uid=5), "srv/d/f": "1"},
        {"srv/d": Dm(0o700)},
        {"srv/d": (Action.MERGED, None)},
        {"srv/d": Dm(0o700, uid=5)},
    ),
    "a directory the user only passed through follows the update's metadata": Row(
        {"usr/share/f": "1"},
        {"usr/share": Dm(0o775), "usr/share/f": "1"},
        {"usr/share/new": "mine"},
        {"usr/share/new": (Action.KEPT, None)},
        {"usr/share": Dm(0o775), "usr/share/new": "mine"},
    ),
    # -- opaque directories -------------------------------------------------------------
    "/opt, user remade a directory, update changed a file in it: that file is back": Row(
        {"opt/app/a": "1", "opt/app/b": "1"},
        {"opt/app/a": "2", "opt/app/b": "1"},
        {"opt/app": OPQ, "opt/app/c": "mine"},
        {"opt/app/a": (Action.CONFLICT, "admin"), "opt/app/c": (Action.KEPT, None)},
        {"opt/app/a": "2", "opt/app/b": GONE, "opt/app/c": "mine"},
    ),
    "/home, user remade a directory, update added to it: stays hidden, still opaque": Row(
        {"home/a/d/x": "1"},
        {"home/a/d/x": "1", "home/a/d/y": "2"},
        {"home/a/d": OPQ},
        {"home/a/d/y": (Action.KEPT, "user")},
        {"home/a/d/x": GONE, "home/a/d/y": GONE},
    ),
    # -- hard links ---------------------------------------------------------------------
    "a hard link whose first name goes to the update becomes a copy": Row(
        {"usr/x": "v1"},
        {"usr/x": "v2"},
        {"usr/x": "v1", "usr/y": H("usr/x")},
        {"usr/x": (Action.APPLIED, None), "usr/y": (Action.KEPT, None)},
        {"usr/x": "v2", "usr/y": "v1"},
    ),
    # -- the layer's own policy ---------------------------------------------------------
    "a profile layer cannot keep the conflicts directory: user's stays": Row(
        {"home/a/x": "1"},
        {"home/a/x": "2"},
        {"home/a/x": "mine"},
        {"home/a/x": (Action.KEPT, "user")},
        {"home/a/x": "mine"},
        policy=WritablePolicy.PROFILE,
    ),
}


def _check_shown(shown: object, path: str, want: object) -> None:
    from lamina.rebase.views import View

    assert isinstance(shown, View)
    e = shown.get(path)
    if want is GONE:
        assert e is None, path
    elif isinstance(want, Kind):
        assert e is not None and e.kind is want, path
    elif isinstance(want, Dm):
        assert e is not None and e.kind is Kind.DIR, path
        assert (e.mode, e.uid, e.gid) == (want.mode, want.uid, want.gid), path
    elif isinstance(want, F):
        assert e is not None and (e.mode, e.uid, e.gid) == (want.mode, want.uid, want.gid), path
        assert data(shown, path) == (
            want.data.encode() if isinstance(want.data, str) else want.data
        )
    else:
        wanted = want.encode() if isinstance(want, str) else want
        assert data(shown, path) == wanted, path


@pytest.mark.parametrize("name", list(ROWS))
def test_rule(name: str) -> None:
    row = ROWS[name]
    out, shown = Case.of(row.old, row.new, row.user).run(policy=row.policy)
    got = {i.path: (i.action, i.rule) for i in out.items}
    for path, want in row.report.items():
        assert got.get(path) == want, (path, got)
    for path, want in row.shows.items():
        _check_shown(shown, path, want)
    saved = {i.path: i.saved for i in out.items if i.saved}
    for path, where in row.saved.items():
        assert saved.get(path) == where
    for e in out.tree:  # the result applies cleanly: every parent is a directory in it
        if "/" in e.path:
            parent = out.tree.get(e.path.rpartition("/")[0])
            assert parent is not None and parent.kind is Kind.DIR, e.path


def test_whiteouts_hiding_nothing_are_dropped() -> None:
    out, _ = Case.of({"etc/a": "1", "etc/b": "1"}, {"etc/b": "1"}, {"etc/a": W}).run()
    assert out.tree.get("etc/a") is None and out.tree.get("etc") is None


def test_unchanged_containers_are_dropped_and_opaque_flag_returns() -> None:
    case = Case.of(
        {"home/a/d/x": "1", "usr/bin/t": "1"},
        {"home/a/d/x": "1", "home/a/d/y": "2", "usr/bin/t": "2"},
        {"home/a/d": OPQ, "home/a/d/z": "mine", "usr/bin/t": "1"},
    )
    out, _ = case.run()
    assert out.tree.get("usr") is None  # held only the unchanged copy of t
    d = out.tree.get("home/a/d")
    assert d is not None and d.opaque and out.tree.get("home/a/d/x") is None


def test_policy_table_changes_the_outcome() -> None:
    case = Case.of({"etc/ssh/key": "1"}, {"etc/ssh/key": "2"}, {"etc/ssh/key": "mine"})
    table = RuleTable().set("/etc/ssh/**", "admin")
    out, shown = case.run(table)
    assert [(i.action, i.rule) for i in out.items if i.path == "etc/ssh/key"] == [
        (Action.CONFLICT, "admin")
    ]
    assert data(shown, "etc/ssh/key") == b"2"
    assert data(shown, conflict_copy("etc/ssh/key")) == b"mine"
    _, kept = case.run(RuleTable().set("/etc/**", "user"))
    assert data(kept, "etc/ssh/key") == b"mine"


def test_report_json_and_counts() -> None:
    out, _ = Case.of(
        {"usr/x": "1", "etc/a": "1"}, {"usr/x": "2", "etc/a": "2"}, {"usr/x": "m", "etc/b": "n"}
    ).run()
    report = out.report_json()
    assert report["conflicts"] == [
        {
            "path": "/usr/x",
            "reason": "both changed: update's wins, user's saved",
            "rule": "admin",
            "saved": "/var/lib/lamina/conflicts/usr/x",
        }
    ]
    assert [k["path"] for k in report["kept"]] == ["/etc/b"]
    assert report["counts"] == {
        "kept": 1,
        "applied": 0,
        "merged": 0,
        "conflict": 1,
        "update_changed": 2,
    }


def test_large_files_are_not_read() -> None:
    from lamina.rebase.diff3 import TEXT_LIMIT
    from lamina.rebase.merge import rebase_tree

    big = "x\n" * (TEXT_LIMIT // 2 + 1)
    case = Case.of({"var/db": big}, {"var/db": big + "admin\n"}, {"var/db": "user\n" + big})

    def refuse(_e: object) -> bytes:
        raise AssertionError("a large file was read")

    out = rebase_tree(case.user, case.base, RuleTable(), refuse)
    assert [(i.action, i.reason, i.saved) for i in out.items] == [
        (
            Action.CONFLICT,
            "both changed (too large to merge lines): user's stays, update's beside it",
            "var/db.lamina-new",
        )
    ]
