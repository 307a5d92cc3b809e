"""The CLI's conventions, one test each: global options on either side of the subcommand,
--version, tables that a pipe gets whole, readable ``show``, several names per change,
idempotent set, one timestamp format."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.conftest import LAMINA, Cli


def bare(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LAMINA_HOME"}
    return subprocess.run(
        [LAMINA, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_version() -> None:
    result = bare("--version")
    assert result.returncode == 0 and re.fullmatch(r"lamina \d+\.\d+\.\S+\n", result.stdout)


def test_home_and_json_before_or_after_the_subcommand(tmp_path: Path) -> None:
    before, after, equals = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    first = bare("--home", str(before), "--json", "machine", "list")
    second = bare("machine", "list", "--home", str(after), "--json")
    third = bare("--json", f"--home={equals}", "machine", "list")
    for result in (first, second, third):
        assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
    for home in (before, after, equals):
        assert (home / "lamina.db").exists()


def test_a_global_option_a_command_does_not_take_is_one_line(tmp_path: Path) -> None:
    result = bare("--json", "--home", str(tmp_path), "config", "show", "--json")
    assert result.returncode == 0  # taken twice is taken
    result = bare("--home", str(tmp_path), "--manager", "http://x", "demo")
    assert result.returncode == 2 and result.stderr == "lamina: 'lamina demo' takes no --manager\n"
    assert bare("image", "list", "--home").returncode == 2


def test_the_global_options_are_told_in_help(cli: Cli) -> None:
    assert "--home, --json" in " ".join(cli("--help").out.split())
