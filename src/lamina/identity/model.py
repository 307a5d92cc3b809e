"""A machine's identity: what makes it itself, kept in the database, not in the image.

Pure logic: generating, checking and changing identities, and mapping them to and from
the identity columns of the ``machines`` table. No I/O (key and id generation only reads
the OS random source).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import yaml

from lamina.errors import UsageError
from lamina.identity import validate
from lamina.identity.keys import HostKeys, check_host_keys, generate_host_keys
from lamina.identity.seed import check_extra_config


@dataclass(frozen=True)
class Identity:
    """Everything a machine's seed disk says about it.

    ``identity_rev`` starts at 1 and goes up by one on every change, so a seed can be
    cached by (machine, identity_rev) and cloud-init sees a new instance-id.
    """

    name: str
    hostname: str
    machine_id: str
    mac: str
    ssh_host_keys: HostKeys = field(hash=False, repr=False)
    domain: str | None = None
    network: dict[str, Any] | None = field(default=None, hash=False)
    extra_config: dict[str, Any] | None = field(default=None, hash=False)
    identity_rev: int = 1

    @property
    def fqdn(self) -> str:
        return f"{self.hostname}.{self.domain}" if self.domain else self.hostname


class _Keep(enum.Enum):
    KEEP = "keep"


KEEP = _Keep.KEEP
"""Leave this part of the identity as it is (``update_identity``)."""


def _default_hostname(name: str) -> str:
    try:
        return validate.check_hostname(name)
    except UsageError:
        raise UsageError(
            f"machine name {name!r} is not a valid hostname: give one with --hostname"
        ) from None


def new_identity(
    name: str,
    *,
    hostname: str | None = None,
    mac: str | None = None,
    domain: str | None = None,
    network: Mapping[str, Any] | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> Identity:
    """A fresh identity: new machine-id, new SSH host keys, a generated MAC unless given.

    The hostname defaults to the machine name (which must then be a valid hostname).
    """
    h = validate.check_hostname(hostname) if hostname is not None else _default_hostname(name)
    d = validate.check_domain(domain) if domain else None
    validate.check_fqdn(h, d)
    return Identity(
        name=name,
        hostname=h,
        machine_id=validate.generate_machine_id(),
        mac=validate.check_mac(mac) if mac is not None else validate.generate_mac(),
        ssh_host_keys=generate_host_keys(),
        domain=d,
        network=validate.check_network(network) if network else None,
        extra_config=check_extra_config(extra_config) if extra_config else None,
    )


def update_identity(
    identity: Identity,
    *,
    hostname: str | _Keep | None = KEEP,
    domain: str | _Keep | None = KEEP,
    mac: str | _Keep | None = KEEP,
    network: Mapping[str, Any] | _Keep | None = KEEP,
    extra_config: Mapping[str, Any] | _Keep | None = KEEP,
    new_machine_id: bool = False,
    new_host_keys: bool = False,
) -> Identity:
    """The identity with the given parts changed and ``identity_rev`` bumped once.

    ``None`` (or empty) clears the domain, network settings or extra config, gives the hostname back
    its default (the machine name) and generates a new MAC. When nothing actually changes,
    the same identity (same revision) comes back, so the seed stays cached.
    """
    changes: dict[str, Any] = {}
    if hostname is not KEEP:
        changes["hostname"] = (
            validate.check_hostname(hostname) if hostname else _default_hostname(identity.name)
        )
    if domain is not KEEP:
        changes["domain"] = validate.check_domain(domain) if domain else None
    if mac is not KEEP:
        changes["mac"] = validate.check_mac(mac) if mac else validate.generate_mac()
    if network is not KEEP:
        changes["network"] = validate.check_network(network) if network else None
    if extra_config is not KEEP:
        changes["extra_config"] = check_extra_config(extra_config) if extra_config else None
    if new_machine_id:
        changes["machine_id"] = validate.generate_machine_id()
    if new_host_keys:
        changes["ssh_host_keys"] = generate_host_keys()
    changes = {k: v for k, v in changes.items() if getattr(identity, k) != v}
    if not changes:
        return identity
    updated = replace(identity, **changes, identity_rev=identity.identity_rev + 1)
    validate.check_fqdn(updated.hostname, updated.domain)
    return updated


def parse_extra_config(text: str) -> dict[str, Any]:
    """Extra cloud-config given as YAML (or JSON) text, e.g. from ``--config FILE``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"extra config is not valid YAML: {e}".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError("extra config must be a YAML mapping (#cloud-config keys)")
    return check_extra_config(data)


class MachineRow(Protocol):
    """The identity columns of a ``machines`` row (``lamina.manager.models.Machine``)."""

    name: str
    hostname: str
    domain: str | None
    machine_id: str
    mac: str
    ssh_host_keys: str
    network: str | None
    extra_config: str | None
    identity_rev: int


def identity_columns(identity: Identity) -> dict[str, Any]:
    """The ``machines`` columns holding ``identity``, for ``Machine(**columns)`` or updates."""
    return {
        "hostname": identity.hostname,
        "domain": identity.domain,
        "machine_id": identity.machine_id,
        "mac": identity.mac,
        "ssh_host_keys": json.dumps(identity.ssh_host_keys, sort_keys=True),
        "network": json.dumps(identity.network, sort_keys=True) if identity.network else None,
        "extra_config": (
            "#cloud-config\n" + yaml.safe_dump(identity.extra_config, sort_keys=True)
            if identity.extra_config
            else None
        ),
        "identity_rev": identity.identity_rev,
    }


def apply_identity(row: MachineRow, identity: Identity) -> None:
    """Write ``identity`` into a machine row (inside the caller's session)."""
    for column, value in identity_columns(identity).items():
        setattr(row, column, value)


def identity_from_machine(row: MachineRow) -> Identity:
    """The identity a machine row holds."""
    network = json.loads(row.network) if row.network else None
    return Identity(
        name=row.name,
        hostname=row.hostname,
        machine_id=row.machine_id,
        mac=row.mac,
        ssh_host_keys=check_host_keys(json.loads(row.ssh_host_keys or "{}")),
        domain=row.domain,
        network=network,
        extra_config=parse_extra_config(row.extra_config) if row.extra_config else None,
        identity_rev=row.identity_rev or 1,
    )
