"""``lamina guest install ROOT``: the guest kit into a root file system.

What goes where (all relative to ROOT):

    opt/lamina/                       the agent: pyvenv.cfg, bin/python3 -> the guest's
                                      Python, lib/pythonX.Y/site-packages (lamina and its
                                      dependencies, compiled), bin/lamina,
                                      libexec/lamina-pam-session
    etc/systemd/system/lamina-agent.service   (enabled)
    usr/share/pam-configs/lamina      the PAM session hook, set up by pam-auth-update
    etc/initramfs-tools/hooks/lamina, scripts/init-bottom/lamina-identity,
    conf.d/lamina                     the identity before switch_root; FSTYPE for fsck
    etc/initramfs-tools/scripts/local-top/lamina-nbd   a network boot's seed as an NBD
                                      disk; opt/lamina/libexec/lamina-nbd-client, the
                                      nbd-client the initramfs runs (netlink, TLS)
    etc/systemd/system/lamina-netroot.service   (enabled) a network root's lost
                                      connection is made again (lamina.guest.netroot)
    etc/udev/rules.d/61-lamina-seed.rules    the seed readable by root only
    etc/lamina/system.json            the layer this root is (``--base``)
    var/lib/lamina/                   the agent's home, its database created
    var/log/journal/                  a persistent journal (kept on stateful machines)

And what a golden image must not carry, because each machine gets its own from the seed:
SSH host keys and a machine-id (``/etc/machine-id`` is left empty, as systemd expects of an
image). The locale cloud-init sets (en_US.UTF-8) is generated, so its locale step has
nothing to do at boot. The initramfs is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lamina.errors import NotFound, ToolError
from lamina.guest import chroot, paths, pyenv

Log = Callable[[str], None]
LOCALE = "en_US.UTF-8"  # cloud-init's default on Debian
NETROOT = "lamina-netroot.service"  # a network root's connection comes back (guest.netroot)

# (file in lamina.guest.files, destination under the root, mode)
FILES = (
    ("lamina-agent.service", f"etc/systemd/system/{paths.UNIT}", 0o644),
    ("pam-config", "usr/share/pam-configs/lamina", 0o644),
    ("lamina-pam-session", f"{paths.PREFIX}/libexec/lamina-pam-session", 0o755),
    ("initramfs-hook", "etc/initramfs-tools/hooks/lamina", 0o755),
    ("initramfs-identity", "etc/initramfs-tools/scripts/init-bottom/lamina-identity", 0o755),
    ("initramfs-nbd", "etc/initramfs-tools/scripts/local-top/lamina-nbd", 0o755),
    ("nbd-client-wrapper", f"{paths.PREFIX}/libexec/lamina-nbd-client", 0o755),
    (NETROOT, f"etc/systemd/system/{NETROOT}", 0o644),
    ("61-lamina-seed.rules", "etc/udev/rules.d/61-lamina-seed.rules", 0o644),
)
# The root file system's type for the initramfs's fsck, which cannot probe it when the
# root arrives over the network (an NBD root): initramfs-tools reads FSTYPE from conf.d.
# NBDCLIENT: what Debian's nbd script runs to connect nbdroot= (files/nbd-client-wrapper).
INITRAMFS_CONF = "# lamina guest kit\nFSTYPE=ext4\nexport NBDCLIENT=/sbin/lamina-nbd-client\n"
LAUNCHER = """#!{prefix}/bin/python3
import sys

from lamina.cli import main

sys.exit(main())
"""


@dataclass
class Installed:
    root: str
    python: str
    steps: list[str] = field(default_factory=list)


def check_root(root: Path) -> Path:
    root = root.absolute()
    if not (root / "etc").is_dir() or not (root / "usr" / "bin").is_dir():
        raise NotFound(f"{root}: not a root file system (no etc/ or usr/bin/)")
    return root


def install(root: Path, *, base: str | None, cache: Path, log: Log) -> Installed:
    """Put the kit into ``root`` (idempotent: a second run replaces what the first did)."""
    root = check_root(root)
    version = pyenv.guest_python(root)
    done = Installed(str(root), version)

    def step(text: str) -> None:
        done.steps.append(text)
        log(text)

    _agent(root, version, cache, step)
    _files(root, base)
    step("systemd unit, PAM hook, initramfs hook, udev rule installed")
    _scrub(root)
    _agent_home(root)
    if (root / "usr" / "sbin" / "pam-auth-update").exists():
        chroot.run(root, ["pam-auth-update", "--package", "--enable", "lamina"], "pam-auth-update")
    else:
        _pam_fallback(root)
    if (root / "usr" / "sbin" / "locale-gen").exists():
        step(f"generating the {LOCALE} locale")
        _locale(root)
    if (root / "usr" / "sbin" / "update-initramfs").exists():
        step("rebuilding the initramfs")
        chroot.run(root, ["update-initramfs", "-u", "-k", "all"], "update-initramfs")
    else:
        step("no initramfs-tools in the root: the identity arrives by cloud-init only")
    return done


def _agent(root: Path, version: str, cache: Path, step: Log) -> None:
    prefix = root / paths.PREFIX
    step(f"installing the agent into /{paths.PREFIX} (Python {version})")
    shutil.rmtree(prefix / "lib", ignore_errors=True)
    (prefix / "bin").mkdir(parents=True, exist_ok=True)
    (prefix / "pyvenv.cfg").write_text(
        f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {version}\n"
    )
    python = prefix / "bin" / "python3"
    python.unlink(missing_ok=True)
    python.symlink_to("/usr/bin/python3")
    site = prefix / "lib" / f"python{version}" / "site-packages"
    pyenv.install(site, version, cache, step)
    launcher = prefix / "bin" / "lamina"
    launcher.write_text(LAUNCHER.format(prefix=f"/{paths.PREFIX}"))
    launcher.chmod(0o755)
    # Compiled now, by the guest's Python: a stateless machine would compile at every boot.
    step("compiling the agent's Python files")
    target = f"/{paths.PREFIX}/lib"
    chroot.run(root, ["/usr/bin/python3", "-m", "compileall", "-q", target], "compileall")


def _files(root: Path, base: str | None) -> None:
    source = resources.files("lamina.guest") / "files"
    for name, dest, mode in FILES:
        path = root / dest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((source / name).read_bytes())
        path.chmod(mode)
    conf = root / "etc" / "initramfs-tools" / "conf.d" / "lamina"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(INITRAMFS_CONF)
    for target, unit in (("multi-user", paths.UNIT), ("sysinit", NETROOT)):
        wants = root / "etc" / "systemd" / "system" / f"{target}.target.wants" / unit
        wants.parent.mkdir(parents=True, exist_ok=True)
        wants.unlink(missing_ok=True)
        wants.symlink_to(f"/etc/systemd/system/{unit}")
    system = root / paths.SYSTEM
    system.parent.mkdir(parents=True, exist_ok=True)
    system.write_text(json.dumps({"base": base}, indent=2) + "\n")
    (root / "var" / "log" / "journal").mkdir(parents=True, exist_ok=True)


def _scrub(root: Path) -> None:
    """What each machine must have of its own: never the image's."""
    for key in (root / "etc" / "ssh").glob("ssh_host_*key*"):
        key.unlink()
    machine_id = root / "etc" / "machine-id"
    if machine_id.exists() or machine_id.is_symlink():
        machine_id.unlink()
    machine_id.write_text("")  # empty: "not set yet", what systemd expects in an image
    dbus = root / "var" / "lib" / "dbus" / "machine-id"
    if dbus.exists() and not dbus.is_symlink():
        dbus.unlink()
        dbus.symlink_to("/etc/machine-id")
    (root / paths.AGENT_ENV).unlink(missing_ok=True)


def _agent_home(root: Path) -> None:
    """The agent's home with its database created: migrating it at every boot of a
    stateless machine would take seconds under emulation."""
    from lamina.manager.home import init_home

    where = root / paths.HOME
    home = init_home(where, f"sqlite:///{where / 'lamina.db'}").home  # a home, as `lamina init`
    try:
        with home.session():
            pass
    finally:
        home.close()
    (root / paths.SESSIONS).mkdir(parents=True, exist_ok=True)
    os.chmod(root / paths.HOME, 0o700)


def _pam_fallback(root: Path) -> None:
    session = root / "etc" / "pam.d" / "common-session"
    if not session.exists():
        raise ToolError(f"{root} has neither pam-auth-update nor etc/pam.d/common-session")
    line = f"session optional pam_exec.so stdout /{paths.PREFIX}/libexec/lamina-pam-session\n"
    text = session.read_text()
    if line not in text:
        session.write_text(text + line)


def _locale(root: Path) -> None:
    gen = root / "etc" / "locale.gen"
    lines = gen.read_text().splitlines() if gen.exists() else []
    entry = f"{LOCALE} UTF-8"
    lines = [entry if line.lstrip("# ").strip() == entry else line for line in lines]
    if entry not in lines:
        lines.append(entry)
    gen.write_text("\n".join(lines) + "\n")
    chroot.run(root, ["locale-gen"], "locale-gen")
    (root / "etc" / "default").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "default" / "locale").write_text(f"LANG={LOCALE}\n")
