"""Named admin accounts and the audit log, over a real `lamina serve` and real HTTP: a
helpdesk token reads and is refused every change (403) on the API and the console; every
change is in the audit log with who, how and from where, whichever front end made it,
and in the log as one JSON line; tokens rotate and die with their account."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import httpx

from lamina.cli.admin import parse_since
from tests.conftest import Cli, write_sparse
from tests.console.test_http import signed_in
from tests.servers import Server


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def up(server: Server) -> None:
    """Started, and answering (its ports take connections before its loop serves them)."""
    server.start()
    httpx.get(f"{server.http_url}/api/v1/health", timeout=120).raise_for_status()


def audit(cli: Cli, *args: str) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = cli.json("audit", *args)
    return rows


def test_accounts_roles_and_audit_over_http(cli: Cli, server: Server, tmp_path: Path) -> None:
    image = write_sparse(tmp_path / "base.raw", 4 << 20, [(0, os.urandom(1 << 20))])
    cli("image", "import", "base", str(image))
    cli("machine", "add", "m1", "--image", "base")
    alice = cli.json("admin", "account", "add", "alice")["token"]
    bob = cli.json("admin", "account", "add", "bob", "--role", "helpdesk")["token"]
    listed = cli.json("admin", "account", "list")
    assert [(a["name"], a["role"]) for a in listed] == [
        ("admin", "admin"),
        ("alice", "admin"),
        ("bob", "helpdesk"),
    ]
    assert cli("admin", "account", "add", "bob", check=False).code == 4
    bad = cli("admin", "account", "add", "carol", "--role", "root", check=False)
    assert bad.code == 5 and "bad role 'root'" in bad.err

    up(server)
    api = f"{server.http_url}/api/v1"
    with httpx.Client(timeout=30) as http:
        # helpdesk: reads the admin API and /metrics, changes nothing
        assert http.get(f"{api}/machines", headers=bearer(bob)).status_code == 200
        assert http.get(f"{api}/machines/m1", headers=bearer(bob)).status_code == 200
        assert http.get(f"{server.http_url}/metrics", headers=bearer(bob)).status_code == 200
        body = {"name": "m2", "image": "base"}
        refused = http.post(f"{api}/machines", json=body, headers=bearer(bob))
        assert refused.status_code == 403 and "read-only" in refused.text
        assert http.post(f"{api}/machines/m1/reset", headers=bearer(bob)).status_code == 403
        assert http.delete(f"{api}/machines/m1", headers=bearer(bob)).status_code == 403
        assert (
            http.post(f"{api}/users", json={"name": "u1"}, headers=bearer(bob)).status_code == 403
        )
        # an admin account changes things, and is named in the audit log
        assert http.post(f"{api}/machines", json=body, headers=bearer(alice)).status_code == 201
        # the first token (lamina admin token) is the built-in account admin
        first = cli("admin", "token").out.strip()
        assert (
            http.post(f"{api}/users", json={"name": "u1"}, headers=bearer(first)).status_code == 201
        )

    entries = audit(cli)
    assert [(e["action"], e["target"], e["actor"], e["via"]) for e in entries[:2]] == [
        ("user.add", "u1", "admin", "api"),
        ("machine.add", "m2", "alice", "api"),
    ]
    assert entries[1]["address"] == "127.0.0.1"
    assert entries[1]["detail"] == {"image": "base@1", "mode": "stateless"}
    # the CLI on the home records as the local user; accounts' changes are there too
    by_cli = [e for e in entries if e["via"] == "cli"]
    assert {e["action"] for e in by_cli} >= {"image.version", "machine.add", "account.add"}
    assert all(e["address"] == "local" for e in by_cli)
    assert all(str(e["at"]).endswith("Z") for e in entries)
    # nothing was recorded for what the helpdesk account was refused
    assert not [e for e in entries if e["actor"] == "bob"]
    # the log: refusals and admin actions as JSON lines
    lines = [json.loads(x) for x in server.log_lines() if x.startswith("{")]
    assert any(x["event"] == "refused" and x.get("account") == "bob" for x in lines)
    assert any(
        x["event"] == "admin-action" and x["actor"] == "alice" and x["action"] == "machine.add"
        for x in lines
    )

    # a new token for alice: the old one stops working; bob removed: his token is dead
    new = cli.json("admin", "account", "token", "alice")["token"]
    cli("admin", "account", "rm", "bob")
    with httpx.Client(timeout=30) as http:
        assert http.get(f"{api}/machines", headers=bearer(alice)).status_code == 401
        assert http.get(f"{api}/machines", headers=bearer(new)).status_code == 200
        assert http.get(f"{api}/machines", headers=bearer(bob)).status_code == 401
    lines = [json.loads(x) for x in server.log_lines() if x.startswith("{")]
    dead = [x for x in lines if x.get("reason") == "invalid token"]
    assert len(dead) == 2 and dead[0]["address"] == "127.0.0.1"
    assert dead[0]["path"] == "/api/v1/machines"
    assert cli("admin", "account", "rm", "admin", check=False).code == 5
    assert [e["action"] for e in audit(cli, "--limit", "2")] == ["account.remove", "account.token"]


def test_console_records_its_account_and_refuses_helpdesk(
    cli: Cli, server: Server, tmp_path: Path
) -> None:
    image = write_sparse(tmp_path / "base.raw", 4 << 20, [(0, os.urandom(1 << 20))])
    cli("image", "import", "base", str(image))
    cli("machine", "add", "m1", "--image", "base")
    carol = cli.json("admin", "account", "add", "carol")["token"]
    dave = cli.json("admin", "account", "add", "dave", "--role", "helpdesk")["token"]
    up(server)
    with signed_in(server.http_url, dave) as (client, csrf):
        assert client.get("/machines").status_code == 200
        assert client.post("/machines/m1/reset", data={"csrf": csrf}).status_code == 403
        assert client.post("/logout", data={"csrf": csrf}).status_code == 303
    with signed_in(server.http_url, carol) as (client, csrf):
        assert client.post("/machines/m1/reset", data={"csrf": csrf}).status_code == 303
        page = client.get("/audit")
        assert page.status_code == 200 and "machine.reset" in page.text and "carol" in page.text
    top = audit(cli, "--since", "10m")[0]
    assert (top["action"], top["target"], top["actor"], top["via"]) == (
        "machine.reset",
        "m1",
        "carol",
        "console",
    )
    assert audit(cli, "--since", "2999-01-01T00:00:00Z") == []
    bad = cli("audit", "--since", "yesterday", check=False)
    assert bad.code == 2 and "bad --since 'yesterday'" in bad.err


def test_since_durations_and_times() -> None:
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    assert parse_since("30m", now) == datetime(2026, 12, 7, 11, 30, tzinfo=UTC)
    assert parse_since("2d", now) == datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    assert parse_since("2026-12-01T08:00:00") == datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def test_a_database_of_the_previous_schema_gains_the_tables(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import inspect

    from lamina.manager import db

    engine = db.make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    cfg = db._config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0011")
    assert db.current_revision(engine) == "0011"
    db.migrate(engine)
    assert db.current_revision(engine) == db.SCHEMA_HEAD == "0013"
    assert {"admin_accounts", "audit_log"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_credentials_issued_and_revoked_are_audited(cli: Cli, tmp_path: Path) -> None:
    image = write_sparse(tmp_path / "base.raw", 4 << 20, [(0, os.urandom(1 << 20))])
    cli("image", "import", "base", str(image))
    cli("machine", "add", "m1", "--image", "base")
    cli("machine", "credentials", "m1", "--out", str(tmp_path / "c1"))
    cli("machine", "credentials", "m1", "--out", str(tmp_path / "c2"), "--rotate")
    top = audit(cli, "--limit", "3")
    assert [(e["action"], e["target"]) for e in top] == [
        ("credential.issue", "machine m1"),
        ("credential.revoke", "machine m1"),
        ("credential.issue", "machine m1"),
    ]
    assert top[0]["detail"]["rotate"] is True and top[1]["detail"] == {"revoked": 1}
    text = cli("audit").out
    assert "credential.issue" in text and "machine m1" in text
