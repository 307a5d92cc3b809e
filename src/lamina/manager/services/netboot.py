"""Network boot: which machine a MAC is, the devices that asked and are no machine yet,
and auto-add (a new MAC becomes a machine of a given image, named from a pattern, as
Citrix Provisioning's auto-add does).

A MAC is claimed, not proven: this decides what a MAC *asks* to boot, and what the
firmware reported is kept only to help an administrator recognise the device.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, joinedload

from lamina.errors import UsageError
from lamina.identity.validate import check_mac
from lamina.manager.models import ImageVersion, Machine, NewDevice, utcnow
from lamina.manager.services import images, machines
from lamina.names import check_name, parse_ref

# Column widths of new_devices (what a firmware reports is cut to them).
_WIDTHS = {"platform": 16, "arch": 16, "manufacturer": 64, "product": 64, "serial": 64, "uuid": 36}
_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_COUNTER = re.compile(r"#+")


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """What a booting device's firmware told about itself (iPXE settings), and its
    address as the HTTP server saw it."""

    address: str | None = None
    platform: str | None = None
    arch: str | None = None
    manufacturer: str | None = None
    product: str | None = None
    serial: str | None = None
    uuid: str | None = None

    def cleaned(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {"address": (self.address or "")[:45] or None}
        for key, width in _WIDTHS.items():
            value = _PRINTABLE.sub("", getattr(self, key) or "").strip()[:width]
            out[key] = value or None
        return out


@dataclass(frozen=True, slots=True)
class AutoAdd:
    """``serve --auto-add IMAGE [--auto-add-name PATTERN] [--auto-add-mode MODE]``."""

    image: str
    pattern: str = "pxe-###"
    mode: str = "stateless"

    def __post_init__(self) -> None:
        parse_ref(self.image, "--auto-add image")
        runs = _COUNTER.findall(self.pattern)
        if len(runs) != 1:
            raise UsageError(
                f"bad --auto-add-name {self.pattern!r}: put one run of '#' where the number "
                "goes, as in desk-###"
            )
        check_name(self.name(1), "--auto-add-name")
        if self.mode not in machines.MODES:
            raise UsageError(f"--auto-add-mode must be stateless or stateful, not {self.mode!r}")

    def name(self, number: int) -> str:
        width = len(_COUNTER.search(self.pattern).group())  # type: ignore[union-attr]
        return _COUNTER.sub(f"{number:0{width}d}", self.pattern, count=1)


def by_mac(session: Session, mac: str) -> list[Machine]:
    """The machines that claim ``mac`` (more than one is a mistake the boot reports)."""
    query = (
        select(Machine)
        .where(Machine.mac == check_mac(mac))
        .options(joinedload(Machine.image_version).joinedload(ImageVersion.image))
        .order_by(Machine.name)
    )
    return list(session.scalars(query))


def note_new_device(session: Session, mac: str, report: DeviceReport) -> NewDevice:
    """Record (or refresh) a MAC that asked to boot and is no machine."""
    mac = check_mac(mac)
    fields = report.cleaned()
    row = session.get(NewDevice, mac)
    if row is None:
        row = NewDevice(mac=mac, requests=0, first_seen=utcnow())
        session.add(row)
    row.requests += 1
    row.last_seen = utcnow()
    for key, value in fields.items():
        if value is not None:
            setattr(row, key, value)
    session.flush()
    return row


def new_devices(session: Session, limit: int | None = None) -> list[NewDevice]:
    """Devices that asked to boot and are still no machine, newest request first."""
    known = select(Machine.mac)
    query = select(NewDevice).where(NewDevice.mac.not_in(known))
    return list(session.scalars(query.order_by(NewDevice.last_seen.desc()).limit(limit)))


def forget(session: Session, mac: str) -> None:
    """Drop a MAC from the new devices (it became a machine, or is not wanted)."""
    session.execute(delete(NewDevice).where(NewDevice.mac == check_mac(mac)))


def auto_add(session: Session, mac: str, policy: AutoAdd) -> Machine:
    """Make the machine for a new MAC: the first free name of the pattern, the policy's
    image and mode. Returns the existing machine if the MAC became one meanwhile. (The
    caller serializes auto-adds and commits before the next, so one new MAC asking twice
    at once makes one machine.)"""
    existing = by_mac(session, mac)
    if existing:
        return existing[0]
    taken = set(session.scalars(select(Machine.name)))
    number = next(n for n in range(1, len(taken) + 2) if policy.name(n) not in taken)
    added = machines.add(
        session, name=policy.name(number), image=policy.image, mode=policy.mode, mac=mac
    )
    forget(session, mac)
    session.flush()
    return added.machine


def check_auto_add(session: Session, policy: AutoAdd) -> str:
    """The version new machines would be pinned to (the image must exist at start)."""
    return images.get_version(session, parse_ref(policy.image, "--auto-add image")).ref


@dataclass(frozen=True, slots=True)
class NetbootSettings:
    """How ``lamina serve`` answers network boots (its HTTP app holds one)."""

    nbd_host: str | None = None  # None: the host the machine reached the HTTP port at
    nbd_port: int | None = None  # None: this manager serves no NBD (and no --boot-nbd)
    tls: bool = False  # NBD requires TLS: machines get a credential with their initrd
    auto_add: AutoAdd | None = None
    retry_seconds: int = 10
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # all when empty
