"""TLS for ``lamina serve``: when it is on, the server certificate, and the NBD and HTTPS
settings built from them (the rules of who opens what are in ``serve.access``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lamina import logs
from lamina.errors import UsageError
from lamina.nbd.aio import ServerTls
from lamina.trust.addresses import is_loopback

if TYPE_CHECKING:
    from lamina.home import Home
    from lamina.serve.catalog import ExportCatalog
    from lamina.serve.options import ServeOptions


def want_tls(hosts: list[str], *, tls: bool, insecure: bool, https_cert: bool = False) -> bool:
    """TLS with ``--tls``; without, on any bind address that is not loopback, unless
    ``--insecure`` says otherwise."""
    if tls and insecure:
        raise UsageError("--tls and --insecure contradict each other")
    on = tls or (not insecure and not all(is_loopback(h) for h in hosts))
    if https_cert and not on:
        raise UsageError("--https-cert needs TLS (--tls, or an address that is not loopback)")
    return on


@dataclass(frozen=True)
class ServeTls:
    nbd: ServerTls | None  # None where no NBD is served (the parent of NBD workers)
    http_cert: Path
    http_key: Path


def tls_setup(
    home: Home, options: ServeOptions, catalog: ExportCatalog | None, *, issue: bool = True
) -> ServeTls:
    """The server certificate for every address served (issued or renewed now, once per
    server) and what NBD (over ``catalog``) and HTTPS use. ``issue=False``: an NBD worker
    process, after its parent issued it: the files are loaded as they are, without the
    X.509 code (about 8 MiB of a worker's resident set)."""
    from lamina.serve import access
    from lamina.trust.contexts import server_context
    from lamina.trust.files import CA_CERT, SERVER_CERT, SERVER_KEY

    if (options.https_cert is None) != (options.https_key is None):
        raise UsageError("--https-cert and --https-key go together")
    if issue:
        cert, key = _issue(home, options)
    else:
        cert, key = home.tls_dir / SERVER_CERT, home.tls_dir / SERVER_KEY
    context = server_context(cert, key, home.tls_dir / CA_CERT)
    nbd = (
        ServerTls(context, lambda der: access.for_peer(catalog, der))
        if catalog is not None
        else None
    )
    return ServeTls(nbd, options.https_cert or cert, options.https_key or key)


def _issue(home: Home, options: ServeOptions) -> tuple[Path, Path]:
    from lamina.locks import locked
    from lamina.manager.services import cluster_ca
    from lamina.trust.addresses import server_names

    authority = cluster_ca.authority(home)  # the one CA of a cluster's folders
    # machines booted from the network check the certificate against --boot-nbd's host
    extra = (options.boot_nbd[0],) if options.boot_nbd else ()
    names = server_names(options.hosts, (*options.tls_names, *extra))
    with locked(home.tls_dir / "lock"):  # managers of one home starting at once
        return authority.server_certificate(names)


def warn_if_exposed(log: logging.Logger, hosts: list[str]) -> None:
    exposed = [h for h in hosts if not is_loopback(h)]
    if exposed:
        logs.event(
            log,
            "insecure",
            logging.WARNING,
            listen=exposed,
            message="TLS is off (--insecure): any client that reaches these addresses"
            " reads and writes every machine's disk and seed, and sees tokens in clear",
        )
