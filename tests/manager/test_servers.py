"""Block servers in the database: registration, least-loaded assignment, a lost server's
stateless machines moved, stateful ones kept; what `machine show` and the API say."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from lamina.home import Home
from lamina.manager.admin import HomeAdmin
from lamina.manager.models import BlockServer, utcnow
from lamina.manager.services import machines, servers
from tests.conftest import Cli, write_sparse


def _image(cli: Cli, tmp_path: Path) -> None:
    raw = write_sparse(tmp_path / "disk.raw", 1 << 20, [(0, b"boot")])
    cli("image", "import", "base", str(raw))


def _lose(home: Home, name: str) -> None:
    with home.session() as session:
        session.execute(
            update(BlockServer)
            .where(BlockServer.name == name)
            .values(heartbeat_at=utcnow() - timedelta(seconds=60))
        )


def test_machines_go_to_the_least_loaded_and_leave_a_lost_server_when_stateless(
    home: Home, cli: Cli, tmp_path: Path
) -> None:
    _image(cli, tmp_path)
    with home.session() as session:
        assert machines.add(session, name="lone", image="base").machine.server_id is None
        servers.register(session, name="bs1", nbd_address="10.0.0.1:10809")
        servers.register(session, name="bs2", nbd_address="10.0.0.2:10809")
        for i in range(4):
            machines.add(session, name=f"m{i}", image="base")
        machines.add(session, name="keep", image="base", mode="stateful")
    with home.session() as session:
        found = {n: servers.assigned(session, machines.get(session, n)) for n in
                 ("m0", "m1", "m2", "m3", "keep")}  # fmt: skip
        assert sorted(a.name for a in found.values() if a) == ["bs1", "bs1", "bs1", "bs2", "bs2"]
        # the one added before any server is assigned when a client first asks for it
        lone = servers.server_for(session, "lone")
        assert lone is not None and lone.name == "bs2" and lone.live
    on_bs1 = [n for n, a in found.items() if a and a.name == "bs1"]
    _lose(home, "bs1")
    with home.session() as session:
        moved = servers.sweep(session)
    stateful_on_bs1 = "keep" in on_bs1
    assert moved == len(on_bs1) - stateful_on_bs1
    admin = HomeAdmin(home)
    for name in on_bs1:
        detail = admin.show_machine(name)
        if name == "keep":
            assert (detail.server, detail.server_live) == ("bs1", False)
        else:
            assert (detail.server, detail.nbd_server, detail.server_live) == (
                "bs2",
                "10.0.0.2:10809",
                True,
            )
    shown = cli.json("machine", "show", "m0")
    assert shown["server"] in ("bs1", "bs2") and shown["nbd_server"].endswith(":10809")
    listed = {r["name"]: r["server"] for r in cli.json("machine", "list")}
    assert listed["keep"] == "bs1" and set(listed.values()) == {"bs1", "bs2"}
    assert "SERVER" in cli("machine", "list").out


def test_a_clean_stop_moves_stateless_machines_at_once(
    home: Home, cli: Cli, tmp_path: Path
) -> None:
    _image(cli, tmp_path)
    with home.session() as session:
        servers.register(session, name="bs1", nbd_address="a:1")
        machines.add(session, name="m", image="base")
        servers.register(session, name="bs2", nbd_address="b:1")
    with home.session() as session:
        servers.stop(session, name="bs1")
    with home.session() as session:
        assert servers.server_for(session, "m") == servers.Assigned("bs2", "b:1", True)


def test_joining_needs_a_postgresql_that_belongs_to_a_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LAMINA_DATABASE_URL", raising=False)
    refused = Cli(tmp_path / "joining")("init", "--join", check=False)
    assert refused.code == 2 and "needs the cluster's PostgreSQL" in refused.err
    assert not (tmp_path / "joining" / "home.json").exists()
