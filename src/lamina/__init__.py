"""lamina: one golden disk image and a set of application layers for a fleet of machines.

The public surface is small: the errors below. Subsystems live in subpackages, in layers
(``docs/architecture.md``; each imports only from those below it):

cli        the ``lamina`` command
guest      the guest kit, golden Debian images, users' layers in the running system
demo       ``lamina demo``: a VM booted from lamina
serve      the block server process: NBD exports, the manager's HTTP app, boot recording
agent      the guest agent: identity, layers at login, live attach, writable layers
manager    database, services, HTTP API and console
rebase     3-way rebase of writable layers onto patched bases
stream     the streaming endpoint (``lamina stream``)
netboot    network boot: boot files read from an image's ext4, iPXE scripts, dnsmasq
delta      machine deltas: the delta files, blobs, staged uploads, the machine's disk
layer      file-tree layers: import, capture, mount a composed root, live attach
image      block images: import, export, manifests, reads, boot-profile format
identity   machine identities and their NoCloud seeds
trust      the home's certificate authority and what a TLS client proves
home       a home: its folders, its store, its database (opened by whoever opens it)
store      the content-addressed chunk store
nbd        the NBD protocol (sans-I/O) and the block-device interface
names, locks, files, logs, control, errors, settings, units, _tuning   shared foundations
"""

from lamina.errors import (
    AlreadyExists,
    Conflict,
    CorruptObject,
    InvalidInput,
    LaminaError,
    LimitExceeded,
    NotAHome,
    NotFound,
    ProtocolError,
    Refused,
    StoreError,
    ToolError,
    Unconfirmed,
    Unreachable,
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
    "LimitExceeded",
    "NotAHome",
    "NotFound",
    "ProtocolError",
    "Refused",
    "StoreError",
    "ToolError",
    "Unconfirmed",
    "Unreachable",
    "UnsafeArchive",
    "UsageError",
    "__version__",
]
