"""lamina service install: the units systemd would load (checked by systemd-analyze
verify, and their exposure by systemd-analyze security), and what an install writes."""

from __future__ import annotations

import configparser
import os
import stat
import subprocess
from pathlib import Path

from tests.conftest import LAMINA, Cli


def unit(cli: Cli, *args: str) -> str:
    return cli("service", "install", *args, "--print").out


def parse(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string(text)
    return parser


def analyze(tmp_path: Path, text: str, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / name
    path.write_text(text)
    return subprocess.run(
        ["systemd-analyze", *args, str(path)], capture_output=True, text=True, check=False
    )


def test_the_server_unit_is_hardened(cli: Cli) -> None:
    service = parse(unit(cli, "serve", "--home", "/var/lib/lamina"))["Service"]
    assert service["ExecStart"] == f"{LAMINA} serve --home /var/lib/lamina"
    assert service["User"] == "lamina" and service["Environment"].startswith("LAMINA_CONFIG=")
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/lamina" and service["ProtectHome"] == "yes"
    assert service["CapabilityBoundingSet"] == ""


def test_a_home_under_home_stays_reachable(cli: Cli) -> None:
    service = parse(unit(cli, "serve", "--home", "/home/ops/lamina"))["Service"]
    assert service["ProtectHome"] == "read-only"
    assert service["ReadWritePaths"] == "/home/ops/lamina"


def test_the_agent_unit_keeps_its_mounts_visible(cli: Cli) -> None:
    service = parse(unit(cli, "agent"))["Service"]
    assert service["ExecStart"] == f"{LAMINA} agent --home /var/lib/lamina"
    assert "User" not in service and service["NoNewPrivileges"] == "yes"
    # any of these would give the unit a mount namespace that hides the sessions it mounts
    assert not {"ProtectSystem", "PrivateTmp", "ReadWritePaths", "ProtectHome"} & set(service)
    refused = cli("service", "install", "agent", "--user", "alice", "--print", check=False)
    assert refused.code == 2 and "runs as root" in refused.err


def test_systemd_loads_both_units(cli: Cli, tmp_path: Path) -> None:
    for role in ("serve", "agent"):
        done = analyze(tmp_path, unit(cli, role), f"lamina-{role}.service", "verify")
        assert done.returncode == 0 and done.stderr == "", done.stderr
    score = analyze(
        tmp_path, unit(cli, "serve"), "lamina-serve.service", "security", "--offline=yes"
    )
    level = float(
        score.stdout.split("Overall exposure level for lamina-serve.service:")[1].split()[0]
    )
    assert level <= 2.0, score.stdout  # systemd calls 0-2 "OK"; 1.7 when written


def test_install_writes_the_unit_the_home_and_a_configuration(cli: Cli, tmp_path: Path) -> None:
    env = {**os.environ, "LAMINA_CONFIG": str(tmp_path / "etc" / "lamina.toml")}
    args = ["service", "install", "serve", "--user", "root", "--home", str(tmp_path / "h")]
    args += ["--unit-dir", str(tmp_path)]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [LAMINA, *args, *extra], capture_output=True, text=True, env=env, check=False
        )

    planned = run("--dry-run")
    assert planned.returncode == 0 and "would write" in planned.stdout
    assert not (tmp_path / "h").exists() and not (tmp_path / "lamina-serve.service").exists()
    done = run()
    assert done.returncode == 0, done.stderr
    assert "systemctl enable --now lamina-serve.service" in done.stdout
    assert parse((tmp_path / "lamina-serve.service").read_text())["Service"]["User"] == "root"
    config = tmp_path / "etc" / "lamina.toml"
    assert f'home = "{tmp_path / "h"}"' in config.read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o640 and (tmp_path / "h").is_dir()
    again = run()  # a second install keeps the configuration an administrator edited
    assert again.returncode == 0 and f"write {config}" not in again.stdout
