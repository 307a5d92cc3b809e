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

import hashlib
import secrets
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
from lamina.manager.services import images
from lamina.names import check_name, parse_ref
from lamina.units import human_bytes

if TYPE_CHECKING:
    from lamina.home import Home
    from lamina.manager.schemas import MachineUpdate

MODES = ("stateless", "stateful")
STATEFUL = "stateful"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


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
) -> Added:
    """Create a machine pinned to ``image`` (NAME for its latest version, or NAME@V)."""
    from lamina.identity import identity_columns, new_identity

    check_name(name, "machine name")
    version = images.get_version(session, parse_ref(image, "image name"))
    identity = new_identity(name, hostname=hostname, mac=mac, domain=domain)
    if session.scalar(select(Machine.id).where(Machine.name == name)) is not None:
        raise AlreadyExists(f"a machine named {name!r} already exists")
    _check_unique(session, machine_id=None, mac=identity.mac, fqdn=identity.fqdn)
    token = secrets.token_urlsafe(32)
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
            return _drop_delta(home, name)


def remove(home: Home, *, name: str, force: bool = False) -> int:
    """Remove a machine with its delta; returns the bytes its delta held. A stateful
    machine's data needs ``force``; refused while its disk is open."""
    with home.session(read_only=True) as session:
        get(session, name)  # a name that is not a machine's leaves nothing on disk
    with _delta_locked(home, name):
        with home.session() as session:
            machine = get(session, name)
            _refuse_losing(machine, _held_blocks(home, name), "removing it", force=force)
            session.delete(machine)
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
        raise UsageError(f"{machine.name} already runs {version.ref}")
    return version


def _set_identity(session: Session, machine: Machine, update: MachineUpdate) -> None:
    from lamina.identity import apply_identity, identity_from_machine
    from lamina.identity.model import update_identity

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
        apply_identity(machine, updated)
