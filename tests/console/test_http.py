"""The console over real HTTP (httpx against `lamina serve`): sign-in rules, sessions, the
CSRF guard on every action, the machine actions, offline assets, and paging at 1,200
machines."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from lamina.delta.file import delta_usage
from lamina.manager.home import open_home
from tests.conftest import Cli, write_sparse
from tests.console.conftest import Fleet, login_url
from tests.nbdtools import ok, qemu_io
from tests.servers import Server

_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)">')

# Every state-changing console endpoint, with a form that would otherwise be valid.
ACTIONS = [
    ("/machines/m1/reset", {}),
    ("/machines/m1/commit", {}),
    ("/machines/m1/repin", {"image": "base@1"}),
    ("/machines/m1/move", {"to": "b"}),
    ("/layers/office/entitle", {"kind": "user", "target": "bob"}),
    ("/layers/office/unentitle", {"id": "1"}),
    ("/logout", {}),
]


@contextmanager
def signed_in(base: str, token: str) -> Iterator[tuple[httpx.Client, str]]:
    """A client holding a console session (signed in with ``token``) and its CSRF token."""
    with httpx.Client(base_url=base) as client:
        answer = client.post("/login", data={"token": token})
        assert answer.status_code == 303 and answer.headers["location"] == "/"
        page = client.get("/")
        assert page.status_code == 200
        found = _CSRF.search(page.text)
        assert found is not None
        yield client, found.group(1)


def test_sign_in_sessions_and_csrf(fleet: Fleet) -> None:
    fleet.server.start()
    base = fleet.base
    with httpx.Client(base_url=base) as anonymous:
        # without a session: pages send to the login page, fragments and actions answer 401
        assert anonymous.get("/machines").status_code == 303
        assert anonymous.get("/machines").headers["location"] == "/login"
        assert anonymous.get("/live/machines").status_code == 401
        assert anonymous.post("/machines/m1/reset").status_code == 401
        assert anonymous.get("/login?token=nope").status_code == 401
        assert anonymous.post("/login", data={"token": "nope"}).status_code == 401
        assert "set-cookie" not in anonymous.post("/login", data={"token": "x"}).headers
        # the printed URL signs in once; the cookie is HttpOnly and SameSite=Strict
        url = login_url(fleet.server)
        first = anonymous.get(url)
        assert first.status_code == 303
        cookie = first.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert anonymous.get(url).status_code == 401

    with signed_in(base, fleet.admin_token()) as (client, csrf):
        page = client.get("/machines")
        assert page.status_code == 200
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        # every action refuses a missing or wrong token, and one from another origin
        for path, form in ACTIONS:
            assert client.post(path, data=form).status_code == 403, path
            assert client.post(path, data=form | {"csrf": csrf[:-1]}).status_code == 403, path
            cross = client.post(
                path, data=form | {"csrf": csrf}, headers={"Origin": "http://evil.example"}
            )
            assert cross.status_code == 403, path
        # the header form of the token works for scripts
        ok = client.post("/machines/m1/reset", headers={"X-CSRF-Token": csrf})
        assert ok.status_code == 303
        # next= never leaves the site
        away = client.post("/machines/m1/reset", data={"csrf": csrf, "next": "//evil.example/"})
        assert away.headers["location"] == "/machines"
        # sign out: the session is gone for good
        assert client.post("/logout", data={"csrf": csrf}).status_code == 303
    with httpx.Client(base_url=base) as other:
        other.cookies.update(client.cookies)
        assert other.get("/live/dashboard").status_code == 401


def test_login_token_works_once_across_managers(cli: Cli, tmp_path: Path) -> None:
    """Tokens live in the database: one manager's printed URL opens the console on
    another manager over the same database, and only once."""
    src = write_sparse(tmp_path / "d.raw", 1 << 20, [(0, b"x" * 4096)])
    cli("image", "import", "base", str(src))
    first = Server(cli.home, tmp_path / "a.log")
    second = Server(cli.home, tmp_path / "b.log", nbd=False)
    try:
        first.start()
        second.start()
        url = login_url(first)
        on_second = url.replace(f":{first.http_port}/", f":{second.http_port}/")
        assert httpx.get(on_second).status_code == 303
        assert httpx.get(url).status_code == 401
    finally:
        first.stop()
        second.stop()


def _flash(client: httpx.Client, page: str) -> str:
    found = re.search(r'<p class="flash (\w+)" role="status">([^<]*)</p>', client.get(page).text)
    assert found is not None
    return f"{found.group(1)}: {found.group(2)}"


def test_commit_and_repin(fleet: Fleet) -> None:
    fleet.server.start()
    ok(qemu_io(fleet.server.url("machine/m2"), "write -P 7 1M 8k"))
    with signed_in(fleet.base, fleet.admin_token()) as (client, csrf):
        client.post("/machines/m2/commit", data={"csrf": csrf})
        assert _flash(client, "/machines") == "ok: m2: delta committed as base@2 (1 chunks changed)"
        assert delta_usage(fleet.cli.home / "deltas" / "m2")[0] == 2  # kept: not re-pinned
        # committing an empty delta makes no new version
        client.post("/machines/m1/commit", data={"csrf": csrf})
        assert _flash(client, "/machines") == "ok: m1: unchanged, base@1"
        # re-pin m2 (stateful) to the new version: its delta (made on base@1) would go, so
        # the console asks first, and nothing changes until it is confirmed
        asked = client.post("/machines/m2/repin", data={"csrf": csrf, "image": "base@2"})
        assert asked.status_code == 200 and "Confirm: Re-pin m2" in asked.text
        assert "its delta holds 8.0 KiB that re-pinning it to base@2 would discard" in asked.text
        assert fleet.cli.json("machine", "show", "m2")["image"] == "base@1"
        form = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', asked.text))
        assert form["confirm"] == "1" and form["image"] == "base@2"
        client.post("/machines/m2/repin", data=form)
        assert _flash(client, "/machines") == (
            "ok: m2: base@2, stateful, hostname m2, identity rev 2; delta discarded"
        )
        assert delta_usage(fleet.cli.home / "deltas" / "m2") == (0, 0)
        assert fleet.cli.json("machine", "show", "m2")["image"] == "base@2"
        client.post("/machines/m2/repin", data={"csrf": csrf, "image": "base@9"})
        assert _flash(client, "/machines") == "error: Re-pin m2: no image version base@9"
        # the new version reads back what m2 wrote
        ok(qemu_io(fleet.server.url("base@2"), "read -P 7 1M 8k", read_only=True))
        images = client.get("/images").text
        assert re.search(r"<td>base@2</td>", images)


def test_every_page_and_asset(database: str, fleet: Fleet) -> None:
    """Every page, fragment and asset on SQLite and on PostgreSQL (sessions, tokens and
    messages live in the database); pages reference nothing but lamina's own paths."""
    fleet.server.start()
    with httpx.Client(base_url=fleet.base) as client:
        assert client.get(login_url(fleet.server)).status_code == 303
        found = _CSRF.search(client.get("/").text)
        assert found is not None
        client.post(
            "/layers/office/entitle",
            data={"csrf": found.group(1), "kind": "group", "target": "staff", "version": "1"},
        )
        assert _flash(client, "/layers/office") == "ok: entitled office@1 to group staff"
        for page in (
            "/",
            "/machines",
            "/machines?image=base&mode=stateful&q=m",
            "/machines/m2",
            "/images",
            "/layers",
            "/layers/office",
            "/users",
            "/users?group=staff",
            "/groups",
        ):
            html = client.get(page)
            assert html.status_code == 200, page
            for ref in re.findall(r'(?:src|href)="([^"]*)"', html.text):
                assert ref.startswith(("/", "#")) and not ref.startswith("//"), (page, ref)
        assert "staff" in client.get("/groups").text and "office" in client.get("/groups").text
        for fragment in ("dashboard", "machines", "images", "users", "groups"):
            live = client.get(f"/live/{fragment}")
            assert live.status_code == 200 and live.json(), fragment
        assert client.get("/live/users").json()["rows"]["alice"]["sessions"] == "—"
        for name, kind in (("console.css", "text/css"), ("console.js", "text/javascript")):
            asset = client.get(f"/static/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
            again = client.get(f"/static/{name}", headers={"If-None-Match": asset.headers["etag"]})
            assert again.status_code == 304
        assert client.get("/static/../auth.py").status_code == 404
        assert client.get("/machines/nope").status_code == 404
        assert client.get("/layers/nope").status_code == 404
        assert client.get("/images", params={"per": 201}).status_code == 422  # smaller pages
        assert client.get("/users", params={"per": 501}).status_code == 422


@pytest.mark.slow
def test_pages_at_1200_machines(cli: Cli, server: Server, tmp_path: Path) -> None:
    from lamina.manager.services import access, machines

    src = write_sparse(tmp_path / "d.raw", 1 << 20, [(0, b"x" * 4096)])
    cli("image", "import", "base", str(src))
    cli("image", "import", "other", str(src))
    home = open_home(cli.home)
    try:
        with home.session() as db:
            for i in range(1200):
                machines.add(db, name=f"m{i:04d}", image="base" if i < 1000 else "other")
            for i in range(1100):
                access.add_user(db, name=f"u{i:04d}")
    finally:
        home.close()
    server.start()
    base = server.http_url
    with signed_in(base, cli("admin", "token").out.strip()) as (client, _csrf):
        started = time.monotonic()
        page = client.get("/machines", params={"page": 7, "per": 100})
        elapsed = time.monotonic() - started
        rows = re.findall(r'<tr data-key="(m\d{4})">', page.text)
        assert rows == [f"m{i:04d}" for i in range(600, 700)]
        assert '<span data-field="total">1,200</span>' in page.text
        assert elapsed < 2.0, elapsed
        # filters run in the database and page too
        other = client.get("/machines", params={"image": "other", "per": 25})
        assert re.findall(r'<tr data-key="(m\d{4})">', other.text)[:2] == ["m1000", "m1001"]
        assert '<span data-field="total">200</span>' in other.text
        named = client.get("/machines", params={"q": "m11"})
        assert '<span data-field="total">100</span>' in named.text
        live = client.get("/live/machines", params={"page": 7, "per": 100}).json()
        assert live["keys"] == rows and live["fields"]["total"] == "1,200"
        users = client.get("/users", params={"page": 22})
        assert re.findall(r'<tr data-key="(u\d{4})">', users.text) == [
            f"u{i:04d}" for i in range(1050, 1100)
        ]
        started = time.monotonic()
        dash = client.get("/live/dashboard").json()
        assert time.monotonic() - started < 2.0
        assert dash["fields"]["machines"] == "1,200" and dash["fields"]["users"] == "1,100"
