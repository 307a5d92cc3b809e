"""SSH host keys, generated once per machine and kept in the database.

A stateless machine gets the same host keys on every boot (its clients' known_hosts stay
valid) because they come from the seed, not from the image or a first-boot script.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from lamina.errors import UsageError

# cloud-init's ssh_keys names: <type>_private / <type>_public.
KEY_TYPES = ("ed25519", "ecdsa")

HostKeys = dict[str, dict[str, str]]


def _openssh(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> dict[str, str]:
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return {"private": private, "public": public}


def generate_host_keys() -> HostKeys:
    """One ed25519 and one ECDSA P-256 key: what OpenSSH offers first, both fast to make."""
    return {
        "ed25519": _openssh(ed25519.Ed25519PrivateKey.generate()),
        "ecdsa": _openssh(ec.generate_private_key(ec.SECP256R1())),
    }


_PUBLIC_PREFIX = {"ed25519": "ssh-ed25519 ", "ecdsa": "ecdsa-sha2-nistp256 ", "rsa": "ssh-rsa "}


def check_host_keys(keys: Mapping[str, Mapping[str, str]]) -> HostKeys:
    """Host keys as stored: each type with an OpenSSH private key and its public line."""
    checked: HostKeys = {}
    for kind, pair in keys.items():
        prefix = _PUBLIC_PREFIX.get(kind)
        if prefix is None:
            raise UsageError(
                f"unknown SSH host key type {kind!r} (one of {', '.join(_PUBLIC_PREFIX)})"
            )
        private, public = pair.get("private", ""), pair.get("public", "")
        if "-----BEGIN OPENSSH PRIVATE KEY-----" not in private or not public.startswith(prefix):
            raise UsageError(
                f"bad {kind} SSH host key: expected an OpenSSH private key and its public line"
            )
        checked[kind] = {"private": private, "public": public.strip()}
    return checked


def fingerprint(public: str) -> str:
    """The SHA256 fingerprint ssh-keygen -l prints, for ``machine show``."""
    blob = base64.b64decode(public.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"
