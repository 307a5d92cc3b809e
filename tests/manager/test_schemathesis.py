"""schemathesis against the manager's /openapi.json: no generated request gets a 5xx.

The admin API is fuzzed with the admin token, the agent API with a machine token; both
over real HTTP against ``lamina serve`` with a small fleet in its database.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lamina.home import Home
from tests.manager.test_access_api import make_fleet
from tests.servers import Server

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))


def fuzz(url: str, token: str, *extra: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [SCHEMATHESIS, "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {token}"]
    cmd += ["--checks", "not_a_server_error", "--seed", "7", "--no-color", *extra]
    # In the test's temp dir: schemathesis leaves its example database in the working dir.
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=cwd)
    if done.returncode != 0:  # the failures section, whatever its length
        print(done.stdout)
    return done


@pytest.mark.slow
def test_no_server_errors(home: Home, server: Server, tmp_path: Path) -> None:
    from lamina.manager.services import settings

    tokens = make_fleet(home, tmp_path)
    with home.session() as s:
        admin = settings.admin_token(s)
    server.start()
    url = server.http_url
    # desired?wait= holds a request up to `wait` seconds when the rev matches, and the fuzzer
    # learns the rev from the ETag: that endpoint gets the coverage phase (boundaries, types)
    agent = fuzz(
        url,
        tokens["m1"],
        "-n",
        "30",
        "--include-path-regex",
        "/api/v1/(agent/(boot|log)|chunks)",
        cwd=tmp_path,
    )
    assert agent.returncode == 0, agent.stdout[-4000:]
    assert " passed" in agent.stdout
    desired = fuzz(
        url,
        tokens["m1"],
        "-n",
        "30",
        "--include-path-regex",
        "/agent/desired",
        "--phases",
        "coverage",
        "--request-timeout",
        "70",
        cwd=tmp_path,
    )
    assert desired.returncode == 0, desired.stdout[-4000:]
    everything = fuzz(url, admin, "-n", "15", "--request-timeout", "30", cwd=tmp_path)
    assert everything.returncode == 0, everything.stdout[-4000:]
    assert " passed" in everything.stdout
