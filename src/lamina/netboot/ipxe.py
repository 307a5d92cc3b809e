"""The iPXE scripts a network-booting machine runs, and its kernel command line (pure).

The firmware fetches ``/boot.ipxe`` (no token: it holds none), which chains a second,
per-MAC URL, ``/boot/${net0/mac}.ipxe`` (iPXE URL-encodes the colons: ``52%3a54%3a...``).
The manager answers that one with one of three scripts:

- a known machine: ``kernel`` and ``initrd`` of its pinned image version, with the
  command line that roots it on ``machine/NAME`` over NBD and attaches its seed;
- an unknown MAC: a message on the machine's screen, a pause, and the first URL again,
  so the machine boots by itself once an administrator adds it;
- an error the machine cannot fix (two machines with its MAC, an image without a
  kernel): the reason, a pause, and the first URL again.

The kernel command line, beside the image's own arguments:

    ip=dhcp BOOTIF=01-MAC                  bring up the interface that booted, by DHCP
    nbdroot=HOST:PORT/machine/NAME         Debian's initramfs-tools form (nbd-client's hook)
    root=/dev/nbd0pN nbd.max_part=16       the root partition of that disk
    lamina.seed=HOST:PORT/machine/NAME/seed   the identity seed, a second NBD disk
    lamina.tls=1                           both over TLS, with the credential in a second
                                           initrd (credential.cpio, issued for this boot)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ENTRY_PATH = "/boot.ipxe"
KERNEL = "vmlinuz"
INITRD = "initrd.img"
CREDENTIAL = "credential.cpio"  # a machine's TLS credential, a second initrd
RETRY_SECONDS = 10
# What an image's own kernel argument may contain to reach an iPXE ``kernel`` line
# unchanged: iPXE expands ``${...}`` and reads ``||``/``&&`` in a script line.
_SAFE_ARG = re.compile(r"^[A-Za-z0-9_.,:;=/+@%~^*!?<>\[\]{}-]+$")
# What the entry script reports of the machine (iPXE settings, URL-encoded by iPXE).
REPORTED = ("platform", "buildarch", "manufacturer", "product", "serial", "uuid")


@dataclass(frozen=True, slots=True)
class NbdTarget:
    """Where the machine's disks are, as the machine reaches them."""

    host: str
    port: int
    tls: bool = False

    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def hyphenated(mac: str) -> str:
    """52:54:00:12:34:56 -> 52-54-00-12-34-56 (BOOTIF's form, and safe in a URL path)."""
    return mac.replace(":", "-")


def safe_args(args: str) -> tuple[str, list[str]]:
    """The image's kernel arguments iPXE may carry as they are, and those left out."""
    kept: list[str] = []
    dropped: list[str] = []
    for word in args.split():
        (kept if _SAFE_ARG.match(word) and "${" not in word else dropped).append(word)
    return " ".join(kept), dropped


def kernel_args(
    image_args: str,
    *,
    machine: str,
    mac: str,
    root_partition: int,
    nbd: NbdTarget,
    initrds: tuple[str, ...] = (INITRD,),
) -> str:
    """The whole command line for a machine booted from the network."""
    root = f"/dev/nbd0p{root_partition}" if root_partition else "/dev/nbd0"
    export = f"machine/{machine}"
    words = [
        safe_args(image_args)[0],
        # the names iPXE gives the initrds, for the kernel's EFI stub to load
        *(f"initrd={name}" for name in initrds),
        "ip=dhcp",
        f"BOOTIF=01-{hyphenated(mac)}",
        f"nbdroot={nbd.address()}/{export}",
        f"root={root}",
        "nbd.max_part=16",
        f"lamina.seed={nbd.address()}/{export}/seed",
    ]
    if nbd.tls:
        words.append("lamina.tls=1")
    return " ".join(w for w in words if w)


def _lines(*lines: str) -> str:
    return "#!ipxe\n" + "\n".join(lines) + "\n"


def _echo(text: str) -> str:
    # iPXE reads ${...} in any line: what comes from the database must not reach it.
    return "echo " + text.replace("$", "")


def entry_script(base_url: str, retry: int = RETRY_SECONDS) -> str:
    """``/boot.ipxe``: identify the machine by its first interface's MAC, fetch its script."""
    query = "&".join(f"{name}=${{{name}}}" for name in REPORTED)
    return _lines(
        "# lamina network boot: this machine is known by the MAC of its first interface",
        f"chain --autofree --replace {base_url}/boot/${{net0/mac}}.ipxe?{query} || goto failed",
        ":failed",
        _echo(f"lamina: the boot script could not be fetched; again in {retry} s"),
        f"sleep {retry}",
        f"chain --autofree --replace {base_url}{ENTRY_PATH}",
    )


def boot_script(
    base_url: str,
    *,
    machine: str,
    mac: str,
    ref: str,
    files_path: str,
    args: str,
    initrds: tuple[str, ...] = (INITRD,),
    retry: int = RETRY_SECONDS,
) -> str:
    """A known machine: its version's kernel and initrd(s), and its command line."""
    return _lines(
        f"# lamina: {machine} ({mac}) boots {ref}",
        _echo(f"lamina: {mac} is {machine}, booting {ref}"),
        f"kernel {base_url}{files_path}/{KERNEL} {args} || goto failed",
        *(f"initrd {base_url}{files_path}/{name} || goto failed" for name in initrds),
        "boot || goto failed",
        ":failed",
        _echo(f"lamina: booting {machine} failed; again in {retry} s"),
        f"sleep {retry}",
        f"chain --autofree --replace {base_url}{ENTRY_PATH}",
    )


def wait_script(base_url: str, reason: list[str], retry: int = RETRY_SECONDS) -> str:
    """A machine that cannot boot yet: why (on its screen), a pause, and try again."""
    return _lines(
        "echo",
        *(_echo(f"lamina: {line}") for line in reason),
        _echo(f"lamina: asking again in {retry} s"),
        f"sleep {retry}",
        f"chain --autofree --replace {base_url}{ENTRY_PATH}",
    )


def unknown_reason(mac: str) -> list[str]:
    return [
        f"this machine (MAC {mac}) is not known to the manager.",
        "an administrator can add it with",
        f"  lamina machine add NAME --image IMAGE --mac {mac}",
    ]
