"""Identities: generation, validation, changes, and the machines table's columns."""

from __future__ import annotations

import re

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from lamina.errors import UsageError
from lamina.identity import (
    KEEP,
    apply_identity,
    identity_columns,
    identity_from_machine,
    new_identity,
    parse_extra_config,
    static_network,
    update_identity,
)
from lamina.identity.keys import fingerprint
from lamina.manager.models import Machine


def test_new_identity_generates_machine_id_mac_and_keys() -> None:
    a, b = new_identity("desk-001"), new_identity("desk-002")
    assert a.hostname == "desk-001" and a.fqdn == "desk-001" and a.identity_rev == 1
    assert re.fullmatch(r"[0-9a-f]{32}", a.machine_id)
    assert a.machine_id[12] == "4"  # UUID v4 layout, as systemd writes it
    first_octet = int(a.mac[:2], 16)
    assert first_octet & 0x02 and not first_octet & 0x01  # locally administered unicast
    assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", a.mac)
    assert (a.machine_id, a.mac) != (b.machine_id, b.mac)
    assert a.ssh_host_keys["ed25519"] != b.ssh_host_keys["ed25519"]


def test_host_keys_are_openssh_pairs_that_match() -> None:
    keys = new_identity("desk-001").ssh_host_keys
    assert set(keys) == {"ed25519", "ecdsa"}
    for kind, expected in (
        ("ed25519", ed25519.Ed25519PrivateKey),
        ("ecdsa", ec.EllipticCurvePrivateKey),
    ):
        private = serialization.load_ssh_private_key(keys[kind]["private"].encode(), None)
        assert isinstance(private, expected)
        public = private.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        assert keys[kind]["public"] == public.decode()
    assert keys["ed25519"]["public"].startswith("ssh-ed25519 AAAA")
    assert fingerprint(keys["ed25519"]["public"]).startswith("SHA256:")


def test_given_values_are_checked_and_normalized() -> None:
    i = new_identity("x", hostname="Desk-007", mac="00-1A-2B-3C-4D-5E", domain="Corp.Example.org.")
    assert (i.hostname, i.mac, i.domain) == ("desk-007", "00:1a:2b:3c:4d:5e", "corp.example.org")
    assert i.fqdn == "desk-007.corp.example.org"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hostname": "-desk"}, "bad hostname"),
        ({"hostname": "desk_1"}, "bad hostname"),
        ({"hostname": "a" * 64}, "bad hostname"),
        ({"hostname": "12345"}, "all digits"),
        ({"domain": "corp..example"}, "bad domain"),
        ({"domain": "example.123"}, "all digits"),
        ({"mac": "01:00:5e:00:00:01"}, "multicast"),
        ({"mac": "52:54:00:12:34"}, "bad MAC"),
        ({"mac": "00:00:00:00:00:00"}, "all zeros"),
        ({"mac": "52:54:00-12:34:56"}, "bad MAC"),
        ({"network": {"addresses": ["10.0.0.5"]}}, "prefix length"),
        ({"network": {"addresses": ["10.0.0.300/24"]}}, "bad address"),
        ({"network": {"match": {"name": "eth0"}}}, "matched by the MAC"),
        ({"network": {"version": 2, "ethernets": {}}}, "not a whole network-config"),
        ({"network": {"routes": [{"to": "default"}]}}, "bad route"),
        ({"extra_config": {"hostname": "other"}}, "cannot set hostname"),
        ({"extra_config": {"write_files": [{"path": "/etc/machine-id"}]}}, "/etc/machine-id"),
    ],
)
def test_bad_values_are_usage_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        new_identity("desk-001", **kwargs)  # type: ignore[arg-type]


def test_machine_name_that_is_no_hostname_needs_one() -> None:
    with pytest.raises(UsageError, match="--hostname"):
        new_identity("build_server.1")
    assert new_identity("build_server.1", hostname="build1").hostname == "build1"


def test_fqdn_longer_than_253_is_refused() -> None:
    domain = ".".join(["a" * 60] * 4)  # 243 characters
    with pytest.raises(UsageError, match="longer than 253"):
        new_identity("desk-001", hostname="h" * 20, domain=domain)


def test_static_network() -> None:
    settings = static_network("10.0.0.5/24", "10.0.0.1", dns=["10.0.0.2"], search=["corp.example"])
    assert settings == {
        "dhcp4": False,
        "addresses": ["10.0.0.5/24"],
        "routes": [{"to": "default", "via": "10.0.0.1"}],
        "nameservers": {"addresses": ["10.0.0.2"], "search": ["corp.example"]},
    }
    with pytest.raises(UsageError, match="bad route gateway"):
        static_network("10.0.0.5/24", "gateway")


def test_update_bumps_the_revision_once_and_only_when_something_changes() -> None:
    i = new_identity("desk-001")
    assert update_identity(i) is i
    assert update_identity(i, hostname="desk-001", mac=i.mac) is i  # same values
    j = update_identity(i, hostname="desk-101", domain="corp.example")
    assert (j.hostname, j.domain, j.identity_rev) == ("desk-101", "corp.example", 2)
    assert (j.machine_id, j.mac, j.ssh_host_keys) == (i.machine_id, i.mac, i.ssh_host_keys)
    k = update_identity(j, domain=None, hostname=None)  # clear, back to the name
    assert (k.hostname, k.domain, k.identity_rev) == ("desk-001", None, 3)
    m = update_identity(k, new_machine_id=True, new_host_keys=True, mac=None)
    assert m.identity_rev == 4
    assert m.machine_id != k.machine_id and m.mac != k.mac
    assert m.ssh_host_keys["ed25519"] != k.ssh_host_keys["ed25519"]
    assert update_identity(m, hostname=KEEP, extra_config={}) is m  # empty config is none


def test_failed_update_changes_nothing() -> None:
    i = new_identity("desk-001")
    with pytest.raises(UsageError):
        update_identity(i, hostname="ok", mac="ff:ff:ff:ff:ff:ff")
    assert i.hostname == "desk-001" and i.identity_rev == 1


def test_machine_row_round_trip() -> None:
    i = new_identity(
        "desk-001",
        domain="corp.example",
        network=static_network("10.0.0.5/24", "10.0.0.1"),
        extra_config={"packages": ["htop"], "runcmd": [["echo", "hi"]]},
    )
    row = Machine(name="desk-001", image_version_id=1, mode="stateless", token_hash="x" * 64)
    apply_identity(row, i)
    assert row.fqdn == "desk-001.corp.example"
    assert row.extra_config is not None and row.extra_config.startswith("#cloud-config\n")
    assert identity_from_machine(row) == i
    assert identity_from_machine(row).ssh_host_keys == i.ssh_host_keys
    j = update_identity(i, hostname="desk-009")
    apply_identity(row, j)
    assert (row.hostname, row.identity_rev) == ("desk-009", 2)
    assert identity_from_machine(row) == j
    columns = identity_columns(new_identity("desk-002"))
    assert columns["network"] is None and columns["extra_config"] is None


def test_parse_extra_config() -> None:
    assert parse_extra_config("#cloud-config\npackages: [htop]\n") == {"packages": ["htop"]}
    assert parse_extra_config("") == {}
    with pytest.raises(UsageError, match="not valid YAML"):
        parse_extra_config("packages: [htop\n")
    with pytest.raises(UsageError, match="mapping"):
        parse_extra_config("- a list\n")
    with pytest.raises(UsageError, match="cannot set ssh_keys"):
        parse_extra_config("ssh_keys: {}\n")
