"""lamina: one golden disk image and a set of application layers for a fleet of machines.

The public surface is small; subsystems live in subpackages (store, image, nbd, serve,
stream, layer, rebase, identity, manager, agent) and the CLI in ``lamina.cli``.
"""

from lamina.errors import (
    AlreadyExists,
    Conflict,
    CorruptObject,
    InvalidInput,
    LaminaError,
    NotFound,
    ProtocolError,
    StoreError,
    ToolError,
    UnsafeArchive,
    UsageError,
)

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists",
    "Conflict",
    "CorruptObject",
    "InvalidInput",
    "LaminaError",
    "NotFound",
    "ProtocolError",
    "StoreError",
    "ToolError",
    "UnsafeArchive",
    "UsageError",
    "__version__",
]
