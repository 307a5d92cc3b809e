"""Per-machine identity and its NoCloud seed disk.

new_identity(name, hostname=..., mac=...)      at ``machine add``
update_identity(identity, hostname=...)        at ``machine set`` (bumps identity_rev)
identity_columns / apply_identity / identity_from_machine   the ``machines`` row
seed_image(identity)                           bytes of the ``machine/NAME/seed`` export
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
from lamina.identity.seed import SEED_LABEL, instance_id, seed_files
from lamina.identity.validate import static_network


def seed_image(identity: Identity) -> bytes:
    """The seed disk of ``identity``: same identity (and revision), same bytes."""
    return build_seed_iso(seed_files(identity))


__all__ = [
    "KEEP",
    "SEED_LABEL",
    "Identity",
    "MachineRow",
    "apply_identity",
    "build_seed_iso",
    "identity_columns",
    "identity_from_machine",
    "instance_id",
    "new_identity",
    "parse_extra_config",
    "read_seed_iso",
    "seed_files",
    "seed_image",
    "static_network",
    "update_identity",
]
