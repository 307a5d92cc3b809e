"""Lamina's configuration, read in one place: built-in defaults, then the configuration file
(``/etc/lamina/lamina.toml``, or the file ``LAMINA_CONFIG`` names), then ``LAMINA_*``
variables, then command-line flags (the CLI passes the flags it was given to ``load``).

The file holds the same keys as the variables, without the prefix and in lower case::

    home = "/var/lib/lamina"              # LAMINA_HOME
    database_url = "postgresql+psycopg://lamina@db/lamina"
    store_url = "s3://bucket/prefix"     # LAMINA_STORE_URL
    [serve]                               # LAMINA_SERVE__NBD, LAMINA_SERVE__HTTP, ...
    nbd = "0.0.0.0:10809"
    http = "0.0.0.0:8480"

pydantic and pydantic-settings are imported by ``load`` only, so commands that need no
configuration (``--help``, ``--version``) start without them. Nothing is cached: a process
that changes its environment (a test) sees the change at its next ``load``.

model.py   the settings' model (pydantic-settings) and the file as its weakest source
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from lamina.errors import UsageError

if TYPE_CHECKING:
    from lamina.settings.model import Settings

CONFIG_ENV: Final = "LAMINA_CONFIG"
DEFAULT_CONFIG: Final = Path("/etc/lamina/lamina.toml")
ENV_PREFIX: Final = "LAMINA_"


def default_home() -> Path:
    return Path.home() / ".local" / "share" / "lamina"


def config_path() -> Path:
    """The configuration file: ``$LAMINA_CONFIG``, else /etc/lamina/lamina.toml."""
    named = os.environ.get(CONFIG_ENV)
    return Path(named).expanduser() if named else DEFAULT_CONFIG


def read_config(path: Path) -> dict[str, Any]:
    """The file's tables; empty when there is no file (an explicit LAMINA_CONFIG must exist)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        if os.environ.get(CONFIG_ENV):
            raise UsageError(f"{path}: no such configuration file ({CONFIG_ENV})") from None
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise UsageError(f"{path}: unreadable ({exc.strerror or exc})") from None


def load(**flags: Any) -> Settings:
    """The settings in force: defaults < file < LAMINA_* variables < ``flags`` (those given:
    a flag left at None does not count). Bad values are one-line UsageErrors."""
    from pydantic import ValidationError

    from lamina.settings.model import Settings

    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsageError(
            f"configuration: {where}: {first['msg']} (from {config_path()}, "
            f"{ENV_PREFIX}{where.upper().replace('.', '__')} or a flag)"
        ) from None
