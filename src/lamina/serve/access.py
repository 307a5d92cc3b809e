"""Which exports a TLS client may open, by the credential it showed.

    admin credential      every export
    machine NAME          machine/NAME, machine/NAME/seed, and the image version it is
                          pinned to (IMAGE@V, and IMAGE while V is IMAGE's latest)
    no credential         nothing (nor a rotated, expired or unknown one): every
                          export is refused with the reason, and NBD_OPT_LIST is empty

A server without TLS (loopback, or ``--insecure``) asks no one and opens every export to
every client. The rule is read from the database at each option, so a re-pin, a rotation
or a machine's removal holds from the next handshake option on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lamina.errors import LaminaError
from lamina.names import MACHINE_PREFIX, SEED_SUFFIX
from lamina.nbd import ExportInfo
from lamina.nbd.negotiate import Refusal, Unknown
from lamina.serve.records import Pin
from lamina.trust.principal import Kind, Principal

if TYPE_CHECKING:
    from lamina.nbd.device import BlockDevice
    from lamina.serve.catalog import ExportCatalog


def allowed(principal: Principal, pin: Pin | None) -> frozenset[str] | None:
    """The exports ``principal`` may open; None for every export."""
    if principal.kind is Kind.ADMIN:
        return None
    if principal.kind is not Kind.MACHINE or pin is None:
        return frozenset()
    disk = MACHINE_PREFIX + principal.name
    names = {disk, disk + SEED_SUFFIX, f"{pin.image}@{pin.version}"}
    if pin.latest:
        names.add(pin.image)
    return frozenset(names)


def refusal(principal: Principal, export: str, pin: Pin | None) -> Refusal:
    if principal.kind is Kind.NOBODY:
        return Refusal(principal.reason)
    if pin is None:
        return Refusal(f"machine {principal.name} of this credential no longer exists")
    return Refusal(
        f"{export!r} is not open to the credential of {principal} (it opens"
        f" machine/{principal.name}, its seed and {pin.image}@{pin.version})"
    )


class ClientCatalog:
    """The export catalogue as one TLS client sees it (an NBD ``DeviceProvider``)."""

    def __init__(self, catalog: ExportCatalog, principal: Principal) -> None:
        self.catalog = catalog
        self.principal = principal

    def _pin(self) -> Pin | None:
        if self.principal.kind is not Kind.MACHINE:
            return None
        return self.catalog.records.pin(self.principal.name)

    def _check(self, name: str) -> Refusal | None:
        pin = self._pin()
        names = allowed(self.principal, pin)
        if names is None or name in names:
            return None
        return refusal(self.principal, name, pin)

    def lookup(self, name: str) -> ExportInfo | Refusal | Unknown | None:
        return self._check(name) or self.catalog.lookup(name)

    def names(self) -> list[str]:
        names = allowed(self.principal, self._pin())
        everything = self.catalog.names()
        return everything if names is None else [n for n in everything if n in names]

    def open(self, name: str, client: str) -> BlockDevice:
        refused = self._check(name)
        if refused is not None:
            raise LaminaError(refused.reason)
        # Only the machine itself boots: an admin's backup read is not a boot profile.
        own = self.principal.kind is Kind.MACHINE and name == MACHINE_PREFIX + self.principal.name
        return self.catalog.open(name, client, boot=own)

    def release(self, name: str, device: BlockDevice, *, ended: bool) -> None:
        self.catalog.release(name, device, ended=ended)


def for_peer(catalog: ExportCatalog, der: bytes | None) -> tuple[ClientCatalog, str]:
    """The catalogue a client that showed certificate ``der`` (DER, verified by the TLS
    handshake; None for none) may use, and who it is, for the log."""
    principal = catalog.records.principal(der)
    return ClientCatalog(catalog, principal), str(principal)
