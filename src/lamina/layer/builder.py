"""Build a layer's tree from archive members, the way tar and OCI apply them (pure).

Sources (a directory, a tar, the layers of an OCI image) describe their members with
``Member``; the builder checks each one (paths, links, devices, setuid), applies it to the
tree it holds, and remembers where each surviving regular file's data is (``DataRef``), so
the data is read in a second pass only for what survives, after every member was checked.

Rules (tar and the OCI image spec):
- a later member of a path replaces an earlier one; a directory replacing a directory only
  updates its metadata, anything else replacing a directory removes what was beneath it;
- missing parent directories are created (0755, root, mtime 0);
- a member beneath a symlink is refused (extracting it would write through the link), a
  member beneath a file is invalid;
- OCI whiteouts (``.wh.NAME``, ``.wh..wh..opq``) delete from the *lower* layers only: the
  layer's whiteouts are applied first, then its other members (``end_layer``);
- hard links name an earlier member; removing the first name of a hard-linked file hands
  its data to the next name;
- owners, times, sizes and device numbers must fit the tree's fields (a tar's base-256
  numbers may claim anything: an mtime before 1677 does not fit 64 bits of nanoseconds);
- no relative symlink may resolve above the root through other links of the final tree
  (``paths.check_link_chains``: ``d/b -> ..`` then ``d/x -> b/..``).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, replace

from lamina.errors import InvalidInput, UnsafeArchive
from lamina.layer import paths
from lamina.layer.tree import Entry, Kind, Tree, Xattrs, is_under

DataRef = tuple[int, int]  # (source part, member index), meaningful to the source only
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_PARENT_MODE = 0o755
_U32 = 1 << 32
_I64 = 1 << 63


CAPABILITY_XATTR = "security.capability"


@dataclass(frozen=True, slots=True)
class Member:
    """One archive member as a source reports it (names not yet checked)."""

    name: str
    kind: Kind
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    target: str = ""  # symlink target, or the member name a hard link points to
    rdev: int = 0
    xattrs: Xattrs = ()
    ref: DataRef | None = None  # where a FILE's data is
    opaque: bool = False


@dataclass(frozen=True, slots=True)
class Permits:
    """What an import lets through beyond plain files (``--allow-devices``/``--allow-setuid``)."""

    allow_devices: bool = False
    allow_setuid: bool = False


@dataclass(frozen=True, slots=True)
class Built:
    tree: Tree  # file entries have no chunks yet
    refs: dict[str, DataRef]  # path of each FILE entry -> where its data is


# What a policy refuses, by flag: (what, the flag that allows it). Members a policy
# refuses are all collected, so one message names every one (not one per attempt).
_REFUSALS = {
    "device": ("device nodes", "--allow-devices"),
    "setuid": ("setuid/setgid files", "--allow-setuid"),
    "capability": ("files with capabilities", "--allow-setuid"),
}
_NAMED = 3  # paths named per kind of refusal


class TreeBuilder:
    def __init__(self, permits: Permits = Permits()) -> None:
        self.permits = permits
        self.refused: dict[str, list[str]] = {}
        self._entries: dict[str, Entry] = {}
        self._refs: dict[str, DataRef] = {}
        self._links: dict[str, list[str]] = {}  # first name -> other names
        self._pending: list[Member] = []
        self._in_layer = False

    # -- layers (OCI) -----------------------------------------------------------------------

    def begin_layer(self) -> None:
        self._in_layer = True
        self._pending = []

    def end_layer(self) -> None:
        """Apply the layer: its whiteouts first (they only hide lower layers), then the rest."""
        pending, self._pending, self._in_layer = self._pending, [], False
        rest = []
        for m in pending:
            path = paths.normalize(m.name)
            name = path.rpartition("/")[2]
            if name == OPAQUE_MARKER:
                self._clear_children(path.rpartition("/")[0])
            elif name.startswith(WHITEOUT_PREFIX):
                parent = path.rpartition("/")[0]
                gone = name[len(WHITEOUT_PREFIX) :]
                if not gone or gone in (".", ".."):
                    raise UnsafeArchive(f"member {m.name!r}: bad whiteout name")
                self._remove(f"{parent}/{gone}" if parent else gone)
            else:
                rest.append(m)
        for m in rest:
            self._apply(m)

    # -- members ----------------------------------------------------------------------------

    def add(self, member: Member) -> None:
        path = paths.normalize(member.name)  # checked at once: refuse before buffering
        self._check(member, path)
        refused = self._refused_by_policy(member)
        if refused is not None:
            self.refused.setdefault(refused, []).append(path or "/")
            return
        if self._in_layer:
            self._pending.append(member)
        else:
            self._apply(member)

    def _refused_by_policy(self, m: Member) -> str | None:
        if m.kind in (Kind.CHAR, Kind.BLOCK) and not self.permits.allow_devices:
            return "device"
        setuid = m.kind is Kind.FILE and m.mode & (stat.S_ISUID | stat.S_ISGID)
        if setuid and not self.permits.allow_setuid:
            return "setuid"
        # File capabilities raise privileges like setuid does (layers are mounted without
        # nosuid), so they need the same flag.
        if any(name == CAPABILITY_XATTR for name, _ in m.xattrs) and not self.permits.allow_setuid:
            return "capability"
        return None

    def refusal(self) -> str | None:
        """One message naming everything the policy refused, and the flags that allow it."""
        if not self.refused:
            return None
        parts, flags = [], []
        for kind, (what, flag) in _REFUSALS.items():
            found = self.refused.get(kind, [])
            if not found:
                continue
            named = ", ".join(repr(p) for p in found[:_NAMED])
            more = f" and {len(found) - _NAMED} more" if len(found) > _NAMED else ""
            parts.append(f"{len(found)} {what} ({named}{more})")
            if flag not in flags:
                flags.append(flag)
        return f"refused {'; '.join(parts)}: allow with {' '.join(flags)}"

    def _check(self, m: Member, path: str) -> None:
        _check_ranges(m)
        if m.kind is Kind.SYMLINK:
            paths.check_symlink(path, m.target)
        if m.kind is Kind.HARDLINK:
            paths.check_hardlink(path, m.target)
        if m.kind in (Kind.HARDLINK, Kind.SYMLINK, Kind.WHITEOUT) and not path:
            raise UnsafeArchive(f"member {m.name!r}: the root cannot be a {m.kind.name.lower()}")

    def _apply(self, m: Member) -> None:
        path = paths.normalize(m.name)
        entry = Entry(
            path,
            m.kind,
            m.mode & 0o7777,
            m.uid,
            m.gid,
            m.mtime_ns,
            m.size if m.kind is Kind.FILE else 0,
            m.target,
            m.rdev,
            m.xattrs,
            (),
            m.opaque and m.kind is Kind.DIR,
        )
        if m.kind is Kind.HARDLINK:
            entry = self._hardlink(entry)
        if path:
            self._make_parents(path, m.name)
        old = self._entries.get(path)
        if old is not None and not (old.kind is Kind.DIR and entry.kind is Kind.DIR):
            self._remove(path)
        self._entries[path] = entry
        if entry.kind is Kind.FILE and m.ref is not None:
            self._refs[path] = m.ref
        elif entry.kind is Kind.HARDLINK:
            self._links.setdefault(entry.target, []).append(path)

    def _hardlink(self, entry: Entry) -> Entry:
        target = paths.check_hardlink(entry.path, entry.target)
        first = self._entries.get(target)
        if first is None:
            raise InvalidInput(f"hard link {entry.path!r} -> {entry.target!r}: no such member")
        if first.kind is Kind.HARDLINK:
            target, first = first.target, self._entries[first.target]
        if target == entry.path:
            raise InvalidInput(f"hard link {entry.path!r} points at itself")
        if first.kind is not Kind.FILE:
            # A hard link to a symlink, device or fifo: store an identical entry instead.
            return replace(first, path=entry.path)
        return replace(entry, target=target)

    def _make_parents(self, path: str, name: str) -> None:
        parent = ""
        for part in path.split("/")[:-1]:
            parent = f"{parent}/{part}" if parent else part
            existing = self._entries.get(parent)
            if existing is None:
                self._entries[parent] = Entry(parent, Kind.DIR, _PARENT_MODE)
            elif existing.kind is Kind.SYMLINK:
                raise UnsafeArchive(f"member {name!r} lies beneath symlink {parent!r}")
            elif existing.kind is not Kind.DIR:
                raise InvalidInput(f"member {name!r}: {parent!r} is not a directory")

    # -- removal ----------------------------------------------------------------------------

    def _remove(self, path: str) -> None:
        """Delete ``path`` and what is beneath it (absent paths are fine: OCI allows it)."""
        entry = self._entries.get(path)
        if entry is None:
            return
        doomed = [path]
        if entry.kind is Kind.DIR:
            doomed += [p for p in self._entries if p != path and is_under(p, path)]
        for p in doomed:
            self._forget(p)

    def _clear_children(self, directory: str) -> None:
        entry = self._entries.get(directory)
        if directory and (entry is None or entry.kind is not Kind.DIR):
            return
        for p in [p for p in self._entries if p != directory and is_under(p, directory)]:
            self._forget(p)

    def _forget(self, path: str) -> None:
        entry = self._entries.pop(path, None)
        if entry is None:
            return
        ref = self._refs.pop(path, None)
        if entry.kind is Kind.HARDLINK:
            others = self._links.get(entry.target, [])
            if path in others:
                others.remove(path)
        elif entry.kind is Kind.FILE:
            self._promote(entry, ref)

    def _promote(self, first: Entry, ref: DataRef | None) -> None:
        """The first name of a hard-linked file is gone: the next name becomes the file."""
        others = [p for p in self._links.pop(first.path, []) if p in self._entries]
        if not others:
            return
        heir, rest = others[0], others[1:]
        self._entries[heir] = replace(first, path=heir)
        if ref is not None:
            self._refs[heir] = ref
        for p in rest:
            self._entries[p] = replace(self._entries[p], target=heir)
        if rest:
            self._links[heir] = rest

    # -- result -----------------------------------------------------------------------------

    def finish(self, *, root: bool = True) -> Built:
        """The tree; ``root=False`` for a set of changes, which has no root entry."""
        refusal = self.refusal()
        if refusal is not None:
            raise UnsafeArchive(refusal)
        if self._in_layer:
            self.end_layer()
        if not root:
            self._entries.pop("", None)
        elif "" not in self._entries:
            self._entries[""] = Entry("", Kind.DIR, _PARENT_MODE)
        paths.check_link_chains(
            {p: e.target for p, e in self._entries.items() if e.kind is Kind.SYMLINK}
        )
        tree = Tree.of(self._entries.values())
        return Built(tree, dict(self._refs))


def _check_ranges(m: Member) -> None:
    """Refuse values the tree cannot hold (it stores u32 owners, i64 nanoseconds)."""
    for what, value, low, high in (
        ("uid", m.uid, 0, _U32),
        ("gid", m.gid, 0, _U32),
        ("mtime", m.mtime_ns, -_I64, _I64),
        ("size", m.size, 0, _I64),
        ("device number", m.rdev, 0, _I64),
    ):
        if not low <= value < high:
            shown = f"{value / 1e9:.0f} s from 1970" if what == "mtime" else str(value)
            raise InvalidInput(f"member {m.name!r}: {what} {shown} is out of range")


def member_kind(mode: int) -> Kind | None:
    """The kind of an lstat mode (None for sockets, which no layer keeps)."""
    fmt = stat.S_IFMT(mode)
    return {
        stat.S_IFREG: Kind.FILE,
        stat.S_IFDIR: Kind.DIR,
        stat.S_IFLNK: Kind.SYMLINK,
        stat.S_IFCHR: Kind.CHAR,
        stat.S_IFBLK: Kind.BLOCK,
        stat.S_IFIFO: Kind.FIFO,
    }.get(fmt)
