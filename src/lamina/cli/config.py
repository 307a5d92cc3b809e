"""lamina config show: the configuration in force (file < LAMINA_* < flags), as TOML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from lamina.cli.common import HomeOpt, JsonOpt, emit_json, say

app = typer.Typer(help="The configuration (lamina.toml, LAMINA_* variables).", no_args_is_help=True)


@app.command("show")
def show(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Print the settings in force and the file they were read from; the TOML printed
    is itself a valid lamina.toml.

    Example: lamina config show --json
    """
    from lamina.settings import config_path, load

    values = load(home=home).model_dump(mode="json")
    if values.get("token"):
        values["token"] = "(set)"  # a secret: shown as set, never printed
    if as_json:
        emit_json({"config": str(config_path()), "settings": values})
        return
    say(f"# {config_path()}")
    for line in toml_lines(values):
        say(line)


def toml_lines(values: dict[str, Any]) -> list[str]:
    """Flat keys first, then one [table] per nested dict; unset values are left out."""
    lines = [f"{k} = {_value(v)}" for k, v in values.items() if not isinstance(v, dict | None)]
    for name, table in values.items():
        if isinstance(table, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {_value(v)}" for k, v in table.items() if v is not None]
    return lines


def _value(v: Any) -> str:
    if isinstance(v, Path):
        v = str(v)
    return json.dumps(v) if not isinstance(v, bool) else str(v).lower()
