"""Network boot over HTTP, for firmware that holds no token (iPXE):

    GET /boot.ipxe                               the entry script: chains the per-MAC URL
    GET /boot/{mac}.ipxe                         the machine's script (or why it must wait)
    GET /boot/{mac}/{image}/{version}/vmlinuz    its pinned version's kernel
    GET /boot/{mac}/{image}/{version}/initrd.img and initrd
    GET /boot/{mac}/{image}/{version}/credential.cpio   with TLS on: a machine credential
                                                 for this boot (valid one hour), as an initrd

A MAC opens only the boot files of the version a machine with that MAC is pinned to;
``serve --boot-allow NETWORK`` limits all of these to clients of those networks.
Kernel and initrd are read from the version's own file system once and kept per version
(``HOME/cache/boot``). Scripts name this server as the machine reached it (the request's
scheme and Host), and the NBD server at that host and the NBD port, unless
``serve --boot-nbd`` says otherwise.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, PlainTextResponse, Response

from lamina import logs
from lamina.errors import InvalidInput, LaminaError, NotFound, UsageError
from lamina.home import Home
from lamina.identity.validate import check_mac
from lamina.image import ImageReader, Manifest
from lamina.manager.models import Machine
from lamina.manager.services import cluster_ca, credentials, netboot, servers
from lamina.manager.services.netboot import DeviceReport, NetbootSettings
from lamina.netboot import ipxe, tlsfiles
from lamina.netboot.bootfiles import BootCache, BootInfo
from lamina.store import ChunkCache
from lamina.trust.principal import Kind


def _allowed(request: Request) -> None:
    """Only clients of the networks ``--boot-allow`` names (all when it names none)."""
    allow = _settings(request).allow
    if not allow:
        return
    address = ipaddress.ip_address(request.client.host) if request.client else None
    if address is None or not any(address in network for network in allow):
        raise HTTPException(403, "network boot is not served to this address")


router = APIRouter(tags=["netboot"], dependencies=[Depends(_allowed)])
IPXE_TYPE = "text/plain; charset=utf-8"
_auto_add_lock = threading.Lock()  # one auto-add at a time, committed before the next
_log = logging.getLogger(logs.LOGGER)


def _settings(request: Request) -> NetbootSettings:
    settings: NetbootSettings = request.app.state.netboot
    return settings


def _home(request: Request) -> Home:
    home: Home = request.app.state.home
    return home


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _script(text: str) -> PlainTextResponse:
    return PlainTextResponse(text, media_type=IPXE_TYPE, headers={"Cache-Control": "no-store"})


def boot_files(request: Request, manifest_id: str, size: int) -> tuple[Path, BootInfo]:
    """The version's boot files, read from its file system on first use."""
    cache: BootCache = request.app.state.boot_cache
    hit = cache.lookup(manifest_id)  # every boot after the version's first
    if hit is not None:
        return hit
    home = _home(request)

    def read(offset: int, length: int) -> bytes:
        return reader.read(offset, length)

    manifest = Manifest.from_bytes(home.store.get(bytes.fromhex(manifest_id)))
    reader = ImageReader(home.store, manifest, ChunkCache(16 << 20))
    return cache.get(manifest_id, read, size)


@router.get("/boot.ipxe", response_class=PlainTextResponse)
def entry(request: Request) -> PlainTextResponse:
    """The script network-booting firmware starts with (no token)."""
    return _script(ipxe.entry_script(_base_url(request), _settings(request).retry_seconds))


def _report(request: Request) -> DeviceReport:
    q = request.query_params
    return DeviceReport(
        address=request.client.host if request.client else None,
        platform=q.get("platform"),
        arch=q.get("buildarch"),
        manufacturer=q.get("manufacturer"),
        product=q.get("product"),
        serial=q.get("serial"),
        uuid=q.get("uuid"),
    )


@dataclass(frozen=True, slots=True)
class Booting:
    """What a machine boots, read out of the database session."""

    machine: str
    image: str
    version: int
    ref: str
    manifest_id: str
    size: int

    @classmethod
    def of(cls, machine: Machine) -> Booting:
        v = machine.image_version
        return cls(machine.name, v.image.name, v.version, v.ref, v.manifest_id, v.size)


def _nbd_target(
    request: Request, settings: NetbootSettings, machine: str, port: int
) -> ipxe.NbdTarget:
    """The block server the machine is assigned to when several serve one database (the
    least loaded live one; another once its server is lost), else this manager's own."""
    with _home(request).session() as session:
        assigned = servers.server_for(session, machine)
    if assigned is not None:
        host, _, assigned_port = assigned.nbd_address.rpartition(":")
        return ipxe.NbdTarget(host.strip("[]"), int(assigned_port), settings.tls)
    host = settings.nbd_host or request.url.hostname or "127.0.0.1"
    return ipxe.NbdTarget(host, port, settings.tls)


def _machine_for(request: Request, mac: str) -> Booting | list[str]:
    """What the machine with ``mac`` boots, or the lines that tell the machine why not."""
    home, settings = _home(request), _settings(request)
    with home.session(read_only=True) as session:
        found = [Booting.of(m) for m in netboot.by_mac(session, mac)]
    if len(found) > 1:
        names = ", ".join(b.machine for b in found)
        return [f"MAC {mac} is claimed by machines {names}.", "give each machine its own MAC."]
    if found:
        return found[0]
    if settings.auto_add is None:
        with home.session() as session:
            netboot.note_new_device(session, mac, _report(request))
        logs.event(_log, "netboot-unknown", mac=mac, address=_report(request).address)
        return ipxe.unknown_reason(mac)
    with _auto_add_lock, home.session() as session:
        added = netboot.auto_add(session, mac, settings.auto_add)
        booting = Booting.of(netboot.by_mac(session, mac)[0])
        logs.event(_log, "netboot-auto-added", mac=mac, machine=added.name)
    return booting


@router.get("/boot/{mac}.ipxe", response_class=PlainTextResponse)
def machine_script(
    request: Request, mac: Annotated[str, PathParam(max_length=32)]
) -> PlainTextResponse:
    """The boot script of the machine with this MAC, or a message and a retry."""
    base, settings = _base_url(request), _settings(request)
    try:
        mac = check_mac(mac)
    except UsageError as exc:
        raise HTTPException(422, str(exc)) from None
    found = _machine_for(request, mac)
    if isinstance(found, list):
        return _script(ipxe.wait_script(base, found, settings.retry_seconds))
    if settings.nbd_port is None:
        reason = ["this manager serves no NBD and was given no --boot-nbd."]
        return _script(ipxe.wait_script(base, reason, settings.retry_seconds))
    try:
        _folder, info = boot_files(request, found.manifest_id, found.size)
    except (NotFound, InvalidInput) as exc:
        reason = [f"{found.ref} cannot boot from the network:", str(exc)]
        logs.event(
            _log, "netboot-no-kernel", level=logging.WARNING, image=found.ref, error=str(exc)
        )
        return _script(ipxe.wait_script(base, reason, settings.retry_seconds))
    target = _nbd_target(request, settings, found.machine, settings.nbd_port)
    initrds = (ipxe.INITRD, ipxe.CREDENTIAL) if settings.tls else (ipxe.INITRD,)
    args = ipxe.kernel_args(
        info.args,
        machine=found.machine,
        mac=mac,
        root_partition=info.root_partition,
        nbd=target,
        initrds=initrds,
    )
    files = f"/boot/{ipxe.hyphenated(mac)}/{found.image}/{found.version}"
    logs.event(_log, "netboot", mac=mac, machine=found.machine, image=found.ref)
    return _script(
        ipxe.boot_script(
            base,
            machine=found.machine,
            mac=mac,
            ref=found.ref,
            files_path=files,
            args=args,
            initrds=initrds,
            retry=settings.retry_seconds,
        )
    )


def _pinned(request: Request, mac: str, image: str, version: int) -> Booting:
    try:
        mac = check_mac(mac)
    except UsageError as exc:
        raise HTTPException(422, str(exc)) from None
    with _home(request).session(read_only=True) as session:
        pinned = [
            b
            for b in map(Booting.of, netboot.by_mac(session, mac))
            if (b.image, b.version) == (image, version)
        ]
    if not pinned:
        raise HTTPException(404, f"no machine with MAC {mac} is pinned to {image}@{version}")
    return pinned[0]


@router.get("/boot/{mac}/{image}/{version}/credential.cpio")
def credential(
    request: Request,
    mac: Annotated[str, PathParam(max_length=32)],
    image: str,
    version: int,
) -> Response:
    """A machine credential for this boot, as an initrd (only when NBD requires TLS)."""
    if not _settings(request).tls:
        raise HTTPException(404, "NBD needs no credential: this server runs without TLS")
    booting = _pinned(request, mac, image, version)
    home = _home(request)
    authority = cluster_ca.authority(home)
    with home.session() as session:
        issued = credentials.issue(
            session,
            authority,
            Kind.MACHINE,
            booting.machine,
            not_after=datetime.now(UTC) + tlsfiles.VALIDITY,
        )
    logs.event(_log, "netboot-credential", mac=mac, machine=booting.machine, serial=issued.serial)
    body = tlsfiles.archive(authority.cert_pem, issued.cert_pem, issued.key_pem)
    return Response(
        body, media_type="application/octet-stream", headers={"Cache-Control": "no-store"}
    )


@router.get("/boot/{mac}/{image}/{version}/{name}")
def boot_file(
    request: Request,
    mac: Annotated[str, PathParam(max_length=32)],
    image: str,
    version: int,
    name: Literal["vmlinuz", "initrd.img"],
) -> FileResponse:
    """A kernel or initrd, to a MAC whose machine is pinned to that version."""
    booting = _pinned(request, mac, image, version)
    try:
        folder, _info = boot_files(request, booting.manifest_id, booting.size)
    except LaminaError as exc:
        raise HTTPException(404, str(exc)) from None
    return FileResponse(folder / name, media_type="application/octet-stream")
