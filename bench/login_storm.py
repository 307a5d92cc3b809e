"""Login storm: N simulated agents (real HTTP) boot and log in as fast as the managers
allow, then log out.

    python bench/login_storm.py --agents 10000 [--managers 1] [--database sqlite|postgresql]

Set-up (not timed): N machines, N users in one group entitled to two app layers and a
base layer, so every login resolves three layers through a group and claims the user's
writable layer. Then C connections (keep-alive, spread over the managers) take agents
from one queue: POST /agent/boot, POST /agent/login (the timed latency), and, once every
agent is in, POST /agent/logout. The client is a minimal asyncio HTTP/1.1 client: httpx
costs more CPU per request than the manager does, and both share this machine's 2 cores.

"lost" counts agents whose login failed or whose session the database does not hold after
the storm (and sessions left after the logouts). Last line:

    login storm: N agents, ok N, lost 0, in S s, R logins/s, p50 A ms, p99 B ms
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LAMINA, free_port, run, scratch, wait_port


class Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, token: str, body: bytes = b""
    ) -> tuple[int, bytes]:
        for attempt in range(3):
            try:
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
                head = (
                    f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                    f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                self.writer.write(head + body)
                assert self.reader is not None
                status_line = await self.reader.readuntil(b"\r\n")
                length = 0
                while True:
                    line = await self.reader.readuntil(b"\r\n")
                    if line == b"\r\n":
                        break
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                data = await self.reader.readexactly(length)
                return int(status_line.split()[1]), data
            except (OSError, asyncio.IncompleteReadError):
                self.close()
                if attempt == 2:
                    raise
                await asyncio.sleep(0.05)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def run_python(code: str, env: dict[str, str]) -> str:
    """The output of ``code`` run by a fresh interpreter on the bench's lamina home."""
    return run(sys.executable, "-c", code, env=env)


def setup(home: Path, agents: int, env: dict[str, str]) -> list[str]:
    """Image, layers, users, group, entitlements, machines; returns the machine tokens."""
    work = home.parent
    disk = work / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    run(LAMINA, "init", env=env)
    run(LAMINA, "image", "import", "base", str(disk), env=env)
    for name in ("os", "office", "browser", "extra"):
        tree = work / "layers" / name / "opt" / name
        tree.mkdir(parents=True)
        (tree / "README").write_text(f"{name}\n")
        run(LAMINA, "layer", "import", name, str(tree.parent.parent), env=env)
    code = f"""
import json, sys
from lamina.manager.home import open_home
from lamina.manager.services import access, machines
h = open_home()
tokens = []
with h.session() as s:
    access.add_group(s, name="staff")
    for layer, prio in (("office", 100), ("browser", 100), ("os", 1000)):
        access.entitle(s, layer=layer, to=access.target(s, group="staff"), priority=prio)
with h.session() as s:
    for i in range({agents}):
        access.add_user(s, name=f"user{{i}}", groups=["staff"])
        tokens.append(machines.add(s, name=f"vm{{i}}", image="base").token)
json.dump(tokens, sys.stdout)
"""
    tokens: list[str] = json.loads(run_python(code, env))
    return tokens


def start_managers(
    home: Path, count: int, env: dict[str, str]
) -> list[tuple[subprocess.Popen[bytes], int]]:
    out = []
    for i in range(count):
        port = free_port()
        cmd = [LAMINA, "serve", "--no-nbd", "--http", f"127.0.0.1:{port}"]
        log = open(home.parent / f"manager{i}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=log)
        wait_port(port, proc)
        out.append((proc, port))
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def storm(
    ports: list[int],
    tokens: list[str],
    concurrency: int,
    between: Callable[[], Awaitable[None]] | None = None,
) -> tuple[list[float], int, float, list[float], int, float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(tokens)):
        queue.put_nowait(i)
    latencies: list[float] = []
    failed = 0
    conns = [Conn("127.0.0.1", ports[i % len(ports)]) for i in range(concurrency)]

    async def login_worker(conn: Conn) -> None:
        nonlocal failed
        while not queue.empty():
            i = queue.get_nowait()
            token = tokens[i]
            code, _ = await conn.request("POST", "/api/v1/agent/boot", token)
            started = time.perf_counter()
            body = json.dumps({"user": f"user{i}"}).encode()
            code2, _ = await conn.request("POST", "/api/v1/agent/login", token, body)
            latencies.append(time.perf_counter() - started)
            if code != 200 or code2 != 200:
                failed += 1

    started = time.perf_counter()
    await asyncio.gather(*(login_worker(c) for c in conns))
    login_seconds = time.perf_counter() - started
    if between is not None:
        await between()

    for i in range(len(tokens)):
        queue.put_nowait(i)
    out_latencies: list[float] = []
    out_failed = 0

    async def logout_worker(conn: Conn) -> None:
        nonlocal out_failed
        while not queue.empty():
            i = queue.get_nowait()
            body = json.dumps({"user": f"user{i}"}).encode()
            t0 = time.perf_counter()
            code, _ = await conn.request("POST", "/api/v1/agent/logout", tokens[i], body)
            out_latencies.append(time.perf_counter() - t0)
            if code != 200:
                out_failed += 1

    started = time.perf_counter()
    await asyncio.gather(*(logout_worker(c) for c in conns))
    logout_seconds = time.perf_counter() - started
    for c in conns:
        c.close()
    return latencies, failed, login_seconds, out_latencies, out_failed, logout_seconds


async def fanout(ports: list[int], tokens: list[str], admin: str) -> tuple[float, int]:
    """Every agent long-polls its desired state (one connection each); one entitlement
    to their group changes all of them: seconds until the last agent has heard."""
    conns = [Conn("127.0.0.1", ports[i % len(ports)]) for i in range(len(tokens))]
    revs: list[str] = []
    for i, conn in enumerate(conns):
        _, body = await conn.request("GET", "/api/v1/agent/desired", tokens[i])
        revs.append(json.loads(body)["rev"])
    heard: list[float] = []

    async def poll(i: int) -> None:
        path = f"/api/v1/agent/desired?wait=60&rev={revs[i]}"
        _, body = await conns[i].request("GET", path, tokens[i])
        if json.loads(body)["rev"] != revs[i]:
            heard.append(time.perf_counter())

    polls = [asyncio.create_task(poll(i)) for i in range(len(tokens))]
    await asyncio.sleep(3)  # every long-poll is waiting
    admin_conn = Conn("127.0.0.1", ports[0])
    body = json.dumps({"layer": "extra", "group": "staff"}).encode()
    started = time.perf_counter()
    code, _ = await admin_conn.request("POST", "/api/v1/entitlements", admin, body)
    assert code == 201, code
    await asyncio.gather(*polls)
    for c in [*conns, admin_conn]:
        c.close()
    return (max(heard) - started if heard else float("nan")), len(heard)


def count_sessions(env: dict[str, str]) -> int:
    code = """
from sqlalchemy import func, select
from lamina.manager.home import open_home
from lamina.manager.models import UserSession
with open_home().session() as s:
    print(s.scalar(select(func.count()).select_from(UserSession)))
"""
    return int(run_python(code, env).strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--managers", type=int, default=1)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--concurrency", type=int, default=64, help="connections in flight")
    parser.add_argument(
        "--fanout", action="store_true", help="also: every agent long-polls, one change"
    )
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    work = scratch("login-storm")
    home = work / "home"
    env = {"LAMINA_HOME": str(home)}
    cluster = None
    if args.database == "postgresql":
        from tests.pg import PgCluster

        cluster = PgCluster(work / "pg", durable=True).start()
        env["LAMINA_DATABASE_URL"] = cluster.url
    managers: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        t0 = time.perf_counter()
        tokens = setup(home, args.agents, env)
        print(f"set-up: {args.agents} machines and users in {time.perf_counter() - t0:.1f} s")
        managers = start_managers(home, args.managers, env)
        ports = [p for _, p in managers]
        admin = run(LAMINA, "admin", "token", env=env).strip()

        async def between() -> None:
            took, heard = await fanout(ports, tokens, admin)
            print(
                f"fan-out: {heard} of {len(tokens)} long-polling agents heard "
                f"one group entitlement in {took:.1f} s"
            )

        lat, failed, seconds, out_lat, out_failed, out_seconds = asyncio.run(
            storm(ports, tokens, args.concurrency, between if args.fanout else None)
        )
        # Sessions held after the logins were counted by the logouts that ended them.
        left = count_sessions(env)
        n = args.agents
        ok = n - failed
        lost = failed + out_failed + left
        print(
            f"logout: {n} agents, ok {n - out_failed}, in {out_seconds:.1f} s, "
            f"p50 {percentile(out_lat, 50) * 1000:.1f} ms, "
            f"p99 {percentile(out_lat, 99) * 1000:.1f} ms, sessions left {left}"
        )
        print(
            f"database {args.database}, {args.managers} manager(s), "
            f"{args.concurrency} connections, {os.cpu_count()} cores"
        )
        print(
            f"login storm: {n} agents, ok {ok}, lost {lost}, in {seconds:.1f} s, "
            f"{n / seconds:.0f} logins/s, p50 {percentile(lat, 50) * 1000:.1f} ms, "
            f"p99 {percentile(lat, 99) * 1000:.1f} ms"
        )
    finally:
        for proc, _ in managers:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in managers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
