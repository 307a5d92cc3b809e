"""Two managers over one PostgreSQL act as one: same answers, a change made through one
wakes agents long-polling the other, and killing one during a login storm loses nothing
(agents retry on the other; a login the dead manager committed is found again)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from lamina.home import Home
from lamina.manager.home import init_home
from lamina.manager.layer_records import DatabaseRecords
from tests.conftest import LAMINA
from tests.pg import PgCluster, fresh_database
from tests.servers import free_port, wait_port

AGENTS = 60


class Manager:
    def __init__(self, home: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [LAMINA, "serve", "--no-nbd", "--http", f"127.0.0.1:{self.port}"],
                env={**os.environ, "LAMINA_HOME": str(home)},
                stdout=out,
                stderr=out,
            )
        wait_port(self.port, self.proc)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


@pytest.fixture
def managers(
    pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[Home, list[Manager]]]:
    monkeypatch.setenv("LAMINA_DATABASE_URL", fresh_database(pg_cluster))
    home = init_home(tmp_path / "home").home  # one home, its database in PostgreSQL
    started: list[Manager] = []
    try:
        yield home, started
    finally:
        for m in started:
            m.stop(signal.SIGKILL)
        home.close()


def setup(home: Home, tmp_path: Path) -> tuple[str, list[str]]:
    from lamina.layer.importer import import_layer
    from lamina.manager.services import access, images, machines, settings
    from tests.conftest import write_sparse

    disk = write_sparse(tmp_path / "d.raw", 1 << 20, [])
    images.import_image(store=home.store, session=home.session, name="base", path=disk)
    for name in ("os", "app"):
        src = tmp_path / "src" / name / "opt" / name
        src.mkdir(parents=True)
        (src / "f").write_text(name)
        import_layer(home, DatabaseRecords(home), name, src.parent.parent)
    with home.session() as s:
        access.add_group(s, name="staff")
        access.entitle(s, layer="os", to=access.target(s, group="staff"), priority=1000)
        tokens = []
        for i in range(AGENTS):
            access.add_user(s, name=f"user{i}", groups=["staff"])
            tokens.append(machines.add(s, name=f"vm{i}", image="base").token)
        admin = settings.admin_token(s)
    return admin, tokens


def test_two_managers_agree_and_survive_a_kill(
    managers: tuple[Home, list[Manager]], tmp_path: Path
) -> None:
    home, started = managers
    admin, tokens = setup(home, tmp_path)
    a, b = Manager(home.root, tmp_path / "a.log"), Manager(home.root, tmp_path / "b.log")
    started += [a, b]
    auth = {"Authorization": f"Bearer {admin}"}

    # a session opened through A, long-polled through B, changed through A
    agent0 = {"Authorization": f"Bearer {tokens[0]}"}
    assert (
        httpx.post(
            f"{a.url}/api/v1/agent/login", json={"user": "user0"}, headers=agent0
        ).status_code
        == 200
    )
    rev = httpx.get(f"{b.url}/api/v1/agent/desired", headers=agent0).json()["rev"]
    threading.Timer(
        0.3,
        lambda: httpx.post(
            f"{a.url}/api/v1/entitlements", json={"layer": "app", "user": "user0"}, headers=auth
        ),
    ).start()
    started_at = time.monotonic()
    changed = httpx.get(
        f"{b.url}/api/v1/agent/desired", params={"wait": 10, "rev": rev}, headers=agent0, timeout=20
    ).json()
    assert changed["rev"] != rev and time.monotonic() - started_at < 2.0
    assert [la["ref"] for la in changed["sessions"][0]["layers"]] == ["app@1", "os@1"]
    assert (
        httpx.get(f"{a.url}/api/v1/users/user0", headers=auth).json()
        == httpx.get(f"{b.url}/api/v1/users/user0", headers=auth).json()
    )

    # a login storm over both; A is killed half-way; agents fail over to B
    urls = [a.url, b.url]
    done = threading.Event()
    count = 0
    lock = threading.Lock()

    def login(i: int) -> int:
        nonlocal count
        headers = {"Authorization": f"Bearer {tokens[i]}"}
        order = urls if i % 2 else urls[::-1]
        for attempt in range(40):
            url = order[attempt % 2]
            try:
                r = httpx.post(
                    f"{url}/api/v1/agent/login",
                    json={"user": f"user{i}"},
                    headers=headers,
                    timeout=10,
                )
            except httpx.TransportError:
                continue
            if r.status_code == 200:
                with lock:
                    count += 1
                    if count == AGENTS // 2:
                        done.set()
                return 200
            return r.status_code
        return 0

    killer = threading.Thread(target=lambda: (done.wait(30), a.stop(signal.SIGKILL)))
    killer.start()
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(login, range(AGENTS)))
    killer.join()
    assert a.proc.poll() is not None  # A really died during the storm
    assert codes == [200] * AGENTS
    sessions = httpx.get(f"{b.url}/api/v1/sessions", params={"limit": 1000}, headers=auth).json()
    assert sessions["total"] == AGENTS
    assert sorted((s["user"], s["machine"]) for s in sessions["items"]) == sorted(
        (f"user{i}", f"vm{i}") for i in range(AGENTS)
    )
    # every writable layer is held once, by its owner's machine; logouts end them all
    users = httpx.get(f"{b.url}/api/v1/users", params={"limit": 1000}, headers=auth).json()["items"]
    assert all(u["in_use_on"] == f"vm{u['name'][4:]}" for u in users)
    for i in range(AGENTS):
        r = httpx.post(
            f"{b.url}/api/v1/agent/logout",
            json={"user": f"user{i}"},
            headers={"Authorization": f"Bearer {tokens[i]}"},
        )
        assert r.json()["ended"] is True
    assert httpx.get(f"{b.url}/api/v1/sessions", headers=auth).json()["total"] == 0
