"""Machines without a disk: qemu VMs that boot from the network (PXE, then iPXE).

No disk is attached by the host. The VM has one virtio NIC whose option ROM is qemu's
iPXE (Debian's ``ipxe-qemu``), and qemu's user networking: its DHCP server hands out
``bootfile`` from its TFTP folder, a two-line iPXE script that chains lamina's
``/boot.ipxe`` over HTTP; the guest reaches the host's loopback at 10.0.2.2 and nothing
else. The firmware is SeaBIOS (legacy BIOS; with ``graphics=off`` it copies its text
screen, where iPXE writes, to the serial console) or OVMF (UEFI; its console is the serial port).
Everything the machine prints (iPXE's messages, the kernel's, the demo init's report)
lands in one console file that a test can watch while the VM runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from lamina.demo import tools
from lamina.demo.vm import MEMORY_MIB, BootReport, QemuChild, parse_console
from lamina.errors import ToolError
from lamina.identity.validate import check_mac

HOST_FROM_GUEST = "10.0.2.2"  # qemu user networking's address of the host
TFTP_BOOTFILE = "lamina.ipxe"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
FIRMWARES = ("bios", "uefi")
# UEFI under TCG: OVMF alone takes ~10 s before iPXE starts, and the machine needs more
# memory than SeaBIOS's (the kernel's EFI stub copies itself and the initrd).
UEFI_MEMORY_MIB = 256
TIMEOUT = 240.0
# CSI sequences (colours, cursor moves) and two-byte escapes (ESC c resets the terminal)
_ANSI = re.compile(r"\x1b(\[[0-9;=?]*[A-Za-z]|[@-Z\\^_`a-z{|}~])")


def tftp_folder(folder: Path, http_base: str) -> Path:
    """qemu's TFTP folder: the script the firmware's DHCP answer names, which chains
    lamina's entry script over HTTP (what a TFTP server of the network would hold)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TFTP_BOOTFILE).write_text(f"#!ipxe\nchain {http_base}/boot.ipxe\n")
    return folder


def pxe_command(
    *,
    mac: str,
    tftp: Path,
    firmware: str = "bios",
    vars_file: Path | None = None,
    memory_mib: int | None = None,
    accel: str = "tcg",
    monitor: Path | None = None,
    netdev: str | None = None,
    option_rom: bool = True,
) -> list[str]:
    """qemu for a diskless machine booting from its NIC (``bootindex=0``). ``netdev``
    replaces qemu's user networking (a tap on a bridge where a real DHCP server answers);
    without ``option_rom`` the NIC has no iPXE ROM, so UEFI boots with OVMF's own PXE."""
    if firmware not in FIRMWARES:
        raise ToolError(f"firmware must be bios or uefi, not {firmware!r}")
    # graphics=off: SeaBIOS writes its text screen (where iPXE's messages go) to the serial port
    machine = "pc,graphics=off" if firmware == "bios" else "q35"
    memory = memory_mib or (MEMORY_MIB if firmware == "bios" else UEFI_MEMORY_MIB)
    args = [
        tools.which("qemu-system-x86_64"),
        "-nodefaults", "-display", "none", "-no-reboot",
        "-machine", f"{machine},accel={accel}", "-m", str(memory), "-smp", "1",
        "-serial", "stdio",
        "-netdev", netdev or f"user,id=net0,tftp={tftp},bootfile={TFTP_BOOTFILE}",
        "-device", f"virtio-net-pci,netdev=net0,mac={check_mac(mac)},bootindex=0,id=nic0"
        + ("" if option_rom else ",romfile="),
    ]  # fmt: skip
    if firmware == "uefi":
        if vars_file is None:
            raise ToolError("a UEFI machine needs its own copy of OVMF's variable store")
        args += [
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={vars_file}",
        ]  # fmt: skip
    if monitor is not None:
        args += ["-monitor", f"unix:{monitor},server=on,wait=off"]
    return args


def clean(console: str) -> str:
    """The console's text without terminal escapes (OVMF and sgabios paint with them)."""
    return _ANSI.sub("", console).replace("\r", "")


class PxeVm(QemuChild[bytes]):
    """One diskless VM; its console goes to ``workdir/NAME.console``.

    ``with PxeVm(...) as vm: vm.wait_for("text"); report = vm.wait()``
    """

    def __init__(
        self,
        name: str,
        mac: str,
        workdir: Path,
        http_base: str,
        *,
        firmware: str = "bios",
        memory_mib: int | None = None,
        accel: str = "tcg",
        monitor: bool = False,
        netdev: str | None = None,
        option_rom: bool = True,
        launcher: tuple[str, ...] = (),
    ) -> None:
        """``launcher``: what runs qemu (``ip netns exec NS``: a machine on another network)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.console_path = workdir / f"{name}.console"
        self.monitor_path = workdir / f"{name}.monitor" if monitor else None
        vars_file = None
        if firmware == "uefi":
            vars_file = workdir / f"{name}.vars.fd"
            shutil.copyfile(OVMF_VARS, vars_file)
        self.command = [
            *launcher,
            *pxe_command(
                mac=mac,
                tftp=tftp_folder(workdir / "tftp", http_base),
                firmware=firmware,
                vars_file=vars_file,
                memory_mib=memory_mib,
                accel=accel,
                monitor=self.monitor_path,
                netdev=netdev,
                option_rom=option_rom,
            ),
        ]
        self._started = 0.0

    def start(self) -> PxeVm:
        self._started = time.monotonic()
        with open(self.console_path, "wb") as console:
            self._proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT
            )
        return self

    def console(self) -> str:
        try:
            return clean(self.console_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def seconds(self) -> float:
        return time.monotonic() - self._started

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> float:
        """Seconds from power-on until ``text`` shows on the console."""
        deadline = time.monotonic() + timeout
        while text not in self.console():
            if self._proc is not None and self._proc.poll() is not None:
                raise ToolError(f"{self.name} stopped before showing {text!r}: {self._tail()}")
            if time.monotonic() > deadline:
                raise ToolError(
                    f"{self.name} did not show {text!r} in {timeout:.0f} s: {self._tail()}"
                )
            time.sleep(0.1)
        return self.seconds()

    def monitor(self, command: str) -> None:
        """Send a command to qemu's human monitor (``set_link nic0 off``)."""
        import socket

        if self.monitor_path is None:
            raise ToolError(f"{self.name} was started without a monitor")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.monitor_path))
            sock.sendall(command.encode() + b"\n")
            time.sleep(0.3)  # the monitor reads the line before the socket closes

    def wait(self, timeout: float = TIMEOUT) -> BootReport:
        """Wait for the machine to power off; its report (kill it after ``timeout``)."""
        assert self._proc is not None
        try:
            self._proc.wait(timeout=max(0.0, timeout - self.seconds()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise ToolError(
                f"{self.name} did not power off within {timeout:.0f} s: {self._tail()}"
            ) from None
        if self._proc.returncode != 0:
            raise ToolError(f"qemu for {self.name} failed: {self._tail()}")
        return parse_console(self.console(), self.seconds())

    def _tail(self) -> str:
        return " | ".join(self.console().strip().splitlines()[-4:]) or "no console output"
