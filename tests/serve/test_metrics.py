"""``/metrics`` scraped over real HTTP while real NBD clients (qemu-io, nbdcopy, nbdinfo)
read and write through two worker processes: the text parses with Prometheus's own
parser and the counters move with the traffic."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Cli, write_sparse
from tests.serve.test_workers import Session, nbdcopy
from tests.servers import Server, wait_for

MiB = 1 << 20
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def served(cli: Cli, tmp_path: Path) -> Iterator[Server]:
    src = write_sparse(tmp_path / "base.raw", 16 * MiB, [(0, os.urandom(8 * MiB))])
    cli("image", "import", "base", str(src))
    cli("machine", "add", "m1", "--image", "base", "--mode", "stateful")
    srv = Server(cli.home, tmp_path / "serve.log", args=("--workers", "2"))
    srv.start()
    yield srv
    srv.stop()


def scrape(server: Server, token: str) -> Samples:
    reply = httpx.get(
        f"{server.http_url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_what_nbd_clients_and_http_callers_do(
    served: Server, cli: Cli, tmp_path: Path
) -> None:
    assert httpx.get(f"{served.http_url}/metrics", timeout=30).status_code == 401
    admin = cli("admin", "token").out.strip()
    before = scrape(served, admin)
    assert value(before, "lamina_build_info", version=__import__("lamina").__version__) == 1
    assert value(before, "lamina_store_chunks") > 0
    assert value(before, "lamina_store_bytes") >= 8 * MiB
    assert value(before, "lamina_machines_connected") == 0

    # a machine connected, reading and writing: seen while its connection is open
    session = Session(served.url("machine/m1"))
    try:
        session.run("read 0 4M")
        session.run("write -P 0x41 8M 1M")

        def moved() -> bool:
            now = scrape(served, admin)
            return (
                value(now, "lamina_nbd_read_bytes_total", export="machine/m1") >= 4 * MiB
                and value(now, "lamina_nbd_written_bytes_total", export="machine/m1") >= MiB
            )

        wait_for(moved, 30)
        during = scrape(served, admin)
        assert value(during, "lamina_machines_connected") == 1
        assert value(during, "lamina_machine_boots_total") == 1  # its disk, not its seed
        assert value(during, "lamina_nbd_connections") >= 1
        assert value(during, "lamina_nbd_requests_total", export="machine/m1") >= 2
        assert value(during, "lamina_delta_bytes") >= MiB
    finally:
        session.close()

    # an image read whole by nbdcopy (4 connections, spread over both workers); a name
    # that is not served is refused and counted as such
    nbdcopy(served.url("base"), tmp_path / "copy.raw")
    missing = subprocess.run(["nbdinfo", served.url("nope")], capture_output=True, check=False)
    assert missing.returncode != 0
    httpx.get(
        f"{served.http_url}/api/v1/machines",
        headers={"Authorization": f"Bearer {admin}"},
        timeout=30,
    )

    def settled() -> bool:
        now = scrape(served, admin)
        return (
            value(now, "lamina_nbd_read_bytes_total", export="base") >= 8 * MiB
            and value(now, "lamina_errors_total", kind="refused") >= 1
            and value(now, "lamina_machines_connected") == 0
        )

    wait_for(settled, 30)
    after = scrape(served, admin)
    # the ended connection's counters stay
    assert value(after, "lamina_nbd_read_bytes_total", export="machine/m1") >= 4 * MiB
    # the HTTP histogram: cumulative buckets ending in +Inf = count, per route template
    route = {"method": "GET", "route": "/api/v1/machines"}
    count = value(after, "lamina_http_request_duration_seconds_count", **route)
    assert count == 1
    assert value(after, "lamina_http_request_duration_seconds_bucket", **route, le="+Inf") == count
    assert value(after, "lamina_http_responses_total", **route, code="200") == 1
    scrapes = value(
        after, "lamina_http_request_duration_seconds_count", method="GET", route="/metrics"
    )
    assert scrapes >= 4


def test_a_refused_agent_login_is_counted(served: Server, cli: Cli) -> None:
    token = cli.json("machine", "add", "m2", "--image", "base")["token"]  # given once
    admin = cli("admin", "token").out.strip()
    reply = httpx.post(
        f"{served.http_url}/api/v1/agent/login",
        json={"user": "nobody"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert reply.status_code >= 400
    now = scrape(served, admin)
    assert value(now, "lamina_logins_total", kind="agent", result="refused") == 1
    assert value(now, "lamina_logins_total", kind="agent", result="ok") == 0
