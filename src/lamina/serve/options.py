"""What ``lamina serve`` is asked to do (``ServeOptions``), in a module of its own: the
NBD worker processes read it without importing the manager's application (26 MiB of
each worker's memory)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lamina import settings as config
from lamina.errors import UsageError
from lamina.nbd.limits import Limits

if TYPE_CHECKING:
    from lamina.manager.services.netboot import AutoAdd, NetbootSettings


@dataclass
class ServeOptions:
    nbd: tuple[str, int] | None  # None: manager only (a second manager on one database)
    http: tuple[str, int] | None
    workers: int | None = None  # NBD worker processes; None: one per core; 0: in this one
    io_threads: int = 8  # per serving process, for disk-bound work
    log_level: str = "info"
    tls: bool = False  # NBD requires STARTTLS and a client certificate; HTTP is HTTPS
    tls_names: tuple[str, ...] = ()  # more names for the server certificate
    https_cert: Path | None = None  # a certificate of one's own for HTTPS (else the CA's)
    https_key: Path | None = None
    boot_nbd: tuple[str, int] | None = None  # the NBD address written into boot scripts
    auto_add: AutoAdd | None = None  # a MAC that boots and is no machine becomes one
    boot_retry_seconds: int = 10  # how soon a machine that cannot boot yet asks again
    boot_http: tuple[str, int] | None = None  # network boot on a plain-HTTP port of its own
    boot_allow: tuple[str, ...] = ()  # networks network boot is served to (all when empty)
    server_name: str | None = None  # joins a cluster of block servers under this name
    advertise: str | None = None  # HOST:PORT its NBD clients dial (default: from ``nbd``)
    heartbeat: float = 5.0  # seconds between its heartbeats in the database
    limits: Limits | None = None  # what clients may cost (None: from the environment)

    @property
    def hosts(self) -> list[str]:
        return [a[0] for a in (self.nbd, self.http) if a is not None]

    @property
    def worker_count(self) -> int:
        return len(os.sched_getaffinity(0)) if self.workers is None else self.workers

    def netboot(self) -> NetbootSettings:
        """What network-booted machines are told: the NBD address they reach (the one
        given, the one served unless it is loopback or a wildcard, else the host they
        reached the HTTP port at, with the NBD port)."""
        from lamina.manager.services.netboot import NetbootSettings

        host, port = self.boot_nbd or self.nbd or (None, None)
        if self.boot_nbd is None and host is not None and _unspecific(host):
            host = None
        return NetbootSettings(
            nbd_host=host,
            nbd_port=port,
            tls=self.tls,
            auto_add=self.auto_add,
            retry_seconds=self.boot_retry_seconds,
            allow=tuple(_network(n) for n in self.boot_allow),
        )


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise UsageError(f"bad --boot-allow {text!r}: expected ADDRESS/PREFIX") from None


def _unspecific(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return address.is_loopback or address.is_unspecified


def serve_limits(options: ServeOptions | None) -> Limits:
    """What NBD clients may cost: the options' limits, else the environment's."""
    if options is not None and options.limits is not None:
        return options.limits
    return Limits(**config.load().nbd_limits())  # type: ignore[arg-type]
