"""Checks of what an identity is made of: hostnames, domains, MAC addresses, networks.

Each check returns the value in its canonical form (lower case, colons) or raises a
``UsageError`` whose message says what is wrong and what is expected.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from lamina.errors import UsageError

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_MAC = re.compile(r"^[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")
_MACHINE_ID = re.compile(r"^[0-9a-f]{32}$")
# RFC 1035: a name of at most 255 octets on the wire, 253 characters written out.
_MAX_FQDN = 253


def check_hostname(hostname: str) -> str:
    """An RFC 1123 host label: 1-63 letters, digits and inner hyphens; not all digits."""
    h = hostname.lower()
    if not _LABEL.fullmatch(h):
        raise UsageError(
            f"bad hostname {hostname!r}: use 1-63 letters, digits or '-', "
            "starting and ending with a letter or digit (RFC 1123)"
        )
    if h.isdigit():
        raise UsageError(f"bad hostname {hostname!r}: a hostname cannot be all digits")
    return h


def check_domain(domain: str) -> str:
    """A DNS domain: dot-separated RFC 1123 labels, 253 characters at most."""
    d = domain.lower().removesuffix(".")
    labels = d.split(".")
    if not d or len(d) > _MAX_FQDN or not all(_LABEL.fullmatch(label) for label in labels):
        raise UsageError(
            f"bad domain {domain!r}: use dot-separated labels of 1-63 letters, digits or '-' "
            "(e.g. corp.example.org), 253 characters at most"
        )
    if labels[-1].isdigit():
        raise UsageError(f"bad domain {domain!r}: the last label cannot be all digits")
    return d


def check_fqdn(hostname: str, domain: str | None) -> None:
    if domain and len(hostname) + 1 + len(domain) > _MAX_FQDN:
        raise UsageError(f"{hostname}.{domain} is longer than {_MAX_FQDN} characters")


def check_mac(mac: str) -> str:
    """A unicast MAC address as six hex pairs (':' or '-'); returned lower case with ':'."""
    m = mac.strip().lower()
    if not _MAC.fullmatch(m):
        raise UsageError(f"bad MAC address {mac!r}: expected six hex pairs like 52:54:00:12:34:56")
    m = m.replace("-", ":")
    first = int(m[:2], 16)
    if first & 0x01:
        raise UsageError(f"bad MAC address {mac!r}: a multicast address cannot name a NIC")
    if m == "00:00:00:00:00:00":
        raise UsageError(f"bad MAC address {mac!r}: all zeros")
    return m


def generate_mac() -> str:
    """A random locally administered (bit 1 set) unicast (bit 0 clear) MAC address."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def generate_machine_id() -> str:
    """A random machine-id, formatted as systemd-machine-id-setup writes it (UUID v4 bits)."""
    raw = bytearray(secrets.token_bytes(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return raw.hex()


def _check_ip(value: Any, what: str, *, interface: bool) -> str:
    try:
        parsed = ipaddress.ip_interface(value) if interface else ipaddress.ip_address(value)
    except (ValueError, TypeError):
        want = "an address with a prefix like 10.0.0.5/24" if interface else "an IP address"
        raise UsageError(f"bad {what} {value!r}: expected {want}") from None
    if interface and "/" not in str(value):
        raise UsageError(f"bad {what} {value!r}: give the prefix length too, e.g. {value}/24")
    return str(parsed)


def _check_addresses(values: Any, what: str, *, interface: bool) -> list[str]:
    if not isinstance(values, list):
        raise UsageError(f"bad {what}: expected a list")
    return [_check_ip(v, what, interface=interface) for v in values]


def check_network(network: Mapping[str, Any]) -> dict[str, Any]:
    """Settings of the machine's NIC in network-config v2 terms (dhcp4, addresses, ...).

    The addresses, gateways and name servers are checked; other v2 keys (routes, mtu,
    dhcp6, ...) pass through for cloud-init to judge. ``match`` is not allowed: the NIC
    is always matched by the machine's MAC address.
    """
    if not isinstance(network, Mapping):
        raise UsageError("bad network settings: expected a mapping like {'addresses': [...]}")
    if "match" in network or "set-name" in network:
        raise UsageError("network settings cannot choose the NIC: it is matched by the MAC")
    if {"version", "ethernets", "bonds", "bridges", "vlans"} & set(network):
        raise UsageError(
            "give the NIC's settings (dhcp4, addresses, routes, nameservers), "
            "not a whole network-config"
        )
    settings = dict(network)
    if "addresses" in settings:
        settings["addresses"] = _check_addresses(settings["addresses"], "address", interface=True)
    for key in ("gateway4", "gateway6"):
        if key in settings:
            settings[key] = _check_ip(settings[key], key, interface=False)
    for route in settings.get("routes", []):
        if not isinstance(route, Mapping) or "via" not in route:
            raise UsageError(f"bad route {route!r}: expected {{'to': ..., 'via': ...}}")
        _check_ip(route["via"], "route gateway", interface=False)
    nameservers = settings.get("nameservers")
    if nameservers is not None:
        if not isinstance(nameservers, Mapping):
            raise UsageError("bad nameservers: expected {'addresses': [...], 'search': [...]}")
        ns = dict(nameservers)
        if "addresses" in ns:
            ns["addresses"] = _check_addresses(ns["addresses"], "name server", interface=False)
        if "search" in ns:
            ns["search"] = [check_domain(str(d)) for d in ns["search"]]
        settings["nameservers"] = ns
    return settings


def static_network(
    address: str,
    gateway: str | None = None,
    dns: Sequence[str] = (),
    search: Sequence[str] = (),
) -> dict[str, Any]:
    """Static settings from the usual four facts (what ``machine add --ip ...`` offers)."""
    settings: dict[str, Any] = {"dhcp4": False, "addresses": [address]}
    if gateway:
        settings["routes"] = [{"to": "default", "via": gateway}]
    if dns or search:
        settings["nameservers"] = {"addresses": list(dns), "search": list(search)}
    return check_network(settings)
