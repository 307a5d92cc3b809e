"""Per-machine identity and its NoCloud seed disk.

model.py      the identity (Identity) and the ``machines`` row through the MachineRow Protocol:
              new_identity at ``machine add``, update_identity at ``machine set``,
              identity_columns / apply_identity / identity_from_machine
validate.py   checks of hostnames, domains, MAC addresses, networks
keys.py       SSH host keys, generated once per machine
seed.py       the NoCloud files: meta-data, user-data, network-config; and lamina/ (the
              identity one value a file, the agent's settings) for the guest kit
iso.py        the seed disk (ISO 9660, ``cidata``): seed_image(identity, agent) is the
              ``machine/NAME/seed`` export
"""

from __future__ import annotations

from lamina.identity.iso import build_seed_iso, read_seed_iso
from lamina.identity.model import (
    KEEP,
    Identity,
    MachineRow,
    apply_identity,
    identity_columns,
    identity_from_machine,
    new_identity,
    parse_extra_config,
    update_identity,
)
from lamina.identity.seed import SEED_LABEL, AgentSeed, instance_id, kit_files, seed_files
from lamina.identity.validate import static_network


def seed_image(identity: Identity, agent: AgentSeed | None = None) -> bytes:
    """The seed disk of ``identity``: same identity (and revision), same bytes."""
    return build_seed_iso(seed_files(identity, agent))


__all__ = [
    "KEEP",
    "SEED_LABEL",
    "AgentSeed",
    "Identity",
    "MachineRow",
    "apply_identity",
    "build_seed_iso",
    "identity_columns",
    "identity_from_machine",
    "instance_id",
    "kit_files",
    "new_identity",
    "parse_extra_config",
    "read_seed_iso",
    "seed_files",
    "seed_image",
    "static_network",
    "update_identity",
]
