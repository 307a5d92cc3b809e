"""Lamina's errors, one tree, each with the exit code the CLI uses for it.

    LaminaError (1)
    ├── UsageError (2)            bad arguments: malformed NAME@VERSION, unknown format
    ├── NotFound (3)              no such image, version, machine, layer, chunk or file
    ├── AlreadyExists (4)         a name that is taken
    ├── InvalidInput (5)          input that is not what it claims: a text file given as a
    │   │                         disk image, a truncated qcow2, a hostile tar member
    │   └── UnsafeArchive (5)     tar/OCI members escaping the tree, devices, setuid
    ├── StoreError (6)            the chunk store cannot do what was asked
    │   ├── CorruptObject (7)     an object whose envelope or hash does not check out
    │   └── StoreBusy (6)         the store lock could not be taken in time
    ├── ToolError (8)             an external tool (qemu-img, mkfs.erofs, ...) failed
    ├── Conflict (9)              in use elsewhere, pinned, conflicting layers (--strict)
    ├── ProtocolError (10)        a peer broke a wire protocol (NBD, HTTP API)
    ├── Forbidden (11)            not the caller's to use: a chunk a machine may not read
    └── LimitExceeded (12)        over a limit set on what a caller may cost: a quota

Adapters catch their library's exceptions (OSError, subprocess, sqlite, zstd) at the edge
and raise one of these, so callers deal with one tree and the CLI prints one line.
"""

from __future__ import annotations


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


class ProtocolError(LaminaError):
    exit_code = 10


class Forbidden(LaminaError):
    exit_code = 11


class LimitExceeded(LaminaError):
    exit_code = 12
