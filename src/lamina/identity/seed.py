"""The NoCloud seed of a machine: meta-data, user-data and network-config, as bytes.

Pure rendering: an ``Identity`` in, three YAML files out, the same bytes every time for
the same identity. This is the format stock cloud-init (Linux) and cloudbase-init
(Windows) read from a disk labelled ``cidata``, so images need no lamina agent.

Beside them, a ``lamina/`` directory holds the same identity as plain files (hostname,
machine-id, SSH host keys) for the guest kit's initramfs hook, which writes them into the
root before systemd starts, and, when the manager's URL and the machine's agent token are
known, ``lamina/agent.env`` for the agent (see ``lamina.guest``). cloud-init reads only
its own three names and ignores the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from lamina.errors import UsageError

if TYPE_CHECKING:
    from lamina.identity.model import Identity

SEED_LABEL = "cidata"
SEED_FILES = ("meta-data", "user-data", "network-config")
MACHINE_ID_PATH = "/etc/machine-id"
KIT_DIR = "lamina"  # the guest kit's files on the seed
AGENT_CA = "/etc/lamina/ca-cert.pem"  # where the kit puts the manager's CA in the machine

# What the identity decides; extra config may not override it (use the identity's fields).
RESERVED_KEYS = frozenset(
    {
        "hostname",
        "fqdn",
        "prefer_fqdn_over_hostname",
        "preserve_hostname",
        "ssh_keys",
        "ssh_deletekeys",
        "ssh_genkeytypes",
    }
)


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so PEM keys read as they do in a key file."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def _yaml(data: Mapping[str, Any], header: str = "") -> bytes:
    text = yaml.dump(dict(data), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
    return (header + text).encode()


def check_extra_config(extra: Mapping[str, Any]) -> dict[str, Any]:
    """Extra cloud-config keys, merged into user-data; identity keys are refused."""
    if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
        raise UsageError("extra config must be a mapping of cloud-config keys")
    taken = sorted(RESERVED_KEYS & set(extra))
    if taken:
        raise UsageError(
            f"extra config cannot set {', '.join(taken)}: the machine's identity sets it "
            "(use machine set --hostname/--domain)"
        )
    files = extra.get("write_files", [])
    if not isinstance(files, list) or not all(isinstance(f, Mapping) for f in files):
        raise UsageError("extra config write_files must be a list of mappings")
    if any(f.get("path") == MACHINE_ID_PATH for f in files):
        raise UsageError(f"extra config cannot write {MACHINE_ID_PATH}: the identity sets it")
    try:
        yaml.safe_dump(dict(extra))
    except yaml.YAMLError as e:
        raise UsageError(f"extra config cannot be written as YAML: {e}") from None
    return dict(extra)


def instance_id(identity: Identity) -> str:
    """Unique per machine (its machine-id) and per identity revision.

    A new instance-id makes cloud-init run its per-instance modules again, which is what
    applies a changed hostname or new keys on a stateful machine's next boot.
    """
    return f"lamina-{identity.machine_id}-{identity.identity_rev}"


def meta_data(identity: Identity) -> dict[str, Any]:
    return {"instance-id": instance_id(identity), "local-hostname": identity.hostname}


def user_data(identity: Identity) -> dict[str, Any]:
    config: dict[str, Any] = {"hostname": identity.hostname}
    if identity.domain:
        # Debian's convention: the short name in /etc/hostname, the FQDN in /etc/hosts.
        config |= {
            "fqdn": identity.fqdn,
            "prefer_fqdn_over_hostname": False,
            "manage_etc_hosts": True,
        }
    config["preserve_hostname"] = False
    keys: dict[str, str] = {}
    for kind, pair in sorted(identity.ssh_host_keys.items()):
        keys[f"{kind}_private"] = pair["private"]
        keys[f"{kind}_public"] = pair["public"]
    # Only the database's keys. No ssh_genkeytypes: cloud-init generates keys only when
    # ssh_keys is absent (cc_ssh in 22.4 and later), and its schema refuses an empty list
    # (minItems 1: "Invalid cloud-config provided" at every boot on Debian 12).
    config |= {"ssh_deletekeys": True, "ssh_keys": keys}
    # cloud-init has no machine-id key; writing the file is the standard way (the golden
    # image ships an empty /etc/machine-id, so systemd keeps this one from then on).
    machine_id_file = {
        "path": MACHINE_ID_PATH,
        "content": identity.machine_id + "\n",
        "owner": "root:root",
        "permissions": "0444",
    }
    extra = dict(identity.extra_config or {})
    config["write_files"] = [machine_id_file, *extra.pop("write_files", [])]
    return config | extra


def network_config(identity: Identity) -> dict[str, Any]:
    """network-config v2: the NIC with the machine's MAC, DHCP unless settings are given."""
    settings = dict(identity.network) if identity.network else {"dhcp4": True}
    nic = {"match": {"macaddress": identity.mac}, **settings}
    return {"version": 2, "ethernets": {"primary": nic}}


@dataclass(frozen=True, slots=True)
class AgentSeed:
    """What the machine's agent needs to start by itself: where the manager is, and the
    machine's token (root-only once in the guest)."""

    manager_url: str
    token: str = field(repr=False)
    ca: bytes | None = field(default=None, repr=False)  # PEM, for an https:// manager


def _env_value(value: str) -> str:
    """A value for a systemd EnvironmentFile / POSIX shell assignment, single-quoted."""
    if "\n" in value or "'" in value:
        raise UsageError(f"cannot put {value!r} in an environment file")
    return f"'{value}'"


def kit_files(identity: Identity, agent: AgentSeed | None = None) -> dict[str, bytes]:
    """The ``lamina/`` files: one value per file, so a shell without a YAML parser (the
    initramfs) copies them as they are."""
    files = {
        f"{KIT_DIR}/hostname": f"{identity.hostname}\n".encode(),
        f"{KIT_DIR}/machine-id": f"{identity.machine_id}\n".encode(),
    }
    for kind, pair in sorted(identity.ssh_host_keys.items()):
        files[f"{KIT_DIR}/ssh_host_{kind}_key"] = pair["private"].encode()
        files[f"{KIT_DIR}/ssh_host_{kind}_key.pub"] = f"{pair['public']}\n".encode()
    if identity.domain:
        files[f"{KIT_DIR}/fqdn"] = f"{identity.fqdn}\n".encode()
    if agent is not None:
        env = (
            f"LAMINA_MANAGER={_env_value(agent.manager_url)}\n"
            f"LAMINA_TOKEN={_env_value(agent.token)}\n"
            f"LAMINA_MACHINE={_env_value(identity.name)}\n"
        )
        if agent.ca is not None:
            env += f"LAMINA_CA={_env_value(AGENT_CA)}\n"
            files[f"{KIT_DIR}/ca-cert.pem"] = agent.ca
        files[f"{KIT_DIR}/agent.env"] = env.encode()
    return files


def seed_files(identity: Identity, agent: AgentSeed | None = None) -> dict[str, bytes]:
    """The seed disk's files, by path (``lamina/...`` in a directory)."""
    return {
        "meta-data": _yaml(meta_data(identity)),
        "user-data": _yaml(user_data(identity), header="#cloud-config\n"),
        "network-config": _yaml(network_config(identity)),
        **kit_files(identity, agent),
    }
