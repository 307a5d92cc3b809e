"""The rule table of a rebase (pure): glob -> rule, first match wins (``rebase policy``).

A rule says what happens at a path that *both* the user and the new base changed (and
where one side deleted what the other changed):

- ``user``: the user's version stays; the new base's change stays hidden beneath it.
- ``admin``: the new base's version wins; the user's is saved in the writable layer under
  ``/var/lib/lamina/conflicts/`` (a deletion has nothing to save) and reported.
- ``merge``: text files are merged line by line (3-way); when the changes overlap, or the
  files are not text, or their kinds differ, the user's file stays and the new base's is
  placed beside it as ``FILE.lamina-new`` (like rpm's ``.rpmnew``) and reported.

Paths changed by one side only never reach the table: the user's change is kept, or the
new base's change shows through.

Globs are absolute paths: ``*`` matches within one path component, ``**`` across
components, ``?`` one character, ``[...]`` a set; ``/dir/**`` matches ``/dir`` itself too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Final

from lamina.errors import InvalidInput, UsageError


class Rule(StrEnum):
    USER = "user"
    ADMIN = "admin"
    MERGE = "merge"


DEFAULT_RULES: Final[tuple[tuple[str, Rule], ...]] = (
    ("/home/**", Rule.USER),
    ("/root/**", Rule.USER),
    ("/etc/**", Rule.MERGE),
    ("/usr/**", Rule.ADMIN),
    ("/bin/**", Rule.ADMIN),
    ("/sbin/**", Rule.ADMIN),
    ("/lib*/**", Rule.ADMIN),
    ("/opt/**", Rule.ADMIN),
    # Everything else (/var, /srv, ...): text merged, otherwise both versions kept.
    ("/**", Rule.MERGE),
)
# What a path no glob matches gets (a table without a catch-all).
FALLBACK: Final = Rule.MERGE


def check_glob(glob: str) -> str:
    if not glob.startswith("/") or "\0" in glob or len(glob) > 1000:
        raise UsageError(f"bad glob {glob!r}: an absolute path pattern such as /etc/**")
    _compile(glob)
    return glob


def check_rule(rule: Rule | str) -> Rule:
    try:
        return Rule(rule)
    except ValueError:
        raise UsageError(f"bad rule {rule!r}: one of {', '.join(r.value for r in Rule)}") from None


@lru_cache(maxsize=256)
def _compile(glob: str) -> re.Pattern[str]:
    body = glob.rstrip("/")
    tail = ""
    if body.endswith("/**"):  # the directory itself and everything beneath it
        body, tail = body[:-3], "(?:/.*)?"
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if body.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = body.find("]", i + 2 if body[i + 1 : i + 2] in ("!", "]") else i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                inner = body[i + 1 : end]
                if inner.startswith("!"):
                    inner = "^" + inner[1:]
                out.append("[" + inner.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    try:
        return re.compile("".join(out) + tail, re.DOTALL)
    except re.error as exc:
        raise UsageError(f"bad glob {glob!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class RuleTable:
    rules: tuple[tuple[str, Rule], ...] = DEFAULT_RULES
    _cache: dict[str, Rule] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, rules: Iterable[tuple[str, Rule | str]]) -> RuleTable:
        out = [(check_glob(glob), check_rule(rule)) for glob, rule in rules]
        if len({g for g, _ in out}) != len(out):
            raise UsageError("a glob can appear only once in the rebase policy")
        return cls(tuple(out))

    def rule(self, path: str) -> tuple[Rule, str]:
        """The rule for a tree path (relative, no leading slash) and the glob that chose it."""
        full = "/" + path
        for glob, rule in self.rules:
            if _compile(glob).fullmatch(full):
                return rule, glob
        return FALLBACK, ""

    def rule_of(self, path: str) -> Rule:
        found = self._cache.get(path)
        if found is None:
            found = self._cache[path] = self.rule(path)[0]
        return found

    # -- editing (returns new tables) -----------------------------------------------------

    def set(self, glob: str, rule: Rule | str, *, at: int | None = None) -> RuleTable:
        """``glob`` -> ``rule``: replaced in place when the glob is there, otherwise inserted
        at position ``at`` (0-based; the top, where it is matched first, by default)."""
        rules: list[tuple[str, Rule | str]] = list(self.rules)
        for i, (g, _) in enumerate(rules):
            if g == glob:
                rules[i] = (glob, rule)
                return RuleTable.of(rules)
        pos = 0 if at is None else max(0, min(at, len(rules)))
        rules.insert(pos, (glob, rule))
        return RuleTable.of(rules)

    def remove(self, glob: str) -> RuleTable:
        if glob not in {g for g, _ in self.rules}:
            raise UsageError(f"{glob} is not in the rebase policy")
        return RuleTable(tuple((g, r) for g, r in self.rules if g != glob))

    # -- storage --------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps([[g, r.value] for g, r in self.rules])

    @classmethod
    def from_json(cls, text: str) -> RuleTable:
        try:
            raw = json.loads(text)
            pairs: Sequence[tuple[str, str]] = [(str(g), str(r)) for g, r in raw]
        except (ValueError, TypeError) as exc:
            raise InvalidInput(
                f"stored rebase policy is not a list of [glob, rule]: {exc}"
            ) from None
        return cls.of(pairs)
