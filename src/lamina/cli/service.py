"""lamina service install [serve|agent]: systemd units for the server and the agent.

The server's unit runs as an unprivileged system user that owns the home, on a read-only
system (ProtectSystem=strict) where only the home is writable. The agent's unit runs as
root with no mount namespace of its own: it mounts the users' sessions and writes /etc
(hostname, machine-id, SSH host keys), and mounts made inside a namespace of the unit
(ProtectSystem=, PrivateTmp=, ReadWritePaths=, ...) would never reach the login sessions.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from lamina.cli.common import say
from lamina.errors import UsageError
from lamina.settings import config_path

app = typer.Typer(help="System services (systemd units).", no_args_is_help=True)

UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_HOME = Path("/var/lib/lamina")


class Role(StrEnum):
    serve = "serve"
    agent = "agent"


@dataclass(frozen=True)
class Unit:
    role: Role
    executable: Path
    home: Path
    user: str
    config: Path

    @property
    def name(self) -> str:
        return f"lamina-{self.role.value}.service"

    def text(self) -> str:
        return _serve(self) if self.role is Role.serve else _agent(self)


def _header(unit: Unit, description: str) -> list[str]:
    return [
        "# Written by lamina service install; settings live in the configuration file.",
        "[Unit]",
        f"Description={description}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"Environment=LAMINA_CONFIG={unit.config}",
        f"ExecStart={unit.executable} {unit.role.value} --home {unit.home}",
        "Restart=on-failure",
        "RestartSec=2s",
    ]


def _serve(unit: Unit) -> str:
    # A home (or a lamina installed) under /home or /root stays reachable (read-only, the
    # home then writable by ReadWritePaths); elsewhere the users' homes are hidden.
    in_homes = any(
        path.is_relative_to(p)
        for path in (unit.home, unit.executable)
        for p in ("/home", "/root", "/run/user")
    )
    lines = _header(unit, "lamina block server and manager")
    lines += [
        f"User={unit.user}",
        f"Group={unit.user}",
        "UMask=0027",
        # Each NBD connection holds a socket and a few image files open.
        "LimitNOFILE=65536",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ProtectHome={'read-only' if in_homes else 'yes'}",
        f"ReadWritePaths={unit.home}",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        # Ports above 1023 need no capability.
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def _agent(unit: Unit) -> str:
    lines = _header(unit, "lamina machine agent")
    lines += [
        "# root, no mount namespace: see lamina service install --help",
        "NoNewPrivileges=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


@app.command("install")
def install(
    role: Annotated[Role, typer.Argument(help="Which service.")] = Role.serve,
    home: Annotated[
        Path, typer.Option("--home", help="The service's home (owned by --user).")
    ] = DEFAULT_HOME,
    user: Annotated[
        str | None,
        typer.Option("--user", help="Account the server runs as [lamina; the agent: root]."),
    ] = None,
    unit_dir: Annotated[
        Path, typer.Option("--unit-dir", help="Where the unit file goes.")
    ] = UNIT_DIR,
    print_unit: Annotated[
        bool, typer.Option("--print", help="Print the unit file and change nothing.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be done and change nothing.")
    ] = False,
) -> None:
    """Install a systemd unit: lamina-serve.service (an unprivileged user, a read-only
    system but for the home) or lamina-agent.service (root: it mounts the users'
    sessions and writes /etc, so it has no mount namespace of its own).

    The unit reads its settings from /etc/lamina/lamina.toml (LAMINA_CONFIG); the server
    user and its home are created when missing. Start it with systemctl enable --now.

    Example: lamina service install serve --home /var/lib/lamina --dry-run
    """
    if user is None:
        user = "lamina" if role is Role.serve else "root"
    if role is Role.agent and user != "root":
        raise UsageError("the agent runs as root (it mounts sessions and writes /etc)")
    unit = Unit(role, _executable(), home.absolute(), user, config_path())
    if print_unit:
        sys.stdout.write(unit.text())
        return
    for step, action in _plan(unit, unit_dir):
        say(("would " if dry_run else "") + step)
        if not dry_run:
            action()
    if not dry_run:
        say(f"start it with: systemctl enable --now {unit.name}")


def _executable() -> Path:
    """The lamina of this installation (a venv's), else the one on PATH."""
    here = Path(sys.executable).with_name("lamina")
    found = here if here.exists() else shutil.which("lamina")
    if found is None:
        raise UsageError("no lamina executable found beside python or on PATH")
    return Path(found).absolute()


Step = tuple[str, Callable[[], None]]


def _plan(unit: Unit, unit_dir: Path) -> list[Step]:
    """What an install does, in order, each step said before it is done."""
    steps: list[Step] = []
    if not _user_exists(unit.user):
        steps.append(
            (
                f"create system user {unit.user}",
                lambda: _run(
                    "useradd", "--system", "--user-group", "--no-create-home",
                    "--home-dir", str(unit.home), "--shell", "/usr/sbin/nologin", unit.user,
                ),
            )
        )  # fmt: skip
    steps.append((f"create {unit.home} owned by {unit.user}", lambda: _make_home(unit)))
    if not unit.config.exists():
        steps.append((f"write {unit.config}", lambda: _write_config(unit)))
    path = unit_dir / unit.name
    steps.append((f"write {path}", lambda: _write(path, unit.text(), 0o644)))
    if unit_dir == UNIT_DIR and Path("/run/systemd/system").is_dir():
        steps.append(("reload systemd", lambda: _run("systemctl", "daemon-reload")))
    return steps


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise UsageError(f"{argv[0]}: {last}")


def _make_home(unit: Unit) -> None:
    unit.home.mkdir(mode=0o750, parents=True, exist_ok=True)
    entry = pwd.getpwnam(unit.user)
    os.chown(unit.home, entry.pw_uid, entry.pw_gid)


def _write_config(unit: Unit) -> None:
    """A first lamina.toml naming the home; readable by the service's group only (the
    agent's holds its token)."""
    text = (
        "# lamina configuration: LAMINA_* variables override it, flags override both.\n"
        f"home = {json.dumps(str(unit.home))}\n"
        + ("" if unit.role is Role.serve else '# manager = "https://manager:8480"\n# token = ""\n')
    )
    unit.config.parent.mkdir(parents=True, exist_ok=True)
    _write(unit.config, text, 0o640 if unit.role is Role.serve else 0o600)
    if unit.role is Role.serve:
        os.chown(unit.config, 0, pwd.getpwnam(unit.user).pw_gid)


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)
