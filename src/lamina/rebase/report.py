"""What a rebase did, path by path: kept, applied, merged, conflicts (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from lamina.layer.tree import Tree


class Action(StrEnum):
    KEPT = "kept"  # the user's version stays as it was
    APPLIED = "applied"  # the new base's version is taken where the user had an entry
    MERGED = "merged"  # both sides' changes combined: lines, or content and metadata
    CONFLICT = "conflict"  # both changed and one version had to move aside (see ``saved``)


@dataclass(frozen=True, slots=True)
class Item:
    path: str  # tree path (no leading slash)
    action: Action
    reason: str
    rule: str | None = None  # the policy rule consulted (both sides changed), if any
    saved: str | None = None  # where the other version went: the user's or the update's

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": "/" + self.path, "reason": self.reason}
        if self.rule is not None:
            out["rule"] = self.rule
        if self.saved is not None:
            out["saved"] = "/" + self.saved
        return out


@dataclass
class Outcome:
    """The merged writable-layer tree and the report. Files in ``blobs`` (merged text) have
    no chunks yet: the caller stores their data and fills them in."""

    tree: Tree
    blobs: dict[str, bytes] = field(default_factory=dict)
    items: list[Item] = field(default_factory=list)
    update_changed: int = 0  # paths the new base changed against the old (shown through)

    def of(self, action: Action) -> list[Item]:
        return [i for i in self.items if i.action is action]

    def counts(self) -> dict[str, int]:
        return {a.value: sum(1 for i in self.items if i.action is a) for a in Action}

    def report_json(self) -> dict[str, Any]:
        return {
            "kept": [i.to_json() for i in self.of(Action.KEPT)],
            "applied": [i.to_json() for i in self.of(Action.APPLIED)],
            "merged": [i.to_json() for i in self.of(Action.MERGED)],
            "conflicts": [i.to_json() for i in self.of(Action.CONFLICT)],
            "counts": self.counts() | {"update_changed": self.update_changed},
        }


MARK = {Action.KEPT: "K", Action.APPLIED: "A", Action.MERGED: "M", Action.CONFLICT: "C"}


def text_lines(items: list[Item], *, everything: bool = False) -> list[str]:
    """One line per merged or conflicting path, and per kept or applied path whose outcome
    a rule decided (``everything``: every path)."""
    lines = []
    for i in sorted(items, key=lambda i: i.path):
        if everything or i.action in (Action.MERGED, Action.CONFLICT) or i.rule is not None:
            where = f" -> /{i.saved}" if i.saved else ""
            lines.append(f"{MARK[i.action]} /{i.path}: {i.reason}{where}")
    return lines
