"""The file names of the CA and of the credentials it issues (qemu's names for a client's
``tls-creds-x509`` folder), apart from the CA's code: a serving process that only loads a
certificate the CA already wrote needs the names, not the X.509 library."""

from __future__ import annotations

from typing import Final

CA_CERT: Final = "ca-cert.pem"
CA_KEY: Final = "ca-key.pem"
SERVER_CERT: Final = "server-cert.pem"
SERVER_KEY: Final = "server-key.pem"
CLIENT_CERT: Final = "client-cert.pem"
CLIENT_KEY: Final = "client-key.pem"
