"""What a writable layer keeps of a root's changes (pure): policies, merges, diffs.

- **Policies** (App Volumes' writable-volume templates) decide what of a mounted root's changes
  a writable layer keeps: ``all`` every change, ``profile`` only users' home directories
  (``/home``, ``/root``), ``apps`` everything except those.
- **Merging** a root's upper directory (overlayfs' changes: files, whiteouts, opaque
  directories) into the writable layer's previous version gives its next version, still a
  set of file-level changes against the read-only layers it was made on. Whiteouts and
  opaque flags that hide nothing in those layers are pruned, so a file created in one
  mount and deleted in a later one leaves no trace.
- **Diffs** between two versions' trees (``layer diff``).

Conflicts between app layers are in ``lamina.layer.conflicts``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

from lamina.layer.tree import Entry, Kind, Tree, is_under


class WritablePolicy(StrEnum):
    ALL = "all"
    PROFILE = "profile"
    APPS = "apps"


HOME_DIRS: Final = ("home", "root")


def is_home(path: str) -> bool:
    return any(is_under(path, top) for top in HOME_DIRS)


def keeps(policy: WritablePolicy, path: str) -> bool:
    """Whether a writable layer under ``policy`` keeps a change at ``path``."""
    if not path:  # the root directory's own metadata is not a user change
        return False
    if policy is WritablePolicy.ALL:
        return True
    return is_home(path) == (policy is WritablePolicy.PROFILE)


def filter_policy(tree: Tree, policy: WritablePolicy) -> tuple[Tree, list[str]]:
    """The entries ``policy`` keeps, and the paths it drops."""
    kept: list[Entry] = []
    dropped: list[Entry] = []
    for e in tree:
        (kept if keeps(policy, e.path) else dropped).append(e)
    return Tree.of(kept), [e.path for e in dropped if e.path]


def merge_changes(previous: Tree | None, changes: Tree) -> Tree:
    """``previous`` with a root's ``changes`` (an overlayfs upper directory) on top."""
    result: dict[str, Entry] = {e.path: e for e in previous or ()}

    def drop(path: str, *, keep_top: bool) -> None:
        top = result.get(path)
        if top is not None and top.kind is Kind.DIR:  # only directories have anything beneath
            for p in [p for p in result if p != path and is_under(p, path)]:
                del result[p]
        if not keep_top:
            result.pop(path, None)

    for change in changes:  # parents first: a directory is settled before its children come
        e, before = change, result.get(change.path)
        if e.kind is Kind.DIR and not e.opaque and before is not None:
            if before.kind is Kind.DIR:
                e = replace(e, opaque=before.opaque)  # a copied-up directory keeps its flag
            else:
                # A directory made where the previous version had a whiteout or a file:
                # it must hide whatever the read-only layers have beneath it.
                drop(e.path, keep_top=False)
                e = replace(e, opaque=True)
        elif e.kind is Kind.DIR:
            drop(e.path, keep_top=True)
        elif before is not None:
            drop(e.path, keep_top=False)
        result[e.path] = e
    return Tree.of(result.values())


def prune(tree: Tree, in_bases: Callable[[str], bool]) -> Tree:
    """Drop whiteouts, and clear opaque flags, where the base layers have nothing to hide."""
    out = []
    for e in tree:
        if e.kind is Kind.WHITEOUT and not in_bases(e.path):
            continue
        out.append(replace(e, opaque=False) if e.opaque and not in_bases(e.path) else e)
    return Tree.of(out)


@dataclass(frozen=True, slots=True)
class Diff:
    added: list[str]
    removed: list[str]
    changed: list[str]


def diff(a: Tree, b: Tree) -> Diff:
    """Paths added, removed and changed (content, kind, mode, owner, xattrs) from a to b."""
    old = {e.path: e for e in a if e.path}  # the root directory is not a path of either
    new = {e.path: e for e in b if e.path}
    return Diff(
        added=sorted(new.keys() - old.keys()),
        removed=sorted(old.keys() - new.keys()),
        changed=sorted(p for p in old.keys() & new.keys() if not old[p].same_content(new[p])),
    )
