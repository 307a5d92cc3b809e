"""Random bases, random updates, random user changes: nothing the user made is lost.

Old base: files, directories and symlinks under /etc, /usr/lib, /home/u, /opt and /var.
The update and the user each apply random operations to it (write, edit a line, append,
delete, chmod, chown, make a directory or a symlink of a path; the user may also remove a
directory and make it again). The user's writable layer is derived the way overlayfs writes
an upper directory (changed entries with their parents, whiteouts, opaque directories).

Properties, with S the view of the result mounted on the new base:
- every path the user changed is shown as the user left it, or was merged (the user's
  metadata changes and added lines are in it), or a conflict was recorded for it (or for a
  directory above it) and the user's version is where the report says;
- a path the user deleted is not shown unless a conflict was recorded for it;
- a path only the update changed is shown as the update left it;
- the result is a well-formed change set (every parent a directory).
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.layer.tree import Entry, Kind, Tree
from lamina.rebase.merge import rebase_tree
from lamina.rebase.report import Action, Item
from lamina.rebase.rules import RuleTable
from lamina.rebase.views import BaseChange, View, flatten, same
from tests.rebase.trees import NOW, chunk, read, shown

TOPS = ("etc", "usr/lib", "home/u", "opt", "var")
NAMES = ("a", "b")
PATHS = tuple(
    [f"{t}/{x}" for t in TOPS for x in NAMES]
    + [f"{t}/{x}/{y}" for t in TOPS for x in NAMES for y in NAMES]
)
LINES = ("one\n", "two\n", "three\n", "four\n", "five\n")


def _parents(path: str) -> list[str]:
    out = []
    while "/" in path:
        path = path.rpartition("/")[0]
        out.append(path)
    return out


def _file(path: str, data: bytes, mode: int = 0o644, uid: int = 0) -> Entry:
    return Entry(path, Kind.FILE, mode, uid, size=len(data), chunks=(chunk(data),) if data else ())


def _dir(path: str, mode: int = 0o755) -> Entry:
    return Entry(path, Kind.DIR, mode)


texts = st.lists(st.sampled_from(LINES), min_size=3, max_size=8).map(
    lambda ls: "".join(ls).encode()
)
contents = st.one_of(
    texts, texts, texts, texts, st.binary(min_size=1, max_size=8).map(lambda b: b"\0" + b)
)


def _put(view: dict[str, Entry], e: Entry) -> None:
    """Place ``e`` in ``view`` (a flat path -> entry map), replacing what was there."""
    for a in reversed(_parents(e.path)):
        have = view.get(a)
        if have is None or have.kind is not Kind.DIR:
            _remove(view, a)
            view[a] = _dir(a)
    _remove(view, e.path)
    view[e.path] = e


def _remove(view: dict[str, Entry], path: str) -> None:
    for p in [p for p in view if p == path or p.startswith(path + "/")]:
        del view[p]


@st.composite
def operations(
    draw: st.DrawFn, *, user: bool, hot: tuple[str, ...] = ()
) -> list[tuple[str, str, object]]:
    kinds = ["write", "edit", "append", "prepend", "delete", "chmod", "chown", "mkdir", "symlink"]
    kinds += ["edit", "append", "prepend"] * 4  # line changes, often, so that merges happen
    if user:
        kinds.append("recreate")
    n = draw(st.integers(0, 10))
    return [
        (draw(st.sampled_from(kinds)), draw(st.sampled_from(hot + PATHS)), draw(contents))
        for _ in range(n)
    ]


def apply(view: dict[str, Entry], ops: list[tuple[str, str, object]], recreated: set[str]) -> None:
    for op, path, arg in ops:
        e = view.get(path)
        if op == "write":
            _put(view, _file(path, arg))  # type: ignore[arg-type]
        elif op in ("edit", "append", "prepend") and e is not None and e.kind is Kind.FILE:
            lines = read(e).splitlines(keepends=True)
            if op == "prepend":
                lines.insert(0, b"first\n")
            elif op == "append" or not lines:
                lines.append(b"added\n")
            else:
                lines[len(lines) // 2] = b"edited\n"
            _put(view, replace(_file(path, b"".join(lines)), mode=e.mode, uid=e.uid))
        elif op == "delete" and e is not None:
            _remove(view, path)
        elif op == "chmod" and e is not None and e.kind is not Kind.SYMLINK:
            view[path] = replace(e, mode=e.mode ^ 0o020)
        elif op == "chown" and e is not None:
            view[path] = replace(e, uid=e.uid + 1)
        elif op == "mkdir" and (e is None or e.kind is not Kind.DIR):
            _put(view, _dir(path, 0o750))
        elif op == "symlink":
            _put(view, Entry(path, Kind.SYMLINK, 0o777, target="/elsewhere"))
        elif op == "recreate" and e is not None and e.kind is Kind.DIR:
            _remove(view, path)
            _put(view, _dir(path))
            recreated.add(path)
            _put(view, _file(path + "/fresh", b"fresh\n"))


def upper(old: dict[str, Entry], user: dict[str, Entry], recreated: set[str]) -> Tree:
    """The user's view as overlayfs would have written its upper directory."""
    out: dict[str, Entry] = {}
    opaque: set[str] = set()

    def emit(p: str, e: Entry) -> None:
        out[p] = e
        for a in _parents(p):
            if a not in out:
                out[a] = user[a]

    for p in sorted(user):
        u, o = user[p], old.get(p)
        inside = any(a in opaque for a in _parents(p))
        make_opaque = u.kind is Kind.DIR and (
            p in recreated or (o is not None and o.kind is not Kind.DIR)
        )
        if make_opaque and not inside:
            opaque.add(p)
        if inside or make_opaque or not same(u, o):
            emit(p, replace(u, opaque=make_opaque and not inside))
    for p in old:
        parent = p.rpartition("/")[0]
        holder = user.get(parent) if parent else _dir("")
        hidden = any(a in opaque for a in [parent, *_parents(parent)] if a)
        if p not in user and holder is not None and holder.kind is Kind.DIR and not hidden:
            emit(p, Entry(p, Kind.WHITEOUT, 0))
    return Tree.of(out.values())


def _covering(items: dict[str, Item], path: str) -> Item | None:
    for p in [path, *_parents(path)]:
        if p in items:
            return items[p]
    return None


def _check_merged(item: Item, s: Entry | None, u: Entry, o: Entry | None) -> None:
    assert s is not None, item
    if o is not None:
        for field in ("mode", "uid", "gid", "xattrs"):
            if getattr(u, field) != getattr(o, field) and "both changed" not in item.reason:
                assert getattr(s, field) == getattr(u, field), (item, field)
    if "lines merged" in item.reason:
        added = set(read(u).splitlines()) - set(read(o).splitlines() if o else [])
        assert added <= set(read(s).splitlines()), item
    elif "content from the user" in item.reason:
        assert (s.kind, s.chunks, s.target) == (u.kind, u.chunks, u.target)


def check(
    old_view: View, new_view: View, user_view: View, user: Tree, shown_view: View, items: list[Item]
) -> None:
    by_path = {i.path: i for i in items}
    changed = {p for p, e in user_view.entries.items() if p and not same(e, old_view.get(p))}
    deleted = {p for p in old_view.entries if p and p not in user_view}
    for p in changed:
        u, s = user_view.get(p), shown_view.get(p)
        assert u is not None
        if s is not None and same(s, u):
            continue
        item = _covering(by_path, p)
        assert item is not None, f"/{p}: changed by the user, not shown, not reported"
        if item.action is Action.MERGED and item.path == p:
            _check_merged(item, s, u, old_view.get(p))
            continue
        assert item.action is Action.CONFLICT and item.saved, (p, item)
        copy = shown_view.get(item.saved + p[len(item.path) :])
        assert copy is not None and same(replace(copy, path=p), u), (p, item)
    for p in deleted:
        if shown_view.get(p) is not None:
            item = _covering(by_path, p)
            assert item is not None and item.action is Action.CONFLICT, (p, item)
    marks = {e.path for e in user if e.kind is not Kind.DIR or e.opaque} | {
        p for p in changed | deleted
    }
    above = {a for m in marks for a in _parents(m)}  # directories holding a user change
    for p, n in new_view.entries.items():
        if not p or same(n, old_view.get(p)) or p in above:
            continue
        if any(a in marks for a in [p, *_parents(p)]):
            continue  # the user changed it or something above it
        assert same(shown_view.get(p), n), f"/{p}: only the update changed it"
    for p in new_view.entries.keys() - old_view.entries.keys() - user_view.entries.keys():
        if not any(a in marks for a in [p, *_parents(p)]):
            assert shown_view.get(p) is not None, p


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.dictionaries(st.sampled_from(PATHS), contents, max_size=14), data=st.data())
def test_nothing_the_user_made_is_lost(base: dict[str, bytes], data: st.DataObject) -> None:
    # Both sides pick the base's own files more often than not: that is where they meet.
    hot = tuple(sorted(base)) * 10
    update = data.draw(operations(user=False, hot=hot), "update")
    change = data.draw(operations(user=True, hot=hot), "change")
    old: dict[str, Entry] = {}
    for p in sorted(base):
        if not any(a in old and old[a].kind is not Kind.DIR for a in _parents(p)):
            _put(old, _file(p, base[p]))
    new, user = dict(old), dict(old)
    apply(new, update, set())
    recreated: set[str] = set()
    apply(user, change, recreated)
    old_tree = Tree.of([_dir(""), *old.values()])
    new_tree = Tree.of([_dir(""), *new.values()])
    changes = upper(old, user, recreated)
    vo, vn = flatten([old_tree]), flatten([new_tree])
    vu = flatten([changes, old_tree])
    assert {p for p in vu.entries if p} == set(user)  # the upper directory is faithful
    out = rebase_tree(changes, BaseChange.of(vo, vn), RuleTable(), read, now_ns=NOW)
    for e in out.tree:
        if "/" in e.path:
            parent = out.tree.get(e.path.rpartition("/")[0])
            assert parent is not None and parent.kind is Kind.DIR, e.path
    check(vo, vn, vu, changes, shown(out, new_tree), out.items)
