"""Machines: add, show, change, re-pin, remove; their deltas live under the home."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from lamina.errors import AlreadyExists, NotFound, UsageError
from lamina.manager.models import ImageVersion, Machine
from lamina.manager.services import images
from lamina.names import Ref, check_name, parse_ref

if TYPE_CHECKING:
    from lamina.home import Home
    from lamina.identity import AgentSeed, Identity

MODES = ("stateless", "stateful")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def derive_token(key: str, name: str, machine_id: str) -> str:
    """A machine's agent token: HMAC-SHA256 of its name and machine-id under the
    installation's token key, so the seed disk can hand it to the machine while only its
    hash sits in the machine's row. A new machine-id gives a new token."""
    mac = hmac.new(key.encode(), f"lamina agent token\0{name}\0{machine_id}".encode(), "sha256")
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


def seed_token(session: Session, machine: Machine) -> str | None:
    """The token a machine's seed carries: the derived one while it is the machine's
    token (None for a token made otherwise, which cannot be recovered from its hash)."""
    from lamina.manager.services import settings

    token = derive_token(
        settings.secret(session, settings.TOKEN_KEY), machine.name, machine.machine_id
    )
    return token if hmac.compare_digest(hash_token(token), machine.token_hash) else None


@dataclass(frozen=True, slots=True)
class Added:
    machine: Machine
    token: str  # shown once; only its hash is stored


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UsageError(f"mode must be stateless or stateful, not {mode!r}")
    return mode


def add(
    session: Session,
    *,
    name: str,
    image: str,
    mode: str = "stateless",
    hostname: str | None = None,
    mac: str | None = None,
    domain: str | None = None,
) -> Added:
    """Create a machine pinned to ``image`` (NAME for its latest version, or NAME@V)."""
    from lamina.identity import identity_columns, new_identity

    check_name(name, "machine name")
    version = images.get_version(session, parse_ref(image, "image name"))
    from lamina.manager.services import settings

    identity = new_identity(name, hostname=hostname, mac=mac, domain=domain)
    key = settings.secret(session, settings.TOKEN_KEY)
    token = derive_token(key, name, identity.machine_id)
    machine = Machine(
        name=name,
        image_version=version,
        mode=_check_mode(mode),
        token_hash=hash_token(token),
        **identity_columns(identity),
    )
    session.add(machine)
    try:
        session.flush()
    except IntegrityError:
        raise AlreadyExists(f"a machine named {name!r} already exists") from None
    return Added(machine, token)


def seed_of(
    session: Session, machine: Machine, home: Home | None = None
) -> tuple[Identity, AgentSeed | None]:
    """What the machine's seed disk is made of: its identity, and the agent's settings
    once the manager's URL for machines is known (``serve --agent-url``), with the home's
    CA certificate for an https:// URL."""
    from lamina.identity import AgentSeed, identity_from_machine
    from lamina.manager.services import settings
    from lamina.trust.authority import CA_CERT

    identity = identity_from_machine(machine)
    url = settings.get(session, settings.AGENT_URL)
    token = seed_token(session, machine) if url else None
    if not url or not token:
        return identity, None
    ca = home.tls_dir / CA_CERT if home is not None else None
    pem = ca.read_bytes() if url.startswith("https:") and ca is not None and ca.exists() else None
    return identity, AgentSeed(url, token, pem)


def get(session: Session, name: str) -> Machine:
    machine = session.scalars(
        select(Machine).where(Machine.name == name).options(joinedload(Machine.image_version))
    ).one_or_none()
    if machine is None:
        raise NotFound(f"no machine named {name!r}")
    return machine


def by_token(session: Session, token: str) -> Machine | None:
    return session.scalars(
        select(Machine).where(Machine.token_hash == hash_token(token))
    ).one_or_none()


def list_all(session: Session) -> list[Machine]:
    query = select(Machine).options(
        joinedload(Machine.image_version).joinedload(ImageVersion.image)
    )
    return list(session.scalars(query.order_by(Machine.name)))


def remove(session: Session, *, name: str) -> Machine:
    machine = get(session, name)
    session.delete(machine)
    return machine


def repin(session: Session, *, name: str, image: Ref, home: Home) -> tuple[Machine, ImageVersion]:
    """Pin a machine to another image version. Its delta was written on the old version, so
    it goes too, with the uploads staged for it - but only once the target is known to
    exist and differ, under the delta's lock (refused while the machine is connected),
    right after the change is flushed."""
    from lamina.delta import file as delta
    from lamina.delta import uploads

    machine = get(session, name)
    version = images.get_version(session, image)
    if version.id == machine.image_version_id:
        raise UsageError(f"{name} already runs {version.ref}")
    with delta.exclusive(home.deltas_dir / name):
        pin(session, machine=machine, version=version)
        delta.remove_files(home.deltas_dir / name)
    uploads.forget(home, name)
    return machine, version


def pin(session: Session, *, machine: Machine, version: ImageVersion) -> None:
    """Point a machine at a version whose content equals its current view (after a delta
    commit): the caller deals with the delta."""
    machine.image_version = version
    session.flush()


def set_mode(session: Session, *, name: str, mode: str, home: Home) -> Machine:
    """Change the mode; a machine turned stateless keeps no delta, so the uploads staged
    for its delta go."""
    from lamina.delta import uploads

    machine = get(session, name)
    machine.mode = _check_mode(mode)
    if machine.mode == "stateless":
        uploads.forget(home, name)
    return machine


def set_identity(
    session: Session,
    *,
    name: str,
    changes: dict[str, Any],
    new_machine_id: bool = False,
    new_host_keys: bool = False,
) -> Machine:
    """Change identity fields (hostname, domain, mac, network, extra_config); the identity
    revision goes up when anything changed, which rebuilds the seed disk. A new machine-id
    gives the machine a new agent token (its seed carries it at the next boot)."""
    from lamina.identity import apply_identity, identity_from_machine
    from lamina.identity.model import update_identity
    from lamina.manager.services import settings

    machine = get(session, name)
    current = identity_from_machine(machine)
    updated = update_identity(
        current, **changes, new_machine_id=new_machine_id, new_host_keys=new_host_keys
    )
    if updated is not current:
        derived = seed_token(session, machine) is not None
        apply_identity(machine, updated)
        if derived and updated.machine_id != current.machine_id:
            key = settings.secret(session, settings.TOKEN_KEY)
            machine.token_hash = hash_token(derive_token(key, name, updated.machine_id))
    return machine
