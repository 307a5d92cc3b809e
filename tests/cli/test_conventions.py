"""The CLI's conventions, one test each: global options on either side of the subcommand,
--version, tables that a pipe gets whole, readable ``show``, several names per change,
idempotent set, one timestamp format."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

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
    assert bare("--home", str(before), "init").returncode == 0
    assert bare("init", "--home", str(after)).returncode == 0
    assert bare(f"--home={equals}", "--json", "init").returncode == 0
    first = bare("--home", str(before), "--json", "machine", "list")
    second = bare("machine", "list", "--home", str(after), "--json")
    third = bare("--json", f"--home={equals}", "machine", "list")
    for result in (first, second, third):
        assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
    for home in (before, after, equals):
        assert (home / "home.json").exists() and (home / "lamina.db").exists()


def test_a_global_option_a_command_does_not_take_is_one_line(tmp_path: Path) -> None:
    result = bare("--json", "--home", str(tmp_path), "config", "show", "--json")
    assert result.returncode == 0  # taken twice is taken
    result = bare("--home", str(tmp_path), "--manager", "http://x", "demo")
    assert result.returncode == 2 and result.stderr == "lamina: 'lamina demo' takes no --manager\n"
    assert bare("image", "list", "--home").returncode == 2


def test_the_global_options_are_told_in_help(cli: Cli) -> None:
    assert "--home, --json" in " ".join(cli("--help").out.split())


TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.fixture
def fleet(cli: Cli, tmp_path: Path) -> Cli:
    """A home with image base (8 MiB) and machines m1 (stateless), m2, m3 (stateful)."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"lamina" * 1000)
    os.truncate(disk, 8 << 20)
    cli("image", "import", "base", str(disk))
    cli("machine", "add", "m1", "--image", "base")
    for name in ("m2", "m3"):
        cli("machine", "add", name, "--image", "base", "--mode", "stateful")
    return cli


def test_piped_tables_are_whole_and_tab_separated(fleet: Cli) -> None:
    long = "desk-" + "x" * 90
    fleet("machine", "add", long, "--image", "base", "--hostname", "desk-long")
    lines = fleet("machine", "list").out.splitlines()
    assert lines[0].split("\t")[:3] == ["NAME", "IMAGE", "MODE"]
    row = next(line.split("\t") for line in lines if line.startswith("desk-"))
    assert row[0] == long and re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", row[4])


def test_machine_show_is_key_value_lines(fleet: Cli, tmp_path: Path) -> None:
    text = fleet("machine", "show", "m2").out
    assert "None" not in text and "{" not in text and "'" not in text
    lines = dict(line.split(": ", 1) for line in text.splitlines() if not line.endswith(":"))
    assert lines["mode"] == "stateful" and lines["domain"] == "-"
    assert TIMESTAMP.match(lines["created_at"])
    keys = [line for line in text.splitlines() if line.startswith("  ")]
    assert any(k.startswith("  ed25519: ssh-ed25519 ") for k in keys)  # one line per key


def test_one_timestamp_format(fleet: Cli) -> None:
    assert TIMESTAMP.match(fleet.json("machine", "show", "m1")["created_at"])
    assert TIMESTAMP.match(fleet.json("image", "log", "base")[0]["created"])
    fleet("user", "add", "alice")
    assert TIMESTAMP.match(fleet.json("user", "show", "alice")["created_at"])


def test_several_names_where_a_command_changes_things(fleet: Cli) -> None:
    reset = fleet("machine", "reset", "m1", "m2", "m3", "--force", "--json").json()
    assert [r["name"] for r in reset] == ["m1", "m2", "m3"]
    partly = fleet("machine", "rm", "m1", "nope", "m2", "--force", check=False)
    assert partly.code == 3 and partly.err == "lamina: no machine named 'nope'\n"
    assert partly.out.splitlines() == ["removed m1", "removed m2"]  # past the failure
    assert [m["name"] for m in fleet.json("machine", "list")] == ["m3"]
    for name in ("alice", "bob", "carol"):
        fleet("user", "add", name)
    fleet("group", "add", "g1")
    fleet("group", "add-member", "g1", "alice", "bob")
    assert fleet.json("user", "show", "bob")["groups"] == ["g1"]
    fleet("group", "rm-member", "g1", "alice", "bob")
    assert fleet.json("user", "show", "bob")["groups"] == []
    fleet("user", "rm", "alice", "bob")
    assert [u["name"] for u in fleet.json("user", "list")] == ["carol"]


def test_machine_list_filters(fleet: Cli, tmp_path: Path) -> None:
    other = tmp_path / "other.raw"
    other.write_bytes(b"other" * 1000)
    os.truncate(other, 1 << 20)
    fleet("image", "import", "other", str(other))
    fleet("machine", "add", "o1", "--image", "other")

    def names(*args: str) -> list[str]:
        return [m["name"] for m in fleet.json("machine", "list", *args)]

    assert names("--image", "other") == ["o1"]
    assert names("--mode", "stateful") == ["m2", "m3"]
    assert names("--image", "base", "--mode", "stateless") == ["m1"]
    assert names("--state", "new") == ["m1", "m2", "m3", "o1"]  # none booted yet
    assert names("--state", "booted") == names("--state", "in-use") == []
    bad = fleet("machine", "list", "--state", "asleep", check=False)
    assert bad.code == 2 and "one of: new, booted, in-use" in bad.err


def test_setting_what_a_machine_has_is_unchanged(fleet: Cli) -> None:
    before = fleet.json("machine", "show", "m2")
    again = fleet("machine", "set", "m2", "--image", "base@1", "--mode", "stateful")
    assert again.code == 0 and again.out == "m2: unchanged\n"
    assert fleet.json("machine", "set", "m2", "--image", "base")["changed"] is False
    assert fleet.json("machine", "show", "m2")["identity_rev"] == before["identity_rev"]
    assert fleet.json("machine", "set", "m2", "--hostname", "h2")["changed"] is True


def test_machine_add_takes_what_set_takes(fleet: Cli, tmp_path: Path) -> None:
    config = tmp_path / "site.yaml"
    config.write_text("packages: [htop]\n")
    added = fleet.json("machine", "add", "c1", "--image", "base", "--config", str(config))
    assert added["extra_config"] == {"packages": ["htop"]} and added["identity_rev"] == 1
    add_opts = set(re.findall(r"--[a-z-]+", fleet("machine", "add", "--help").out))
    set_opts = set(re.findall(r"--[a-z-]+", fleet("machine", "set", "--help").out))
    # what set does besides: take new random parts, or confirm losing a delta
    assert set_opts - add_opts == {"--new-machine-id", "--new-host-keys", "--force"}


def test_entitle_list_and_user_show(fleet: Cli, tmp_path: Path) -> None:
    tree = tmp_path / "app"
    (tree / "opt").mkdir(parents=True)
    (tree / "opt" / "tool").write_text("x")
    fleet("layer", "import", "tools", str(tree))
    fleet("group", "add", "eng")
    fleet("user", "add", "alice", "--group", "eng")
    fleet("entitle", "tools", "--group", "eng", "--priority", "20")
    fleet("entitle", "tools", "--machine", "m1")
    listed = fleet.json("entitle", "list")
    assert {(e["kind"], e["target"]) for e in listed} == {("group", "eng"), ("machine", "m1")}
    assert [e["target"] for e in fleet.json("entitle", "list", "--group", "eng")] == ["eng"]
    table = fleet("entitle", "list", "--machine", "m1").out.splitlines()
    assert table[0].startswith("ID\tLAYER") and "\ttools\tlatest\tmachine\tm1\t" in table[1]
    shown = fleet("user", "show", "alice").out
    assert "groups: eng" in shown and "tools (group eng, priority 20)" in shown
    assert "Take it back from a user" in fleet("unentitle", "--help").out


def test_export_to_every_format_import_takes(cli: Cli, tmp_path: Path) -> None:
    disk = tmp_path / "base.raw"
    disk.write_bytes(b"lamina" * 1000)
    os.truncate(disk, 8 << 20)
    cli("image", "import", "base", str(disk))
    for fmt in ("raw", "qcow2", "vmdk", "vhdx", "vpc"):
        out = tmp_path / f"out.{fmt}"
        cli("image", "export", "base", str(out), "--format", fmt)
        info = json.loads(subprocess.check_output(["qemu-img", "info", "--output=json", str(out)]))
        assert (info["format"], info["virtual-size"]) == (fmt, 8 << 20)
        back = cli.json("image", "import", f"back-{fmt}", str(out))
        assert back["format"] == fmt
        raw = tmp_path / f"back-{fmt}.raw"
        cli("image", "export", f"back-{fmt}", str(raw))
        assert raw.read_bytes() == disk.read_bytes(), fmt


def test_every_command_has_an_example_of_itself() -> None:
    import typer

    from lamina.cli import app

    # the subcommands a group runs when none is named: lamina stream IMAGE, entitle LAYER
    defaults = {("stream", "run"), ("entitle", "to")}
    missing = []

    def walk(command: object, path: list[str]) -> None:
        subs = getattr(command, "commands", None)
        if isinstance(subs, dict):
            for name, sub in subs.items():
                walk(sub, [*path, name])
            return
        example = re.search(r"Example: (.+)", getattr(command, "help", None) or "")
        said = path[:-1] if tuple(path[-2:]) in defaults else path
        if example is None or not example[1].startswith(" ".join(["lamina", *said])):
            missing.append(" ".join(path))

    walk(typer.main.get_command(app), [])
    assert not missing, f"without an example of themselves: {missing}"


def test_image_rm_takes_several(cli: Cli, tmp_path: Path) -> None:
    for name, fill in (("a", b"a"), ("b", b"b"), ("c", b"c")):
        disk = tmp_path / f"{name}.raw"
        disk.write_bytes(fill * 4096)
        cli("image", "import", name, str(disk))
    gone = cli.json("image", "rm", "a", "c")
    assert [g["removed"] for g in gone] == [["a@1"], ["c@1"]]
    assert [i["name"] for i in cli.json("image", "list")] == ["b"]


def test_log_lines_carry_the_same_timestamp_format() -> None:
    import json
    import logging
    import re

    from lamina.logs import JsonFormatter

    record = logging.LogRecord("lamina", logging.INFO, __file__, 1, "x", None, None)
    ts = json.loads(JsonFormatter().format(record))["ts"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts), ts
