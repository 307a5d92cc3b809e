"""Real NBD clients for the tests: qemu-io commands against an nbd:// URL, or over TLS
with a credentials folder (qemu's tls-creds-x509)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def tls_object(creds: Path) -> list[str]:
    """qemu's TLS client credentials object, ``tls0``, from a credentials folder."""
    return ["--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client"]


def tls_image(port: int, export: str, host: str = "127.0.0.1") -> str:
    """``--image-opts`` for an export over TLS (qemu takes no nbds:// URL)."""
    return (
        f"driver=raw,file.driver=nbd,file.server.type=inet,file.server.host={host},"
        f"file.server.port={port},file.export={export},file.tls-creds=tls0"
    )


def qemu_io(
    url: str, *commands: str, read_only: bool = False, tls: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """qemu-io on ``url``; with ``tls`` (a credentials folder) ``url`` is a ``tls_image``."""
    args = ["qemu-io", *(["-r"] if read_only else [])]
    args += [*tls_object(tls), "--image-opts"] if tls is not None else ["-f", "raw"]
    for c in commands:
        args += ["-c", c]
    return subprocess.run([*args, url], capture_output=True, text=True, timeout=120, check=False)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    """The output of a qemu-io run that must have succeeded (patterns included)."""
    assert proc.returncode == 0 and "failed" not in proc.stdout.lower(), proc.stdout + proc.stderr
    return proc.stdout


class Session:
    """An interactive qemu-io holding one connection open."""

    def __init__(self, url: str, *, read_only: bool = False, image_opts: bool = False) -> None:
        """``url``: an nbd:// URL, or with ``image_opts`` qemu's options for the image
        (``reconnect-delay``, which no URL can say)."""
        how = ["--image-opts"] if image_opts else ["-f", "raw"]
        self.proc = subprocess.Popen(
            ["qemu-io", *how, *(["-r"] if read_only else []), url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._until_prompt()

    def _until_prompt(self) -> str:
        assert self.proc.stdout is not None
        out = ""
        while not out.endswith("qemu-io> "):
            c = self.proc.stdout.read(1)
            if not c:
                raise AssertionError(f"qemu-io ended: {out}")
            out += c
        return out

    def run(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        out = self._until_prompt()
        assert "failed" not in out.lower() and "error" not in out.lower(), out
        return out

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
