"""The agent's login/logout bookkeeping against a scripted manager (no mounts, no HTTP):
when a failed login gives the session back, and how pending logouts are flushed."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lamina import logs
from lamina.agent import daemon, fetch
from lamina.agent.daemon import Agent
from lamina.errors import Conflict, CorruptObject, LaminaError, ProtocolError, Unreachable
from lamina.home import Home
from lamina.layer import roots
from lamina.manager.client import ManagerClient
from tests.conftest import Cli

Answer = Callable[[dict[str, Any]], Any]


class Manager:
    """Answers ``json(method, path, ...)`` from a table; records every call."""

    def __init__(self, answers: dict[tuple[str, str], Answer]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        body = kwargs.get("json") or {}
        self.calls.append((method, path, body))
        return self.answers[(method, path)](body)

    def users(self, method: str, path: str) -> list[str]:
        return [b.get("user", "") for m, p, b in self.calls if (m, p) == (method, path)]


def make_agent(home: Home, manager: Manager, root: Path) -> tuple[Agent, io.StringIO]:
    out = io.StringIO()
    log = logs.setup(stream=out)
    client: ManagerClient = manager  # type: ignore[assignment]  # the calls the agent makes
    return Agent(home, client, root, log=log), out


def events(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def login_state(body: dict[str, Any]) -> dict[str, Any]:
    layer = {"name": "app", "version": 2, "ref": "app@2", "manifest": "00" * 32}
    return {"user": body["user"], "layers": [layer], "writable": None}


def ended(body: dict[str, Any]) -> dict[str, Any]:
    return {"user": body["user"], "ended": True, "saved": None}


def broken_fetch(*_args: Any, **_kwargs: Any) -> fetch.Fetched:
    raise CorruptObject("chunk arrived corrupt three times")


# -- a login that fails ------------------------------------------------------------------------


def test_a_failed_repeated_login_keeps_the_session_of_a_mounted_root(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "sessions"
    mounted = [SimpleNamespace(root=str(root / "alice"), layers=["app@1"], writable=None)]
    monkeypatch.setattr(roots, "mounts", lambda _home, _records: mounted)
    monkeypatch.setattr(fetch, "ensure_version", broken_fetch)
    manager = Manager({("POST", "/agent/login"): login_state, ("POST", "/agent/logout"): ended})
    agent, _ = make_agent(home, manager, root)
    with pytest.raises(CorruptObject):
        agent.login("alice")  # app@2 was entitled meanwhile and cannot be fetched
    # alice's root is still mounted with her writable layer: her session stays
    assert manager.users("POST", "/agent/login") == ["alice"]
    assert manager.users("POST", "/agent/logout") == []


def test_a_failed_first_login_gives_the_session_back(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(roots, "mounts", lambda _home, _records: [])
    monkeypatch.setattr(fetch, "ensure_version", broken_fetch)
    manager = Manager({("POST", "/agent/login"): login_state, ("POST", "/agent/logout"): ended})
    agent, _ = make_agent(home, manager, tmp_path / "sessions")
    with pytest.raises(CorruptObject):
        agent.login("alice")
    assert manager.users("POST", "/agent/logout") == ["alice"]  # nothing mounted here


# -- pending logouts ---------------------------------------------------------------------------


def pending(agent: Agent, *users: str) -> None:
    agent.pending_dir.mkdir(parents=True, exist_ok=True)
    for user in users:
        (agent.pending_dir / f"{user}.json").write_text(json.dumps({"saved": None}))


def test_a_refused_pending_logout_is_parked_and_blocks_neither_the_others_nor_the_poll(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def logout(body: dict[str, Any]) -> dict[str, Any]:
        if body["user"] == "bob":
            raise Conflict("bob has no session on m1: nothing to save into")
        if body["user"] == "dave":
            raise ProtocolError("manager answered 418: not now")
        return ended(body)

    def desired(_body: dict[str, Any]) -> dict[str, Any]:
        agent.stopping.set()  # one round is enough
        return {"rev": "r1", "sessions": []}

    manager = Manager({("POST", "/agent/logout"): logout, ("GET", "/agent/desired"): desired})
    agent, out = make_agent(home, manager, tmp_path / "sessions")
    reconciled: list[dict[str, Any]] = []

    def reconcile(state: dict[str, Any]) -> list[str]:
        reconciled.append(state)
        return []

    monkeypatch.setattr(agent, "reconcile", reconcile)
    pending(agent, "bob", "carol", "dave")

    guard = threading.Timer(10, agent.stopping.set)  # a loop stuck on bob ends, and fails
    guard.start()
    try:
        agent.poll_forever()
    finally:
        guard.cancel()
    # bob's was refused for good, dave's failed this time: carol's went through all the same,
    # and the desired state was polled and applied
    assert manager.users("POST", "/agent/logout") == ["bob", "carol", "dave"]
    assert [p for _, p, _ in manager.calls][-1] == "/agent/desired"
    assert reconciled == [{"rev": "r1", "sessions": []}] and agent.rev == "r1"
    # bob's is out of the queue, kept with the manager's reason; dave's is retried later
    assert sorted(p.name for p in agent.pending_dir.glob("*.json")) == ["dave.json"]
    (parked,) = list(daemon.failed_dir(home).glob("bob.*.json"))
    record = json.loads(parked.read_text())
    assert record["user"] == "bob" and record["refused"] == "Conflict"
    assert "no session on m1" in record["reason"]
    seen = {e["event"]: e for e in events(out)}
    assert seen["logout refused"]["level"] == "warning"
    assert seen["logout refused"]["user"] == "bob"
    assert seen["pending logout failed"]["user"] == "dave"

    # the next round tries dave's only
    agent.stopping.clear()
    manager.calls.clear()
    agent.poll_forever()
    assert manager.users("POST", "/agent/logout") == ["dave"]

    # and lamina agent status shows both
    status = Cli(home.root).json("agent", "status")
    assert status["pending_logouts"] == ["dave"]
    assert [(r["user"], r["refused"]) for r in status["refused_logouts"]] == [("bob", "Conflict")]
    assert "bob" in Cli(home.root)("agent", "status").out


def test_a_manager_away_for_one_pending_logout_does_not_hold_up_the_rest(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon, "BACKOFF_FIRST", 0.01)

    def logout(body: dict[str, Any]) -> dict[str, Any]:
        if body["user"] == "bob":
            raise Unreachable("manager: 502 bad gateway")
        return ended(body)

    manager = Manager({("POST", "/agent/logout"): logout})
    agent, _ = make_agent(home, manager, tmp_path / "sessions")
    pending(agent, "bob", "carol")
    agent.flush_all_pending(timeout=0.2)
    assert manager.users("POST", "/agent/logout")[-1] == "carol"
    assert sorted(p.stem for p in agent.pending_dir.glob("*.json")) == ["bob"]
    assert not daemon.failed_dir(home).exists()  # not refused: retried later


def test_a_refused_logout_is_reported_to_the_user_and_kept(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def logout(body: dict[str, Any]) -> dict[str, Any]:
        raise Conflict(f"{body['user']} has no session on m1: nothing to save into")

    monkeypatch.setattr(roots, "mounts", lambda _home, _records: [])
    manager = Manager({("POST", "/agent/logout"): logout})
    agent, _ = make_agent(home, manager, tmp_path / "sessions")
    with pytest.raises(LaminaError, match=r"no session on m1.*kept in"):
        agent.logout("erin")
    assert not (agent.pending_dir / "erin.json").exists()
    assert len(list(daemon.failed_dir(home).glob("erin.*.json"))) == 1
