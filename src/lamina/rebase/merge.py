"""Re-apply a writable layer's changes on a new base: the path-by-path 3-way merge (pure).

Inputs: the user's tree (a writable-layer version: changes against the old bases), the old
and new views of the bases (``views.BaseChange``), the rule table, and a reader for file
contents (only text files both sides changed are read). Output: a tree of changes against
the new bases, and one report item per path the user changed.

For each path, with O the old base's entry, N the new base's and U the user's:

- U equal to O (a copy-up, a touch): the user changed nothing; N is taken (U is dropped,
  or, for a directory that holds user changes, given N's metadata).
- U equal to N: both made the same change; N is taken.
- O equal to N: only the user changed it; U is kept.
- otherwise both changed it, and the path's rule decides (``policy``). Before the rule, two
  cases merge cleanly on their own: one side changed the content and the other only the
  mode, owner or xattrs (the result has both), and both changed different metadata fields.
- A whiteout (the user deleted the path) is kept while the new base has something there
  that the update did not change; dropped when the new base has nothing to hide; and when
  the update changed or added anything at or beneath it, the rule decides (``user``: stays
  deleted, ``admin``: the new version comes back, ``merge``: stays deleted and the new
  version is placed beside it as ``.lamina-new``).
- Kind changes (file, directory, symlink, device) are both-changed cases like any other;
  a directory the user keeps over the update's file hides it, a user directory the update
  wins over is saved whole under the conflicts directory.
- Opaque directories (the user removed a directory and made it again) are first spelled
  out as whiteouts for every base entry beneath them, so each hidden path is decided on its
  own; the flag comes back when nothing beneath was decided in the new base's favour.

Nothing the user made is dropped unless the new base has the same thing at that path: what
a rule sets aside is saved under ``/var/lib/lamina/conflicts/`` (never over an existing
name), and hard links whose first name goes become copies of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Final

from lamina.errors import InvalidInput
from lamina.layer.changes import WritablePolicy, keeps
from lamina.layer.tree import Entry, Kind, Tree, is_under
from lamina.rebase.diff3 import TEXT_LIMIT, is_text, merge3
from lamina.rebase.meta import content, merge_meta
from lamina.rebase.report import Action, Item, Outcome
from lamina.rebase.rules import Rule, RuleTable
from lamina.rebase.views import BaseChange, resolve, same

CONFLICTS_DIR: Final = "var/lib/lamina/conflicts"
NEW_SUFFIX: Final = ".lamina-new"
Reader = Callable[[Entry], bytes]


def _ancestors(path: str) -> Iterator[str]:
    while "/" in path:
        path = path.rpartition("/")[0]
        yield path


@dataclass(frozen=True, slots=True)
class _Ctx:
    base: BaseChange
    table: RuleTable
    read: Reader
    now_ns: int
    can_save: bool  # the layer's policy keeps the conflicts directory


class _Merger:
    def __init__(
        self,
        user: Tree,
        base: BaseChange,
        table: RuleTable,
        read: Reader,
        policy: WritablePolicy | None,
        now_ns: int,
    ) -> None:
        self.c = _Ctx(base, table, read, now_ns, policy is None or keeps(policy, CONFLICTS_DIR))
        self.old, self.new = base.old, base.new
        self.orig: dict[str, Entry] = {e.path: e for e in user if e.path}
        self.u: dict[str, Entry] = dict(self.orig)
        self.generated: dict[str, str] = {}  # whiteout spelled out -> its opaque root
        self.opaque_roots: list[str] = []
        self.out: dict[str, Entry] = {}
        self.containers: set[str] = set()  # directories kept only to hold other entries
        self.items: list[Item] = []
        self.blobs: dict[str, bytes] = {}
        self.done: set[str] = set()  # paths whose whole subtree is settled
        self.taken: set[str] = set()  # names given to saved copies

    # -- reporting ------------------------------------------------------------------------

    def note(
        self,
        path: str,
        action: Action,
        reason: str,
        rule: Rule | None = None,
        saved: str | None = None,
    ) -> None:
        if rule is Rule.USER and self.c.table.rule_of(path) is Rule.ADMIN:
            reason += f" (rule admin, but this layer's policy drops /{CONFLICTS_DIR})"
        self.items.append(Item(path, action, reason, rule.value if rule else None, saved))

    # -- opaque directories -> whiteouts --------------------------------------------------

    def _spell_out_opaque(self) -> None:
        roots = sorted(p for p, e in self.u.items() if e.kind is Kind.DIR and e.opaque)
        for root in roots:
            if any(a in self.opaque_roots for a in _ancestors(root)):
                continue  # inside another opaque directory: spelled out with it
            self.opaque_roots.append(root)
        for root in self.opaque_roots:
            dirs = [p for p, e in self.u.items() if e.kind is Kind.DIR and is_under(p, root)]
            for d in dirs:
                self.u[d] = replace(self.u[d], opaque=False)
                for child in {*self.old.children(d), *self.new.children(d)}:
                    if child not in self.u:
                        self.u[child] = Entry(child, Kind.WHITEOUT, 0)
                        self.generated[child] = root

    def _restore_opaque(self) -> None:
        """Put the flag back where the spelled-out whiteouts all stayed and nothing beneath
        was given up for the new base: the directory keeps hiding what later updates add."""
        for root in self.opaque_roots:
            top = self.out.get(root)
            if top is None or top.kind is not Kind.DIR:
                continue
            intact = all(
                self.out.get(p) is e
                for p, e in self.u.items()
                if is_under(p, root) and p not in self.generated
            ) and all(
                p in self.out or p not in self.new for p, r in self.generated.items() if r == root
            )
            if not intact:
                continue
            for p, r in self.generated.items():
                if r == root:
                    self.out.pop(p, None)
            self.out[root] = replace(top, opaque=True)
            # Beneath an opaque directory the user's directories are the only ones there.
            self.containers -= {p for p in self.containers if is_under(p, root)}

    # -- saving aside ---------------------------------------------------------------------

    def _free(self, want: str) -> str:
        name, n = want, 0
        while name in self.u or name in self.out or name in self.taken or name in self.new:
            n += 1
            name = f"{want}.{n}"
        self.taken.add(name)
        return name

    def save_user(self, path: str) -> str:
        """The user's entry at ``path`` (and the user's entries beneath it) under the
        conflicts directory; returns where."""
        dest = self._free(f"{CONFLICTS_DIR}/{path}")
        for p, e in self.u.items():
            if is_under(p, path) and e.kind is not Kind.WHITEOUT:
                moved = dest + p[len(path) :]
                self.out[moved] = replace(resolve(e, self.orig), path=moved, opaque=False)
        return dest

    def place_new(self, path: str) -> str:
        """The new base's entry at ``path`` (a directory with what is beneath it) beside it
        as ``path.lamina-new``; returns where."""
        dest = self._free(path + NEW_SUFFIX)
        for p in [path, *self.new.subtree(path)]:
            e = self.new.get(p)
            if e is not None:
                moved = dest + p[len(path) :]
                self.out[moved] = replace(e, path=moved)
        return dest

    def rule(self, path: str) -> Rule:
        rule = self.c.table.rule_of(path)
        return Rule.USER if rule is Rule.ADMIN and not self.c.can_save else rule

    # -- the walk -------------------------------------------------------------------------

    def run(self) -> Outcome:
        self._spell_out_opaque()
        for p in sorted(self.u):
            if any(a in self.done for a in _ancestors(p)) or p in self.done:
                continue
            e = self.u[p]
            if e.kind is Kind.WHITEOUT:
                self.whiteout(p, e)
            elif e.kind is Kind.DIR:
                self.directory(p, e)
            else:
                self.node(p, e)
        self._fix_links()
        self._restore_opaque()
        self._parents()
        self._drop_empty_containers()
        return Outcome(Tree.of(self.out.values()), self.blobs, self.items, len(self.c.base.changed))

    def whiteout(self, p: str, e: Entry) -> None:
        o, n = self.old.get(p), self.new.get(p)
        hidden = self.generated.get(p) is not None
        what = "hidden by the user's new directory" if hidden else "deleted by the user"
        if n is None:
            if o is not None and not hidden:
                self.note(p, Action.KEPT, "deleted by the user and by the update")
            return  # nothing left to hide
        if not self.c.base.changed_at_or_under(p):
            self.out[p] = e
            if not hidden:
                self.note(p, Action.KEPT, "deleted by the user")
            return
        rule = self.rule(p)
        changed = "added by the update" if o is None else "changed by the update"
        if rule is Rule.USER:
            self.out[p] = e
            self.note(p, Action.KEPT, f"{what}, {changed}: stays deleted", rule)
        elif rule is Rule.ADMIN:
            self.note(p, Action.CONFLICT, f"{what}, {changed}: the update's version is back", rule)
        else:
            self.out[p] = e
            dest = self.place_new(p)
            self.note(
                p,
                Action.CONFLICT,
                f"{what}, {changed}: stays deleted, update's beside it",
                rule,
                dest,
            )

    def _user_changed_under(self, path: str) -> bool:
        for q, e in self.u.items():
            if not is_under(q, path):
                continue
            o = self.old.get(q)
            if e.kind is Kind.WHITEOUT:
                if o is not None:
                    return True
            elif not same(resolve(e, self.orig), o):
                return True
        return False

    def directory(self, p: str, e: Entry) -> None:
        o, n = self.old.get(p), self.new.get(p)
        if n is not None and n.kind is not Kind.DIR:
            if same(o, n):
                self.out[p] = e
                self.note(p, Action.KEPT, "a directory made by the user")
            elif not self._user_changed_under(p):
                self.done.add(p)
                self.note(
                    p, Action.APPLIED, "the update replaced a directory the user had not changed"
                )
            else:
                self.dir_over_node(p, e, o is None)
            return
        user_changed = o is None or o.kind is not Kind.DIR or not same(e, o)
        if n is None:
            if not user_changed:
                self.out[p] = e  # holds the user's changes beneath, if any
                self.containers.add(p)
            elif o is None or o.kind is not Kind.DIR:
                self.out[p] = e
                self.note(p, Action.KEPT, "a directory made by the user")
            else:
                self.changed_but_deleted(p, e, "its mode, owner or xattrs")
            return
        if not user_changed:  # a container: its metadata follows the new base
            self.containers.add(p)
            values, _, theirs = merge_meta(e, o, n, user_wins=True)
            self.out[p] = values.apply(e) if theirs else e
            return
        if o is not None and o.kind is Kind.DIR and same(o, n):
            self.out[p] = e
            self.note(p, Action.KEPT, "mode, owner or xattrs changed by the user")
            return
        if same(e, n):
            self.out[p] = e
            self.containers.add(p)
            self.note(p, Action.APPLIED, "the same change as the update")
            return
        rule = self.rule(p)
        base = o if o is not None and o.kind is Kind.DIR else None
        values, clashed, theirs = merge_meta(e, base, n, user_wins=rule is not Rule.ADMIN)
        if clashed and rule is Rule.ADMIN:
            self.out[p] = replace(n, mtime_ns=e.mtime_ns)
            dest = self.save_user_entry(p, e)
            self.note(
                p,
                Action.CONFLICT,
                f"both changed its {', '.join(clashed)}: update's wins",
                rule,
                dest,
            )
            return
        self.out[p] = values.apply(e)
        if clashed:
            self.note(p, Action.MERGED, f"both changed its {', '.join(clashed)}: user's kept", rule)
        else:
            self.note(
                p,
                Action.MERGED,
                f"user's and update's metadata combined ({', '.join(theirs)} from the update)",
            )

    def save_user_entry(self, p: str, e: Entry) -> str:
        """Just the entry at ``p`` (not what is beneath it) under the conflicts directory."""
        dest = self._free(f"{CONFLICTS_DIR}/{p}")
        self.out[dest] = replace(resolve(e, self.orig), path=dest, opaque=False)
        return dest

    def dir_over_node(self, p: str, e: Entry, created: bool) -> None:
        """The user has a directory where the update put (or changed) a non-directory."""
        what = "the user's directory, the update's " + ("new file" if created else "changed file")
        self.kind_clash(p, e, self.rule(p), what, "directory", "file")

    def kind_clash(self, p: str, e: Entry, rule: Rule, what: str, mine: str, theirs: str) -> None:
        """The user has a ``mine`` (directory or file) where the update has a ``theirs``."""
        if rule is Rule.USER:
            self.out[p] = e
            self.note(p, Action.KEPT, f"{what}: the {mine} stays", rule)
        elif rule is Rule.MERGE:
            self.out[p] = e
            dest = self.place_new(p)
            self.note(
                p, Action.CONFLICT, f"{what}: the {mine} stays, the {theirs} beside it", rule, dest
            )
        else:
            dest = self.save_user(p)
            if e.kind is Kind.DIR:  # saved with everything beneath it
                self.done.add(p)
            self.note(
                p, Action.CONFLICT, f"{what}: the {theirs} wins, the {mine} is saved", rule, dest
            )

    def changed_but_deleted(self, p: str, e: Entry, what: str) -> None:
        """The user changed ``p`` (``what``), the update deleted it."""
        rule = self.rule(p)
        if rule is Rule.ADMIN:
            self.out.pop(p, None)
            dest = self.save_user_entry(p, e)  # just p: nothing is beneath a non-directory
            if e.kind is Kind.DIR:  # the user's entries beneath decide on their own
                self.out[p] = e
                self.containers.add(p)
            self.note(
                p, Action.CONFLICT, f"the user changed {what}, the update deleted it", rule, dest
            )
            return
        self.out[p] = e
        action = Action.KEPT if rule is Rule.USER else Action.CONFLICT
        self.note(p, action, f"the user changed {what}, the update deleted it: user's stays", rule)

    def node(self, p: str, e: Entry) -> None:
        """A non-directory of the user's: file, symlink, hard link, device, fifo."""
        r = resolve(e, self.orig)
        o, n = self.old.get(p), self.new.get(p)
        if o is not None and same(r, o):
            if same(o, n):
                self.out[p] = e
                self.note(p, Action.KEPT, "unchanged but for its mtime")
            else:
                gone = "deleted" if n is None else "changed"
                self.note(p, Action.APPLIED, f"{gone} by the update; the user had not changed it")
            return
        if n is not None and same(r, n):
            self.note(p, Action.APPLIED, "the same change as the update")
            return
        # Over a directory, the update changed the path if it changed anything beneath it.
        beneath = o is not None and o.kind is Kind.DIR and self.c.base.changed_at_or_under(p)
        if same(o, n) and not beneath:
            self.out[p] = e
            self.note(p, Action.KEPT, "changed by the user" if o else "made by the user")
            return
        if n is None:
            self.changed_but_deleted(p, e, "it")
            return
        rule = self.rule(p)
        if n.kind is Kind.DIR:
            self.kind_clash(
                p, e, rule, "the user's file, the update's directory", "file", "directory"
            )
            return
        if o is not None and r.kind == o.kind == n.kind:
            cu, cn = content(r) != content(o), content(n) != content(o)
            if not (cu and cn) and self.meta_merge(p, e, r, o, n, rule, content_from_user=cu):
                return
        self.both_changed(p, e, r, o, n, rule)

    def meta_merge(
        self, p: str, e: Entry, r: Entry, o: Entry, n: Entry, rule: Rule, *, content_from_user: bool
    ) -> bool:
        """One side changed the content, or neither did: combine the metadata. False when
        the rule says the update wins a metadata clash (handled as both changed)."""
        values, clashed, theirs = merge_meta(r, o, n, user_wins=rule is not Rule.ADMIN)
        if clashed and rule is Rule.ADMIN:
            return False
        source = r if content_from_user else n
        self.out[p] = values.apply(replace(source, path=p, mtime_ns=max(r.mtime_ns, n.mtime_ns)))
        parts = ["content from the " + ("user" if content_from_user else "update")]
        if theirs:
            parts.append(", ".join(theirs) + " from the update")
        if clashed:
            parts.append(f"both changed its {', '.join(clashed)}: user's kept")
        self.note(p, Action.MERGED, "; ".join(parts), rule if clashed else None)
        return True

    def both_changed(
        self, p: str, e: Entry, r: Entry, o: Entry | None, n: Entry, rule: Rule
    ) -> None:
        if rule is Rule.USER:
            self.out[p] = e
            self.note(p, Action.KEPT, "both changed: user's stays", rule)
            return
        if rule is Rule.ADMIN:
            dest = self.save_user_entry(p, e)  # a non-directory: nothing beneath it to save
            self.note(p, Action.CONFLICT, "both changed: update's wins, user's saved", rule, dest)
            return
        files = r.kind is Kind.FILE and n.kind is Kind.FILE and (o is None or o.kind is Kind.FILE)
        small = max(r.size, n.size, o.size if o is not None else 0) <= TEXT_LIMIT
        if files and not small:
            why = "both changed (too large to merge lines)"
        elif files:
            mine, theirs = self.c.read(r), self.c.read(n)
            old = self.c.read(o) if o is not None else b""
            if is_text(mine, theirs, old):
                merged = merge3(old, mine, theirs)
                if merged.clean:
                    values, _, _ = merge_meta(r, o, n, user_wins=True)
                    self.out[p] = values.apply(
                        replace(r, chunks=(), size=len(merged.data), mtime_ns=self.c.now_ns)
                    )
                    self.blobs[p] = merged.data
                    self.note(p, Action.MERGED, "both changed: lines merged", rule)
                    return
                why = f"both changed overlapping lines ({merged.overlaps})"
            else:
                why = "both changed (not text)"
        else:
            why = "both changed (different kinds)" if r.kind is not n.kind else "both changed"
        self.out[p] = e
        dest = self.place_new(p)
        self.note(p, Action.CONFLICT, f"{why}: user's stays, update's beside it", rule, dest)

    # -- clean-up passes ------------------------------------------------------------------

    def _fix_links(self) -> None:
        """A hard link whose first name is gone or no longer the user's file becomes a copy
        of that file (the first such link; the others link to it)."""
        heirs: dict[str, str] = {}
        for p in sorted(self.out):
            e = self.out[p]
            if e.kind is not Kind.HARDLINK:
                continue
            first = self.orig.get(e.target)
            if first is not None and self.out.get(e.target) is first:
                continue
            if e.target in heirs:
                self.out[p] = replace(e, target=heirs[e.target])
            else:
                self.out[p] = resolve(e, self.orig)
                heirs[e.target] = p

    def _parents(self) -> None:
        for p in sorted(self.out):
            for a in _ancestors(p):
                have = self.out.get(a)
                if have is not None:
                    if have.kind is not Kind.DIR:
                        raise InvalidInput(f"cannot place /{p}: /{a} is not a directory")
                    break
                n, u = self.new.get(a), self.u.get(a)
                if n is not None and n.kind is Kind.DIR:
                    self.out[a] = n
                elif u is not None and u.kind is Kind.DIR:
                    self.out[a] = replace(u, opaque=False)
                else:
                    self.out[a] = Entry(a, Kind.DIR, 0o755, mtime_ns=self.c.now_ns)
                self.containers.add(a)

    def _drop_empty_containers(self) -> None:
        children: dict[str, int] = {}
        for p in self.out:
            if "/" in p:
                parent = p.rpartition("/")[0]
                children[parent] = children.get(parent, 0) + 1
        for p in sorted(self.containers, key=lambda p: -p.count("/")):
            e = self.out.get(p)
            if e is None or e.kind is not Kind.DIR or e.opaque or children.get(p, 0):
                continue
            del self.out[p]
            if "/" in p:
                children[p.rpartition("/")[0]] -= 1


def rebase_tree(
    user: Tree,
    base: BaseChange,
    table: RuleTable,
    read: Reader,
    *,
    policy: WritablePolicy | None = None,
    now_ns: int = 0,
) -> Outcome:
    """``user`` (changes against ``base.old``) re-applied on ``base.new``.

    ``policy`` is the writable layer's own (what its sessions keep): when it would drop the
    conflicts directory (``profile``), the ``admin`` rule cannot save the user's version
    aside, so the user's version stays. ``now_ns`` is the mtime of merged files."""
    return _Merger(user, base, table, read, policy, now_ns).run()
