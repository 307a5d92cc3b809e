"""Machines: add, show, change (identity, mode, re-pin), reset, remove.

Each operation holds every rule it obeys, whoever calls it (the CLI on a home or through
``--manager``, the API, the console):

- a MAC address or a hostname (FQDN) belongs to one machine: a second is refused;
- a stateful machine's delta is its data: re-pinning, resetting, making stateless or
  removing a machine whose delta holds blocks is refused (``Unconfirmed``, saying how much
  would go) unless ``force``;
- a delta is only touched under its lock: an operation that would drop it is refused
  (``Conflict``) while the machine has its disk open.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from lamina.errors import AlreadyExists, NotFound, Unconfirmed, UsageError
from lamina.manager.models import ImageVersion, Machine
from lamina.manager.services import audit, images, servers
from lamina.names import check_name, parse_ref
from lamina.units import human_bytes

if TYPE_CHECKING:
    from lamina.home import Home
    from lamina.identity import AgentSeed, Identity
    from lamina.manager.schemas import MachineUpdate

MODES = ("stateless", "stateful")
STATEFUL = "stateful"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def derive_token(key: str, name: str, machine_id: str, rotation: int = 0) -> str:
    """A machine's agent token: HMAC-SHA256 of its name, machine-id and rotation count
    under the installation's token key, so the seed disk can hand it to the machine while
    only its hash sits in the machine's row. A new machine-id, or a rotation, gives a new
    token."""
    text = f"lamina agent token\0{name}\0{machine_id}" + (f"\0{rotation}" if rotation else "")
    mac = hmac.new(key.encode(), text.encode(), "sha256")
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


def _rotation_key(machine_id: str) -> str:
    # (a setting, not a column: the times a machine's token was rotated, by machine-id)
    return f"agent_token_rotation/{machine_id}"


def seed_token(session: Session, machine: Machine) -> str | None:
    """The token a machine's seed carries: the derived one while it is the machine's
    token (None for a token made otherwise, which cannot be recovered from its hash)."""
    from lamina.manager.services import settings

    rotation = int(settings.get(session, _rotation_key(machine.machine_id)) or 0)
    token = derive_token(
        settings.secret(session, settings.TOKEN_KEY), machine.name, machine.machine_id, rotation
    )
    return token if hmac.compare_digest(hash_token(token), machine.token_hash) else None


def rotate_token(session: Session, *, name: str) -> str:
    """A new agent token for machine ``name``: its old one is refused from now on, and its
    seed disk carries the new one from its next boot."""
    from lamina.manager.services import settings

    machine = get(session, name)
    key = _rotation_key(machine.machine_id)
    rotation = int(settings.get(session, key) or 0) + 1
    settings.put(session, key, str(rotation))
    token = derive_token(
        settings.secret(session, settings.TOKEN_KEY), name, machine.machine_id, rotation
    )
    machine.token_hash = hash_token(token)
    audit.record(session, "machine.token", name)
    return token


@dataclass(frozen=True, slots=True)
class Added:
    machine: Machine
    token: str  # shown once; only its hash is stored


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UsageError(f"mode must be stateless or stateful, not {mode!r}")
    return mode


def _check_unique(session: Session, *, machine_id: int | None, mac: str, fqdn: str) -> None:
    """A MAC or an FQDN held by another machine is refused: network boot finds a machine
    by its MAC, and two machines with one hostname answer for each other."""
    others = select(Machine).where(Machine.id != machine_id) if machine_id else select(Machine)
    same_mac = session.scalars(others.where(Machine.mac == mac).limit(1)).first()
    if same_mac is not None:
        raise AlreadyExists(f"MAC address {mac} belongs to machine {same_mac.name}")
    hostname, _, domain = fqdn.partition(".")  # both lower case (lamina.identity.validate)
    query = others.where(Machine.hostname == hostname)
    query = query.where(Machine.domain == domain if domain else Machine.domain.is_(None))
    same_name = session.scalars(query.limit(1)).first()
    if same_name is not None:
        raise AlreadyExists(f"hostname {fqdn} belongs to machine {same_name.name}")


def add(
    session: Session,
    *,
    name: str,
    image: str,
    mode: str = "stateless",
    hostname: str | None = None,
    mac: str | None = None,
    domain: str | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Added:
    """Create a machine pinned to ``image`` (NAME for its latest version, or NAME@V), its
    first identity revision holding ``extra_config`` (#cloud-config keys) if given."""
    from lamina.identity import identity_columns, new_identity

    check_name(name, "machine name")
    version = images.get_version(session, parse_ref(image, "image name"))
    from lamina.manager.services import settings

    identity = new_identity(
        name, hostname=hostname, mac=mac, domain=domain, extra_config=extra_config or None
    )
    if session.scalar(select(Machine.id).where(Machine.name == name)) is not None:
        raise AlreadyExists(f"a machine named {name!r} already exists")
    _check_unique(session, machine_id=None, mac=identity.mac, fqdn=identity.fqdn)
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
    servers.assign(session, machine)  # the least loaded block server, in a cluster
    audit.record(session, "machine.add", name, image=version.ref, mode=machine.mode)
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


def pin(session: Session, *, machine: Machine, version: ImageVersion) -> None:
    """Point a machine at a version whose content equals its current view (after a delta
    commit): the caller deals with the delta."""
    machine.image_version = version
    session.flush()


# -- what touches the delta -------------------------------------------------------------------


def delta_blocks(home: Home, name: str) -> int:
    """Blocks a machine's delta holds on this home."""
    return _held_blocks(home, name)


def _held_blocks(home: Home, name: str) -> int:
    from lamina.delta.file import delta_usage

    return delta_usage(home.deltas_dir / name)[0]


def _refuse_losing(machine: Machine, blocks: int, what: str, *, force: bool) -> None:
    """A stateful machine's delta with data in it goes only when the change is confirmed."""
    from lamina.delta.file import BLOCK

    if machine.mode == STATEFUL and blocks and not force:
        raise Unconfirmed(
            f"{machine.name} is stateful and its delta holds {human_bytes(blocks * BLOCK)} "
            f"that {what} would discard: commit it first (delta commit {machine.name}) "
            f"or confirm (--force)"
        )


@contextmanager
def _delta_locked(home: Home, name: str) -> Iterator[None]:
    """The machine's delta lock, held (Conflict while its disk is open elsewhere)."""
    from lamina.delta import file as delta

    with delta.exclusive(home.deltas_dir / name):
        yield


def _drop_delta(home: Home, name: str) -> int:
    """Delete the delta's files (with its lock held) and the uploads staged for it;
    returns the bytes its data file held."""
    from lamina.delta import file as delta
    from lamina.delta import uploads

    directory = home.deltas_dir / name
    stored = delta.delta_usage(directory)[1]
    delta.remove_files(directory)
    uploads.forget(home, name)
    return stored


def reset(home: Home, *, name: str, force: bool = False) -> int:
    """Discard a machine's delta (it boots its pristine image version again); returns the
    bytes freed. A stateful machine's data needs ``force``."""
    with home.session(read_only=True) as session:
        machine = get(session, name)
        with _delta_locked(home, name):
            _refuse_losing(machine, _held_blocks(home, name), "a reset", force=force)
            freed = _drop_delta(home, name)
    with home.session() as session:
        audit.record(session, "machine.reset", name, freed_bytes=freed, force=force)
    return freed


def remove(home: Home, *, name: str, force: bool = False) -> int:
    """Remove a machine with its delta; returns the bytes its delta held. A stateful
    machine's data needs ``force``; refused while its disk is open."""
    from lamina.manager.services import settings

    with home.session(read_only=True) as session:
        get(session, name)  # a name that is not a machine's leaves nothing on disk
    with _delta_locked(home, name):
        with home.session() as session:
            machine = get(session, name)
            _refuse_losing(machine, _held_blocks(home, name), "removing it", force=force)
            session.delete(machine)
            settings.put(session, _rotation_key(machine.machine_id), None)
            audit.record(session, "machine.remove", name, force=force)
        freed = _drop_delta(home, name)  # the machine is gone for good: now its data
    shutil.rmtree(home.deltas_dir / name, ignore_errors=True)
    return freed


def change(home: Home, *, name: str, update: MachineUpdate, force: bool = False) -> None:
    """Apply ``update`` in one transaction: identity fields (the identity revision goes up
    when anything changed, which rebuilds the seed disk), mode, re-pin (the delta, made on
    the old version, goes). Every refusal comes before anything is deleted."""
    from lamina.delta import uploads

    with home.session() as session:
        machine = get(session, name)
        mode = _check_mode(update.mode) if update.mode is not None else machine.mode
        target = _repin_target(session, machine, update.image)
        _set_identity(session, machine, update)
        audit.record(
            session, "machine.change", name, force=force, **update.model_dump(exclude_none=True)
        )
        if target is None:
            if mode == "stateless" and machine.mode == STATEFUL:
                # its delta goes at its next boot; the uploads staged for it go now
                _refuse_losing(
                    machine, _held_blocks(home, name), "making it stateless", force=force
                )
                uploads.forget(home, name)
            machine.mode = mode
            session.flush()
            return
        with _delta_locked(home, name):
            what = f"re-pinning it to {target.ref}"
            _refuse_losing(machine, _held_blocks(home, name), what, force=force)
            machine.mode = mode
            pin(session, machine=machine, version=target)
            _drop_delta(home, name)


def _repin_target(session: Session, machine: Machine, image: str | None) -> ImageVersion | None:
    if image is None:
        return None
    version = images.get_version(session, parse_ref(image, "image name"))
    if version.id == machine.image_version_id:
        return None  # already pinned there: nothing to re-pin, its delta stays
    return version


def _set_identity(session: Session, machine: Machine, update: MachineUpdate) -> None:
    """Identity fields from ``update``; a new machine-id gives the machine a new agent
    token (its seed carries it at the next boot)."""
    from lamina.identity import apply_identity, identity_from_machine
    from lamina.identity.model import update_identity
    from lamina.manager.services import settings

    changes: dict[str, Any] = {
        key: value
        for key, value in (
            ("hostname", update.hostname),
            ("domain", update.domain),
            ("mac", update.mac),
            ("extra_config", update.extra_config),
        )
        if value is not None
    }
    current = identity_from_machine(machine)
    updated = update_identity(
        current,
        **changes,
        new_machine_id=update.new_machine_id,
        new_host_keys=update.new_host_keys,
    )
    if updated is not current:
        if (updated.mac, updated.fqdn) != (current.mac, current.fqdn):
            _check_unique(session, machine_id=machine.id, mac=updated.mac, fqdn=updated.fqdn)
        derived = seed_token(session, machine) is not None
        apply_identity(machine, updated)
        if derived and updated.machine_id != current.machine_id:
            key = settings.secret(session, settings.TOKEN_KEY)
            machine.token_hash = hash_token(derive_token(key, machine.name, updated.machine_id))
