"""TLS contexts: the server's (NBD and HTTPS) and the one every lamina HTTP client uses to
check the manager (httpx and http.client both take an ``ssl.SSLContext``)."""

from __future__ import annotations

import ssl
from pathlib import Path

from lamina.errors import UsageError
from lamina.trust.files import CA_CERT


def server_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """TLS 1.2 or later (the NBD spec's floor). With ``client_ca`` a client may show a
    certificate, which must then chain to it and be in date (OpenSSL checks both during
    the handshake); one without a certificate gets through the handshake and is told by
    the protocol that it may open nothing, which reads better than a TLS alert."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def ca_file(ca: Path | None) -> Path | None:
    """The CA certificate named by ``--ca`` (a file, or a credentials folder holding
    ``ca-cert.pem``), else by ``$LAMINA_CA``; None for the system's trust store."""
    if ca is None:
        from lamina.settings import load

        ca = load().ca
    if ca is None:
        return None
    path = ca / CA_CERT if ca.is_dir() else ca
    if not path.is_file():
        raise UsageError(
            f"--ca {ca}: no CA certificate there (a PEM file or a folder with {CA_CERT})"
        )
    return path


def client_context(ca: Path | None = None) -> ssl.SSLContext:
    """How lamina's HTTP clients check an ``https://`` manager: against the given CA
    (``--ca``, ``$LAMINA_CA``) or the system's trust store; the host name always."""
    path = ca_file(ca)
    try:
        return ssl.create_default_context(cafile=str(path) if path else None)
    except ssl.SSLError as exc:
        raise UsageError(f"--ca {path}: not a PEM certificate ({exc.reason})") from None
