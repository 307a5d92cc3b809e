"""The user-data lamina writes, checked by cloud-init's own schema validator.

cloud-init is not on PyPI: the test takes Debian 12's package (the cloud-init the golden
images run, 22.4), unpacks it into the test cache, and runs its
``validate_cloudconfig_schema(..., strict=True)`` on each seed: any schema warning a
machine would log at boot ("Invalid cloud-config provided") fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lamina.demo import tools
from lamina.errors import ToolError
from lamina.identity import AgentSeed, new_identity, seed_files, static_network
from tests.demo.conftest import cache_root

pytestmark = pytest.mark.peers

VALIDATE = """
import json, sys, yaml
from cloudinit.config.schema import SchemaValidationError, get_schema, validate_cloudconfig_schema
schema = get_schema()
errors = {}
for name, text in json.load(sys.stdin).items():
    try:
        validate_cloudconfig_schema(yaml.safe_load(text), schema=schema, strict=True)
    except SchemaValidationError as exc:
        errors[name] = str(exc)
print(json.dumps(errors))
"""


@pytest.fixture(scope="module")
def cloud_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian 12's cloud-init package, unpacked (once per cache)."""
    dest = cache_root() / "cloud-init"
    packages = dest / "root" / "usr" / "lib" / "python3" / "dist-packages"
    if (packages / "cloudinit").is_dir():
        return packages
    work = tmp_path_factory.mktemp("cloud-init")
    try:
        (deb,) = tools.download(["cloud-init"], work)
    except ToolError:
        if os.geteuid() != 0:
            raise
        tools.run(["apt-get", "update", "-q"], "apt-get update")
        (deb,) = tools.download(["cloud-init"], work)
    tools.extract(deb, work / "root")
    dest.mkdir(parents=True, exist_ok=True)
    os.replace(work / "root", dest / "root")
    return packages


def schema_errors(packages: Path, docs: dict[str, bytes]) -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", VALIDATE],
        input=json.dumps({k: v.decode() for k, v in docs.items()}),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(packages)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, str] = json.loads(proc.stdout)
    return result


def test_the_validator_catches_what_debian_12_logged(cloud_init: Path) -> None:
    """The old seed's ``ssh_genkeytypes: []``: the warning Debian 12 printed at boot."""
    old = b"#cloud-config\nhostname: a\nssh_genkeytypes: []\n"
    errors = schema_errors(cloud_init, {"old": old})
    assert "ssh_genkeytypes" in errors["old"]


def test_user_data_passes_cloud_init_22_4_schema(cloud_init: Path) -> None:
    agent = AgentSeed("http://10.0.2.100", "token")
    users = {
        "users": [
            "default",
            {"name": "alice", "shell": "/bin/bash", "ssh_authorized_keys": ["ssh-ed25519 AAAA a"]},
        ]
    }
    identities = {
        "plain": new_identity("desk-001"),
        "domain+static": new_identity(
            "desk-002",
            domain="corp.example",
            network=static_network("10.0.0.12/24", "10.0.0.1", dns=["10.0.0.2"]),
        ),
        "extra config": new_identity(
            "desk-003",
            extra_config={
                **users,
                "write_files": [{"path": "/etc/motd", "content": "hi\n"}],
                "packages": ["htop"],
            },
        ),
    }
    docs = {name: seed_files(i, agent)["user-data"] for name, i in identities.items()}
    assert schema_errors(cloud_init, docs) == {}
