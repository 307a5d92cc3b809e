"""Flattening a stack of layers, and what changed between two stacks (pure)."""

from __future__ import annotations

from lamina.layer.tree import Kind
from lamina.rebase.views import BaseChange, flatten
from tests.rebase.trees import OPQ, H, W, data, tree


def test_first_layer_wins_and_hides() -> None:
    base = tree({"etc/a": "base", "etc/b": "base", "usr/lib/x/one": "1", "opt/d/f": "f"})
    app = tree(
        {"etc/a": "app", "etc/b": W, "usr/lib/x": OPQ, "usr/lib/x/two": "2", "opt/d": "file"}
    )
    view = flatten([app, base])
    assert data(view, "etc/a") == b"app"
    assert view.get("etc/b") is None
    assert view.get("usr/lib/x/one") is None and data(view, "usr/lib/x/two") == b"2"
    x = view.get("usr/lib/x")
    assert x is not None and not x.opaque
    assert data(view, "opt/d") == b"file" and view.get("opt/d/f") is None
    assert view.children("usr/lib/x") == ["usr/lib/x/two"]
    assert view.subtree("usr") == ["usr/lib", "usr/lib/x", "usr/lib/x/two"]


def test_hard_links_read_as_copies() -> None:
    view = flatten([tree({"a/f": "data", "a/g": H("a/f")})])
    g = view.get("a/g")
    assert g is not None and g.kind is Kind.FILE and data(view, "a/g") == b"data"


def test_changed_paths_between_stacks() -> None:
    old = flatten([tree({"etc/a": "1", "etc/b": "1", "usr/x/y": "1"})])
    new = flatten([tree({"etc/a": "2", "etc/b": "1", "usr/x/z": "1"})])
    change = BaseChange.of(old, new)
    assert change.changed == {"etc/a", "usr/x/y", "usr/x/z"}
    assert change.changed_at_or_under("usr/x") and change.changed_at_or_under("usr")
    assert not change.changed_at_or_under("etc/b") and not change.changed_at_or_under("us")
