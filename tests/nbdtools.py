"""Real NBD clients for the tests: qemu-io commands against an nbd:// URL."""

from __future__ import annotations

import subprocess


def qemu_io(url: str, *commands: str, read_only: bool = False) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for c in commands:
        args += ["-c", c]
    return subprocess.run([*args, url], capture_output=True, text=True, timeout=120, check=False)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    """The output of a qemu-io run that must have succeeded (patterns included)."""
    assert proc.returncode == 0 and "failed" not in proc.stdout.lower(), proc.stdout + proc.stderr
    return proc.stdout
