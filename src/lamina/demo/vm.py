"""Boot the demo image under qemu (TCG) and read what its init reports.

Two virtio disks: the system disk (bootindex 0) and the NoCloud seed (read-only), each a
local file or an ``nbd://HOST:PORT/EXPORT`` URL; with ``tls`` (a credentials folder from
``lamina machine credentials``) the NBD disks are opened over TLS. The VM powers itself off after printing
its ``lamina-boot ...`` line; a timeout kills it. VMs share nothing, so several can run
at once (one qemu process each).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import AnyStr, Generic, Self

from lamina.demo import tools
from lamina.demo.initramfs import BOOT_PREFIX
from lamina.errors import ToolError
from lamina.identity.validate import check_mac

# Measured: in 64 MiB the VM resets silently while the kernel unpacks, 96 MiB boots;
# 128 MiB leaves room.
MEMORY_MIB = 128
# One boot takes ~3 s under TCG on an idle core (measured); a loaded host, many VMs at
# once or a slow server stretch it, so the default leaves a wide margin.
TIMEOUT = 120.0
# Not only at a line's start: the serial console can lose the end of the firmware's last
# line (iPXE's "ok") to the init's terminal reset, and the boot line then follows it.
_LINE = re.compile(rf"{re.escape(BOOT_PREFIX)}(?P<fields>.*?)\r?$", re.MULTILINE)


@dataclass(frozen=True)
class BootReport:
    """What the demo VM's init printed, and how long the VM ran."""

    hostname: str
    machine_id: str
    marker: bool  # the marker file was there before this boot
    seconds: float
    console: str

    @property
    def line(self) -> str:
        marker = "present" if self.marker else "absent"
        return f"{BOOT_PREFIX}hostname={self.hostname} machine-id={self.machine_id} marker={marker}"


def drive(
    source: str | Path,
    drive_id: str,
    *,
    readonly: bool,
    tls: bool = False,
    reconnect_delay: int | None = None,
) -> str:
    """A qemu ``-drive`` value for a raw local file or an ``nbd://`` URL (over TLS with
    the ``tls0`` credentials object when ``tls``; requests wait up to ``reconnect_delay``
    seconds for a server that went away to come back)."""
    text = str(source)
    if "://" in text and not text.startswith(("nbd://", "nbd+unix://")):
        raise ToolError(f"unsupported drive URL {text!r}: use a file or nbd://HOST:PORT/EXPORT")
    if "://" not in text and not Path(text).exists():
        raise ToolError(f"{text}: no such disk image")
    spec = f"file={text.replace(',', ',,')},format=raw,if=none,id={drive_id}"
    if tls and text.startswith("nbd://"):
        spec += ",file.tls-creds=tls0"
    if reconnect_delay is not None and text.startswith("nbd"):
        spec += f",file.reconnect-delay={reconnect_delay}"
    return spec + (",readonly=on" if readonly else "")


def qemu_command(
    disk: str | Path,
    seed: str | Path | None,
    *,
    mac: str | None = None,
    memory_mib: int = MEMORY_MIB,
    accel: str = "tcg",
    tls: Path | None = None,
    reconnect_delay: int | None = None,
    extra: tuple[str | Path, ...] = (),
) -> list[str]:
    """The qemu command line: no default devices, serial console on stdio, exit on
    power-off and on reboot (a panic reboots: see the kernel's panic=-1). ``extra``:
    more read-only disks (the init sources ``run.sh`` from one labelled ``lmscript``)."""
    creds = ["-object", f"tls-creds-x509,id=tls0,dir={tls},endpoint=client"] if tls else []
    args = [
        tools.which("qemu-system-x86_64"),
        "-nodefaults", "-display", "none", "-no-reboot",
        "-machine", f"pc,accel={accel}", "-m", str(memory_mib), "-smp", "1",
        "-serial", "stdio", *creds,
        "-drive", drive(
            disk, "disk", readonly=False, tls=tls is not None, reconnect_delay=reconnect_delay
        ),
        "-device", "virtio-blk-pci,drive=disk,bootindex=0",
    ]  # fmt: skip
    if seed is not None:
        args += [
            "-drive",
            drive(
                seed, "seed", readonly=True, tls=tls is not None, reconnect_delay=reconnect_delay
            ),
            "-device",
            "virtio-blk-pci,drive=seed",
        ]
    for i, path in enumerate(extra):
        args += ["-drive", drive(path, f"extra{i}", readonly=True), "-device",
                 f"virtio-blk-pci,drive=extra{i}"]  # fmt: skip
    if mac is not None:
        # A NIC only to show the identity's MAC to the guest: restricted user networking
        # (no way out), and no option ROM, so the firmware does not try to boot from it.
        args += [
            "-netdev", "user,id=net,restrict=on",
            "-device", f"virtio-net-pci,netdev=net,mac={check_mac(mac)},romfile=",
        ]  # fmt: skip
    return args


def parse_console(console: str, seconds: float) -> BootReport:
    """The report from the VM's console output; a ToolError when the init failed."""
    match = _LINE.search(console)
    if match is None:
        tail = " | ".join(console.strip().splitlines()[-5:]) or "no console output"
        raise ToolError(f"the demo VM printed no {BOOT_PREFIX.strip()} line: {tail}")
    fields = dict(f.partition("=")[::2] for f in match["fields"].split())
    if "error" in fields:
        raise ToolError(f"the demo VM's init failed: {fields['error']}")
    return BootReport(
        hostname=fields.get("hostname", ""),
        machine_id=fields.get("machine-id", ""),
        marker=fields.get("marker") == "present",
        seconds=round(seconds, 2),
        console=console,
    )


def _failure(code: int | None, stderr: str) -> ToolError:
    detail = (stderr.strip().splitlines() or [f"exit status {code}"])[-1]
    return ToolError(f"qemu failed: {detail.removeprefix('qemu-system-x86_64: ')}")


class QemuChild(Generic[AnyStr]):
    """A qemu process this object starts and owns: killed and reaped when the ``with``
    block ends, its pipes closed."""

    _proc: subprocess.Popen[AnyStr] | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
        if self._proc is not None:
            for stream in (self._proc.stdout, self._proc.stderr):
                if stream is not None:
                    stream.close()


class Vm(QemuChild[str]):
    """One demo VM (one qemu process); ``with Vm(...) as vm: report = vm.wait()``."""

    def __init__(
        self,
        disk: str | Path,
        seed: str | Path | None,
        *,
        mac: str | None = None,
        memory_mib: int = MEMORY_MIB,
        accel: str = "tcg",
    ) -> None:
        self.command = qemu_command(disk, seed, mac=mac, memory_mib=memory_mib, accel=accel)
        self._started = 0.0

    def start(self) -> Vm:
        self._started = time.monotonic()
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        return self

    def wait(self, timeout: float = TIMEOUT) -> BootReport:
        """Wait for the VM to power off; kill it after ``timeout`` seconds."""
        if self._proc is None:
            self.start()
        assert self._proc is not None
        try:
            console, stderr = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            console, _ = self._proc.communicate()
            tail = " | ".join(console.strip().splitlines()[-3:]) or "no console output"
            raise ToolError(
                f"the demo VM did not power off within {timeout:.0f} s: {tail}"
            ) from None
        seconds = time.monotonic() - self._started
        if self._proc.returncode != 0:
            raise _failure(self._proc.returncode, stderr)
        return parse_console(console, seconds)


def boot(
    disk: str | Path,
    seed: str | Path | None,
    *,
    mac: str | None = None,
    timeout: float = TIMEOUT,
    memory_mib: int = MEMORY_MIB,
    accel: str = "tcg",
) -> BootReport:
    """Boot once and return the init's report (blocking)."""
    with Vm(disk, seed, mac=mac, memory_mib=memory_mib, accel=accel) as vm:
        return vm.wait(timeout)


async def boot_async(
    disk: str | Path,
    seed: str | Path | None,
    *,
    mac: str | None = None,
    timeout: float = TIMEOUT,
    memory_mib: int = MEMORY_MIB,
    accel: str = "tcg",
    tls: Path | None = None,
) -> BootReport:
    """``boot`` for an asyncio program (the NBD server's loop keeps serving meanwhile)."""
    command = qemu_command(disk, seed, mac=mac, memory_mib=memory_mib, accel=accel, tls=tls)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        raise ToolError(f"the demo VM did not power off within {timeout:.0f} s") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    console = out.decode(errors="replace")
    if proc.returncode != 0:
        raise _failure(proc.returncode, err.decode(errors="replace"))
    return parse_console(console, time.monotonic() - started)
