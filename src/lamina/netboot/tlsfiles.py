"""A network-booted machine's TLS credential, as a second initrd (an uncompressed cpio the
kernel unpacks over the first): ``lamina/tls/`` with qemu's and nbd-client's file names.

    lamina/tls/ca-cert.pem       the home's CA (nbd-client checks the server against it)
    lamina/tls/client-cert.pem   a machine credential, valid for ``VALIDITY``
    lamina/tls/client-key.pem    its key (0600)

It is handed to whoever asks with the machine's MAC, over plain HTTP (the firmware can
check no certificate): the trust is the provisioning network's. What it still buys is
written in docs/netboot.md.
"""

from __future__ import annotations

import datetime as dt

from lamina.netboot import cpio

TLS_DIR = "lamina/tls"
CA = "ca-cert.pem"
CERT = "client-cert.pem"
KEY = "client-key.pem"
# Long enough for a slow boot to reach its NBD handshake; the TLS session then lasts as
# long as the connection, whatever the certificate's end.
VALIDITY = dt.timedelta(hours=1)


def archive(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> bytes:
    return cpio.archive(
        [
            cpio.directory("lamina"),
            cpio.directory(TLS_DIR, 0o700),
            cpio.file(f"{TLS_DIR}/{CA}", ca_pem),
            cpio.file(f"{TLS_DIR}/{CERT}", cert_pem),
            cpio.file(f"{TLS_DIR}/{KEY}", key_pem, 0o600),
        ]
    )
