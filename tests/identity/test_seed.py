"""Seed disks: the three NoCloud files, their content, and the ISO as real readers see it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from lamina.identity import (
    AgentSeed,
    Identity,
    build_seed_iso,
    new_identity,
    read_seed_iso,
    seed_files,
    seed_image,
    static_network,
    update_identity,
)

NAMES = ["lamina", "meta-data", "network-config", "user-data"]
CLOUD_INIT = ("meta-data", "user-data", "network-config")


def parsed(identity: Identity) -> dict[str, Any]:
    return {name: yaml.safe_load(seed_files(identity)[name]) for name in CLOUD_INIT}


@pytest.fixture(scope="module")
def two() -> tuple[Identity, Identity]:
    return (
        new_identity("desk-001"),
        new_identity(
            "desk-002",
            domain="corp.example",
            mac="52:54:00:00:00:02",
            network=static_network("10.0.0.12/24", "10.0.0.1", dns=["10.0.0.2"]),
            extra_config={
                "packages": ["htop"],
                "write_files": [{"path": "/etc/motd", "content": "hi\n"}],
            },
        ),
    )


def test_meta_data(two: tuple[Identity, Identity]) -> None:
    a, b = (parsed(i)["meta-data"] for i in two)
    assert a == {"instance-id": f"lamina-{two[0].machine_id}-1", "local-hostname": "desk-001"}
    assert b["local-hostname"] == "desk-002"
    assert a["instance-id"] != b["instance-id"]
    assert two[0].machine_id in a["instance-id"]


def test_user_data(two: tuple[Identity, Identity]) -> None:
    a_id, b_id = two
    assert seed_files(a_id)["user-data"].startswith(b"#cloud-config\n")
    a, b = (parsed(i)["user-data"] for i in two)
    assert a["hostname"] == "desk-001" and "fqdn" not in a
    assert (b["hostname"], b["fqdn"], b["prefer_fqdn_over_hostname"]) == (
        "desk-002",
        "desk-002.corp.example",
        False,
    )
    for config, identity in ((a, a_id), (b, b_id)):
        # no ssh_genkeytypes: with ssh_keys given cloud-init generates nothing, and its
        # schema refuses the empty list
        assert "ssh_genkeytypes" not in config and config["ssh_deletekeys"] is True
        for kind, pair in identity.ssh_host_keys.items():
            assert config["ssh_keys"][f"{kind}_private"] == pair["private"]
            assert config["ssh_keys"][f"{kind}_public"] == pair["public"]
        machine_id = config["write_files"][0]
        assert machine_id["path"] == "/etc/machine-id"
        assert machine_id["content"] == identity.machine_id + "\n"
    # extra config merged: its keys added, its files after the machine-id
    assert b["packages"] == ["htop"]
    assert [f["path"] for f in b["write_files"]] == ["/etc/machine-id", "/etc/motd"]
    assert "packages" not in a


def test_network_config(two: tuple[Identity, Identity]) -> None:
    a, b = (parsed(i)["network-config"] for i in two)
    assert a == {
        "version": 2,
        "ethernets": {"primary": {"match": {"macaddress": two[0].mac}, "dhcp4": True}},
    }
    nic = b["ethernets"]["primary"]
    assert nic["match"] == {"macaddress": "52:54:00:00:00:02"}
    assert (nic["dhcp4"], nic["addresses"]) == (False, ["10.0.0.12/24"])
    assert nic["routes"] == [{"to": "default", "via": "10.0.0.1"}]


def test_changing_the_hostname_changes_only_what_it_should(two: tuple[Identity, Identity]) -> None:
    before = two[0]
    after = update_identity(before, hostname="desk-101")
    old, new = seed_files(before), seed_files(after)
    assert old["network-config"] == new["network-config"]
    assert yaml.safe_load(new["meta-data"]) == {
        "instance-id": f"lamina-{before.machine_id}-2",
        "local-hostname": "desk-101",
    }
    old_ud, new_ud = yaml.safe_load(old["user-data"]), yaml.safe_load(new["user-data"])
    assert new_ud["hostname"] == "desk-101"
    assert {k: v for k, v in new_ud.items() if k != "hostname"} == {
        k: v for k, v in old_ud.items() if k != "hostname"
    }
    assert seed_image(before) != seed_image(after)


def test_seed_iso_is_the_same_at_any_time_in_any_time_zone(two: tuple[Identity, Identity]) -> None:
    """Built again in another process, ten years later by its clock and in another time
    zone, the seed is byte for byte the same: every timestamp in it is the fixed one."""
    a, b = two
    here = seed_image(a)
    script = textwrap.dedent(
        """
        import json, sys, time
        time.time = lambda: 1_900_000_000.0  # 2030, whatever the real clock says
        from lamina.identity import Identity, seed_image
        identity = Identity(**json.loads(sys.stdin.read()))
        sys.stdout.buffer.write(seed_image(identity))
        """
    )
    there = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(dataclasses.asdict(a)).encode(),
        capture_output=True,
        env={**os.environ, "TZ": "Pacific/Chatham"},  # UTC+12:45/+13:45
        check=True,
    ).stdout
    assert there == here
    pvd = here[16 * 2048 : 17 * 2048]  # the primary volume descriptor (ECMA-119 8.4)
    for field in (813, 830, 864):  # creation, modification, effective dates
        assert pvd[field : field + 17] == b"2020010100000000\0"  # FIXED_TIME, UTC
    assert here != seed_image(b)
    assert read_seed_iso(seed_image(b)) == seed_files(b)


@pytest.fixture(scope="module")
def iso(two: tuple[Identity, Identity], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seed") / "seed.iso"
    path.write_bytes(seed_image(two[1]))
    return path


def xorriso(*args: str) -> str:
    proc = subprocess.run(["xorriso", *args], capture_output=True, text=True, check=True)
    return proc.stdout + proc.stderr


@pytest.mark.peers
def test_volume_label_is_cidata(iso: Path) -> None:
    data = iso.read_bytes()
    assert data[16 * 2048 + 40 : 16 * 2048 + 72].rstrip() == b"cidata"  # the PVD's field
    assert "Volume Id    : cidata" in xorriso("-indev", str(iso), "-pvd_info")
    blkid = subprocess.run(
        ["blkid", "-p", "-o", "export", str(iso)], capture_output=True, text=True, check=True
    ).stdout
    assert "LABEL=cidata" in blkid.split() and "TYPE=iso9660" in blkid.split()


@pytest.mark.peers
@pytest.mark.parametrize(("tree", "loaded"), [("any", "Rock_Ridge"), ("norock", "Joliet")])
def test_linux_and_windows_see_the_file_names(iso: Path, tree: str, loaded: str) -> None:
    """Rock Ridge is what Linux's isofs reads, Joliet what Windows reads."""
    listing = xorriso("-read_fs", tree, "-indev", str(iso), "-toc", "-ls", "/")
    assert f"ISO loaded   : {loaded}" in listing
    names = sorted(line.strip("'") for line in listing.splitlines() if line.startswith("'"))
    assert names == NAMES


@pytest.mark.peers
def test_files_read_back_by_xorriso(
    iso: Path, two: tuple[Identity, Identity], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    xorriso("-osirrox", "on", "-indev", str(iso), "-extract", "/", str(out))
    found = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert found == seed_files(two[1])


def test_build_seed_iso_any_files() -> None:
    files = {"meta-data": b"instance-id: x\n", "user-data": b"", "vendor-data": b"#cloud-config\n"}
    image = build_seed_iso(files, label="CIDATA")
    assert read_seed_iso(image) == files
    assert image[16 * 2048 + 40 : 16 * 2048 + 46] == b"CIDATA"


def test_kit_files_hold_the_identity_one_value_a_file(two: tuple[Identity, Identity]) -> None:
    a, b = two
    files = seed_files(b)
    assert files["lamina/hostname"] == b"desk-002\n"
    assert files["lamina/fqdn"] == b"desk-002.corp.example\n"
    assert files["lamina/machine-id"] == f"{b.machine_id}\n".encode()
    for kind, pair in b.ssh_host_keys.items():
        assert files[f"lamina/ssh_host_{kind}_key"] == pair["private"].encode()
        assert files[f"lamina/ssh_host_{kind}_key.pub"] == (pair["public"] + "\n").encode()
    assert "lamina/fqdn" not in seed_files(a)
    assert "lamina/agent.env" not in files  # no manager known: the agent is not configured


def test_agent_env_carries_manager_and_token(two: tuple[Identity, Identity]) -> None:
    agent = AgentSeed("http://10.0.2.100:8480", "s3cr3t-T0ken_x")
    env = seed_files(two[0], agent)["lamina/agent.env"].decode()
    assert env.splitlines() == [
        "LAMINA_MANAGER='http://10.0.2.100:8480'",
        "LAMINA_TOKEN='s3cr3t-T0ken_x'",
        "LAMINA_MACHINE='desk-001'",
    ]
    # a POSIX shell reads it back as written (systemd's EnvironmentFile too)
    out = subprocess.run(
        ["sh", "-c", '. "$0" && printf %s "$LAMINA_TOKEN"', "/dev/stdin"],
        input=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == "s3cr3t-T0ken_x"
    assert "s3cr3t" not in repr(agent)
    # the agent settings change the seed, not the cloud-init files
    without = seed_files(two[0])
    with_agent = seed_files(two[0], agent)
    assert {n: with_agent[n] for n in CLOUD_INIT} == {n: without[n] for n in CLOUD_INIT}
    assert read_seed_iso(seed_image(two[0], agent)) == with_agent


def test_build_seed_iso_refuses_deep_paths() -> None:
    with pytest.raises(ValueError, match="one directory level"):
        build_seed_iso({"a/b/c": b""})
