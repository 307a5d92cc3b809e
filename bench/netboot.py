"""Network boot vs the direct NBD boot: the same image version, the same machine, one run.

  direct   qemu opens machine/NAME and its seed over NBD as virtio disks; SeaBIOS loads
           extlinux, the kernel and the initrd from the disk (the demo's usual boot)
  pxe      qemu attaches no disk: the NIC's iPXE ROM gets an address and the TFTP script
           from qemu's DHCP, chains lamina's /boot.ipxe, fetches the machine's kernel and
           initrd over HTTP, and the initrd roots itself on machine/NAME with nbd-client
           after its own DHCP
  uefi     pxe with OVMF instead of SeaBIOS (once, for reference)

With ``--debian``: the same for a Debian image built with ``lamina image build`` (taken
from the e2e tests' cache when built before; root), to its serial login prompt, which
shows the hostname the seed gave it (the VM is stopped there); ROUNDS defaults to 1.

Seconds from qemu's start to the demo init's boot line, alternately, ROUNDS each after one
warm-up of each (the first network boot reads the kernel and initrd out of the image
version; they are kept per version). For pxe also the second at which iPXE printed the
machine's name (its script came back). Prints ``ratio pxe/direct=…`` (below 1: the network
boot reached its boot line sooner).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import LAMINA, free_port, median, need, run, scratch, wait_port

DEBIAN = "--debian" in sys.argv[1:]
ROUNDS = int(os.environ.get("LAMINA_BENCH_ROUNDS", "1" if DEBIAN else "3"))
CACHE = Path(os.environ.get("LAMINA_TEST_CACHE") or "/var/tmp/lamina-test-cache")
MAC = "52:54:00:50:00:01"
DEBIAN_MEMORY_MIB = 1024  # what the e2e tests give a Debian machine


TRIES = 4
retried: list[str] = []


class EarlyPanic(Exception):
    """The guest kernel panicked before it read its disk."""


def to_line(
    command: list[str], work: Path, marks: dict[str, str], *, stop: bool = False
) -> dict[str, float]:
    """``boot_once``, again when the kernel panicked in its early timer check: TCG guests
    on a loaded host sometimes do (apic_intr_mode_init), before they read a byte of their
    disk or asked the network for anything. Each retry is counted and printed."""
    for attempt in range(TRIES):
        try:
            return boot_once(command, work, marks, stop=stop)
        except EarlyPanic as exc:
            if attempt == TRIES - 1:
                raise SystemExit(f"the VM panicked {TRIES} times: {exc}") from None
            retried.append(str(exc))
    raise AssertionError("unreachable")


def boot_once(
    command: list[str], work: Path, marks: dict[str, str], *, stop: bool = False
) -> dict[str, float]:
    """Run a VM with its console in a file; seconds until each mark's text shows up
    (``stop``: the VM is stopped then, instead of powering itself off)."""
    from lamina.demo.pxe import clean

    console = work / f"console-{time.monotonic_ns()}.txt"
    seen: dict[str, float] = {}
    started = time.monotonic()
    with open(console, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        while len(seen) < len(marks):
            text = clean(console.read_text(errors="replace"))
            for name, pattern in marks.items():
                if name not in seen and re.search(pattern, text, re.MULTILINE):
                    seen[name] = time.monotonic() - started
            if proc.poll() is not None and len(seen) < len(marks):
                tail = " | ".join(text.strip().splitlines()[-4:])
                if "x86_late_time_init" in text or "apic_intr_mode_init" in text:
                    raise EarlyPanic(tail)
                raise SystemExit(f"the VM stopped before {sorted(set(marks) - set(seen))}: {tail}")
            if time.monotonic() - started > 300:
                raise SystemExit("the VM took more than 300 s")
            time.sleep(0.05)
        if "error=" in clean(console.read_text(errors="replace")):
            raise SystemExit("the demo init reported an error")
    finally:
        if stop:
            proc.kill()
        try:
            proc.wait(timeout=60)  # it powers itself off after the line
        except subprocess.TimeoutExpired:
            proc.kill()
    return seen


def prepare(env: dict[str, str]) -> str:
    """The home with the image and the machine; the image's name."""
    from lamina.demo.image import demo_image

    run(LAMINA, "init", env=env)  # the home: its identity, its migrated database
    if DEBIAN:
        print("building (or taking from the cache) the Debian image ...", flush=True)
        cache = CACHE / "images"
        run(LAMINA, "image", "build", "debian12", "--cache", str(cache), env=env)
        image = "debian12"
    else:
        run(LAMINA, "image", "import", "demo", str(demo_image(CACHE / "demo").path), env=env)
        image = "demo"
    run(LAMINA, "machine", "add", "desk-001", "--image", image, "--mac", MAC, "--mode",
        "stateful", env=env)  # fmt: skip
    return image


def main() -> None:
    need("qemu-system-x86_64", "mkfs.ext4")
    from lamina.demo.initramfs import BOOT_PREFIX
    from lamina.demo.pxe import HOST_FROM_GUEST, PxeVm
    from lamina.demo.vm import MEMORY_MIB, qemu_command

    work = scratch("netboot")
    env = {"LAMINA_HOME": str(work / "home")}
    image = prepare(env)
    nbd, http = free_port(), free_port()
    with open(work / "serve.log", "wb") as log:
        server = subprocess.Popen(
            [LAMINA, "serve", "--nbd", f"127.0.0.1:{nbd}", "--http", f"127.0.0.1:{http}"],
            env={**os.environ, **env}, stdout=log, stderr=log,
        )  # fmt: skip
    try:
        wait_port(nbd, server)
        wait_port(http, server)
        url = f"nbd://127.0.0.1:{nbd}/machine/desk-001"
        boot_line = r"^desk-001 login:" if DEBIAN else rf"^{re.escape(BOOT_PREFIX)}"
        script = rf"is desk-001, booting {image}@1"
        base = f"http://{HOST_FROM_GUEST}:{http}"
        memory = DEBIAN_MEMORY_MIB if DEBIAN else None

        def direct() -> dict[str, float]:
            command = qemu_command(url, f"{url}/seed", memory_mib=memory or MEMORY_MIB)
            return to_line(command, work, {"line": boot_line}, stop=DEBIAN)

        def pxe(firmware: str = "bios") -> dict[str, float]:
            vm = PxeVm(f"pxe-{firmware}", MAC, Path(tempfile.mkdtemp(dir=work)), base,
                       firmware=firmware, memory_mib=memory)  # fmt: skip
            return to_line(vm.command, work, {"script": script, "line": boot_line}, stop=DEBIAN)

        first_pxe = pxe()
        direct()
        print(f"warm-up  pxe {first_pxe['line']:.2f} s (kernel and initrd read out of the image)")
        directs, pxes, scripts = [], [], []
        for i in range(ROUNDS):
            d, p = direct()["line"], pxe()
            directs.append(d)
            pxes.append(p["line"])
            scripts.append(p["script"])
            print(
                f"round {i + 1}  direct {d:.2f} s  pxe {p['line']:.2f} s (script at {p['script']:.2f} s)"
            )
        if not DEBIAN:
            uefi = pxe("uefi")
            print(f"uefi     pxe {uefi['line']:.2f} s (script at {uefi['script']:.2f} s)")
    finally:
        server.terminate()
        server.wait(timeout=30)
    d, p = median(directs), median(pxes)
    print(f"median   direct {d:.2f} s  pxe {p:.2f} s  (pxe script at {median(scripts):.2f} s)")
    print(f"ratio pxe/direct={p / d:.2f}  ({len(retried)} boots tried again after an early panic)")


if __name__ == "__main__":
    sys.exit(main())
