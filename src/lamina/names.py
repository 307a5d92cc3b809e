"""Names and references, checked in one place: NAME and NAME@VERSION (images, layers,
machines), user and group names, and a machine's export names.

The patterns are the one definition: the API's and the console's validation use them too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lamina.errors import UsageError

# Images, layers, machines: 1-100 letters, digits, '.', '_', '-', starting with a letter or
# digit (a name is a folder name: never '.', '..' or hidden).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
# NAME or NAME@VERSION, VERSION a positive integer of at most 9 digits.
REF_PATTERN = NAME_PATTERN.removesuffix("$") + "(@[1-9][0-9]{0,8})?$"
# Users and groups: what a POSIX login name may be (portable characters, 64 at most).
USER_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(r"[1-9][0-9]{0,8}")
MAX_VERSION = 999_999_999
_USER = re.compile(USER_PATTERN)
# A machine's NBD exports: its disk (image version + delta) and its identity seed.
MACHINE_PREFIX = "machine/"
SEED_SUFFIX = "/seed"


def check_name(name: str, what: str = "name") -> str:
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"bad {what} {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_user_name(name: str, what: str = "user name") -> str:
    if not _USER.fullmatch(name):
        raise UsageError(
            f"bad {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "not starting with '.' or '-'"
        )
    return name


def html_pattern(pattern: str) -> str:
    """``pattern`` for an HTML ``pattern`` attribute: anchored already, and compiled with
    the ``v`` flag, where a '-' in a class must be escaped."""
    return pattern.removeprefix("^").removesuffix("$").replace("._-]", r"._\-]")


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
    if not _VERSION.fullmatch(version):
        raise UsageError(
            f"bad version in {text[:120]!r}: expected {name}@N with N from 1 to {MAX_VERSION}"
        )
    return Ref(name, int(version))
