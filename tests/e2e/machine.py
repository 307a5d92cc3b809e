"""A lamina machine booted under qemu (TCG) from `lamina serve`, driven through ssh.

The system disk is the machine's NBD export, the seed its ``/seed`` export, both as
virtio disks; the NIC has the machine's MAC on qemu's user network, which forwards a
loopback port to the guest's sshd and lets the guest reach the host's loopback as
10.0.2.2 (where the manager listens). ``-no-reboot``: a reboot in the guest ends qemu,
so the next ``start`` is a real power cycle (a new NBD connection: a stateless machine
starts clean).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import TracebackType

from lamina.demo.vm import drive
from tests.servers import free_port

MEMORY_MIB = 1024
HOST_FROM_GUEST = "10.0.2.2"  # qemu user networking: the host's loopback
SSH_OPTIONS = [
    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", "-o", "BatchMode=yes",
    "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=24",
]  # fmt: skip


class Machine:
    def __init__(self, name: str, mac: str, nbd: str, key: Path, logs: Path) -> None:
        self.name, self.mac, self.nbd, self.key = name, mac, nbd, key
        self.console = logs / f"{name}.console.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def command(self) -> list[str]:
        return [
            "qemu-system-x86_64", "-nodefaults", "-display", "none", "-no-reboot",
            "-machine", "pc,accel=tcg", "-m", str(MEMORY_MIB), "-smp", "1",
            "-serial", f"file:{self.console}",
            "-drive", drive(f"{self.nbd}/machine/{self.name}", "disk", readonly=False),
            "-device", "virtio-blk-pci,drive=disk,bootindex=0",
            "-drive", drive(f"{self.nbd}/machine/{self.name}/seed", "seed", readonly=True),
            "-device", "virtio-blk-pci,drive=seed",
            "-netdev", f"user,id=net,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device", f"virtio-net-pci,netdev=net,mac={self.mac},romfile=",
        ]  # fmt: skip

    def start(self) -> Machine:
        self.console.unlink(missing_ok=True)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL)
        return self

    def ssh_args(self, user: str, *command: str, tty: bool = False) -> list[str]:
        extra = ["-tt"] if tty else []
        return ["ssh", "-i", str(self.key), "-p", str(self.port), *SSH_OPTIONS, *extra,
                f"{user}@127.0.0.1", *command]  # fmt: skip

    def ssh(self, user: str, command: str, *, check: bool = True, timeout: float = 120) -> str:
        proc = subprocess.run(
            self.ssh_args(user, command),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{self.name}: ssh {user} {command!r} exited {proc.returncode}: {proc.stderr}"
            )
        return proc.stdout

    def root(self, command: str, **kw: object) -> str:
        """As root, through the first user's sudo."""
        return self.ssh("debian", f"sudo sh -c {quote(command)}", **kw)  # type: ignore[arg-type]

    def wait_ssh(self, timeout: float) -> float:
        """Seconds from start until sshd answers and cloud-init is done with the users."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name}: qemu exited: {self.tail()}")
            done = subprocess.run(
                self.ssh_args("debian", "test -e /var/lib/cloud/instance/boot-finished"),
                capture_output=True,
                timeout=60,
                check=False,
            )
            if done.returncode == 0:
                return time.monotonic() - self.started
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no ssh within {timeout} s: {self.tail()}")
            time.sleep(2)

    def wait_exit(self, timeout: float) -> None:
        assert self.proc is not None
        self.proc.wait(timeout)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return "no console"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> Machine:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


class Shell:
    """One ssh session kept open (a logged-in user's shell): commands in, output out."""

    END = "--lamina-end--"

    def __init__(self, machine: Machine, user: str) -> None:
        self.proc = subprocess.Popen(
            machine.ssh_args(user, "bash", "--login"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{command} 2>&1; echo {self.END}\n")
        self.proc.stdin.flush()
        lines = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"the session ended: {''.join(lines)}")
            if line.rstrip("\n") == self.END:
                return "".join(lines)
            lines.append(line)

    def close(self, timeout: float = 60) -> None:
        """Log out: the shell exits, sshd closes the PAM session."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("exit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout)
