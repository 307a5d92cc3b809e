"""What ``lamina serve`` is asked to do (``ServeOptions``), in a module of its own: the
NBD worker processes read it without importing the manager's application (26 MiB of
each worker's memory)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lamina import settings as config
from lamina.nbd.limits import Limits


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


def serve_limits(options: ServeOptions | None) -> Limits:
    """What NBD clients may cost: the options' limits, else the environment's."""
    if options is not None and options.limits is not None:
        return options.limits
    return Limits(**config.load().nbd_limits())  # type: ignore[arg-type]
