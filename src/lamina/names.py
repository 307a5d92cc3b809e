"""Names and references: NAME and NAME@VERSION, checked in one place; export names."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lamina.errors import UsageError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# A machine's NBD exports: its disk (image version + delta) and its identity seed.
MACHINE_PREFIX = "machine/"
SEED_SUFFIX = "/seed"


def check_name(name: str, what: str = "name") -> str:
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"bad {what} {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class Ref:
    name: str
    version: int | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def parse_ref(text: str, what: str = "name") -> Ref:
    """Parse ``NAME`` or ``NAME@VERSION`` (VERSION a positive integer)."""
    name, sep, version = text.partition("@")
    check_name(name, what)
    if not sep:
        return Ref(name)
    if not version.isdigit() or int(version) < 1:
        raise UsageError(f"bad version in {text!r}: expected {name}@N with N >= 1")
    return Ref(name, int(version))
