"""Lamina's errors, one tree, each kind with the exit code the CLI uses for it.

    LaminaError (1)
    ├── UsageError (2)            bad arguments: malformed NAME@VERSION, unknown format
    ├── NotFound (3)              no such image, version, machine, layer, chunk or file
    ├── AlreadyExists (4)         a name, MAC or hostname that is taken
    ├── InvalidInput (5)          input that is not what it claims: a text file given as a
    │   │                         disk image, a truncated qcow2, a hostile tar member
    │   └── UnsafeArchive (5)     tar/OCI members escaping the tree, devices, setuid
    ├── StoreError (6)            the chunk store cannot do what was asked
    │   ├── CorruptObject (7)     an object whose envelope or hash does not check out
    │   └── StoreBusy (6)         the store lock could not be taken in time
    ├── ToolError (8)             an external tool (qemu-img, mkfs.erofs, ...) failed
    ├── Conflict (9)              in use elsewhere, pinned, conflicting layers (--strict)
    │   └── Unconfirmed (13)      a change that would lose data, asked without --force
    ├── ProtocolError (10)        a peer broke a wire protocol (NBD, HTTP API)
    ├── Unreachable (11)          the manager did not answer, or answered 5xx: retry later
    ├── Refused (12)              the manager refused the token (401), or what it opens (403)
    ├── NotAHome (14)             not a lamina home, or a home whose database is missing,
    │                             empty or another home's
    └── LimitExceeded (15)        over a limit on what a caller may cost: an upload quota

Adapters catch their library's exceptions (OSError, subprocess, sqlite, zstd) at the edge
and raise one of these, so callers deal with one tree and the CLI prints one line.

Over HTTP an error travels as ``{"detail": MESSAGE, "kind": "NotFound"}`` with the status
of ``HTTP_STATUS``; every HTTP client turns an answer back into the same error with
``from_http`` (by its kind, else by its status), so a command run through ``--manager``
fails with the same line and exit code as on the home.
"""

from __future__ import annotations

import json
from typing import Any


class LaminaError(Exception):
    """Base of every error lamina raises on purpose."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(LaminaError):
    exit_code = 2


class NotFound(LaminaError):
    exit_code = 3


class AlreadyExists(LaminaError):
    exit_code = 4


class InvalidInput(LaminaError):
    exit_code = 5


class UnsafeArchive(InvalidInput):
    exit_code = 5


class StoreError(LaminaError):
    exit_code = 6


class CorruptObject(StoreError):
    exit_code = 7

    def __init__(self, message: str, *, chunk_id: bytes | None = None) -> None:
        super().__init__(message)
        self.chunk_id = chunk_id


class StoreBusy(StoreError):
    exit_code = 6


class ToolError(LaminaError):
    exit_code = 8


class Conflict(LaminaError):
    exit_code = 9


class Unconfirmed(Conflict):
    """A change that would lose data (a delta, a user's saved files) or break what depends
    on it (entitlements), refused until it is confirmed: ``--force``, ``force=true``, the
    console's confirmation step. The message says what would be lost."""

    exit_code = 13


class ProtocolError(LaminaError):
    exit_code = 10


class Unreachable(LaminaError):
    """The manager did not answer (refused, reset, timed out) or answered 429/5xx."""

    exit_code = 11


class Refused(LaminaError):
    """The manager refused the token (401) or what it asked for (403)."""

    exit_code = 12


class NotAHome(LaminaError):
    """A folder that is not a lamina home, or a home whose database does not describe its
    store (missing, empty, or another home's): nothing is created or changed."""

    exit_code = 14


class LimitExceeded(LaminaError):
    """Over a limit set on what one caller may cost the server (a machine's upload quota);
    what it already has stays, and the same request may succeed once some is released."""

    exit_code = 15


def kinds() -> dict[str, type[LaminaError]]:
    """Every kind of the tree by its name (what travels in an HTTP error's body).
    Subclasses made elsewhere (``uploads.TooLarge``) travel as the kind they refine."""
    found: dict[str, type[LaminaError]] = {"LaminaError": LaminaError}
    todo: list[type[LaminaError]] = [LaminaError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__ == __name__:
                found[sub.__name__] = sub
            todo.append(sub)
    return found


def kind_of(error: LaminaError) -> type[LaminaError]:
    """The kind of the tree ``error`` is (itself, or the nearest kind it refines)."""
    return next(
        k for k in type(error).__mro__ if issubclass(k, LaminaError) and k.__module__ == __name__
    )


# Lamina's errors as HTTP statuses, most specific first (anything else is a 500).
HTTP_STATUS: tuple[tuple[type[LaminaError], int], ...] = (
    (NotFound, 404),
    (AlreadyExists, 409),
    (Conflict, 409),
    (UsageError, 422),
    (InvalidInput, 422),
    (Refused, 403),
    (Unreachable, 503),
    (LimitExceeded, 413),
)
# An error's message is said, never at any length (it may quote what was asked).
_DETAIL = 500


def http_status(error: LaminaError) -> int:
    return next((code for kind, code in HTTP_STATUS if isinstance(error, kind)), 500)


def http_body(error: LaminaError) -> dict[str, str]:
    detail = str(error)
    if len(detail) > _DETAIL:
        detail = detail[:_DETAIL] + "..."
    return {"detail": detail, "kind": kind_of(error).__name__}


def _detail(body: Any) -> str:
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # FastAPI's validation errors: where and what, each
        parts = []
        for d in detail:
            where = ".".join(str(p) for p in d.get("loc", [])[1:]) if isinstance(d, dict) else ""
            what = d.get("msg") if isinstance(d, dict) else d
            parts.append(f"{where}: {what}" if where else str(what))
        return "; ".join(parts)
    return "" if detail is None else str(detail)


def from_http(status: int, body: bytes | str, *, what: str = "manager") -> LaminaError:
    """The error an HTTP answer ``status`` (>= 400) with ``body`` stands for.

    A body naming a kind of the tree gives that kind with its message unchanged; other
    answers (a proxy's 502, a 401 from the token check, FastAPI's 422) go by status.
    """
    try:
        parsed: Any = json.loads(body) if body else None
    except ValueError:
        parsed = None
    detail = _detail(parsed)
    kind = kinds().get(str(parsed.get("kind"))) if isinstance(parsed, dict) else None
    if kind is not None and detail:
        return kind(detail)
    if parsed is None:  # not JSON: a proxy's page, a plain-text answer
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        detail = text.strip()[:200]
    message = f"{what}: {status} {detail}".rstrip()
    if status in (401, 403):
        return Refused(message)
    if status == 404:
        return NotFound(message)
    if status == 409:
        return Conflict(message)
    if status == 413:
        return LimitExceeded(message)
    if status == 422:  # FastAPI's validation: the fields and what is wrong with each
        return UsageError(detail)
    if status == 429 or status >= 500:
        return Unreachable(message)
    return ProtocolError(message)
