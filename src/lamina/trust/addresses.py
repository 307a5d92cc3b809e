"""The names a server answers on, for its certificate's subjectAltName.

A client checks the server's certificate against the host it connected to (qemu, libnbd
and httpx all do, IP addresses included), so the certificate must name every address
the server listens on; a wildcard bind (0.0.0.0, ::) listens on every address the host
has, so each is named, with the host's names and loopback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import subprocess
from collections.abc import Iterable

WILDCARDS = frozenset({"", "0.0.0.0", "::"})
LOOPBACK = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_addresses() -> list[str]:
    """Every address of this host's interfaces (``ip -json address``), loopback first."""
    found: list[str] = list(LOOPBACK[1:])
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        proc = subprocess.run(
            ["ip", "-json", "address", "show"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        for link in json.loads(proc.stdout or "[]"):
            for addr in link.get("addr_info", []):
                local = str(addr.get("local", ""))
                if local and addr.get("scope") != "link":  # fe80::/10 needs a zone to use
                    found.append(local)
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.append(str(info[4][0]))
    return list(dict.fromkeys(found))


def host_names() -> list[str]:
    names = [socket.gethostname(), socket.getfqdn(), "localhost"]
    return list(dict.fromkeys(n for n in names if n))


def server_names(binds: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    """What the server certificate names: the bound addresses (every address of the host
    for a wildcard bind), the host's names, loopback, and ``extra`` (``--tls-name``)."""
    names: list[str] = []
    for host in binds:
        names += host_addresses() if host in WILDCARDS else [host]
    names += list(extra) + host_names() + list(LOOPBACK)
    return list(dict.fromkeys(names))
