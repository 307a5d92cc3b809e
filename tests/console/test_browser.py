"""The console in real headless Chromium against a real `lamina serve`: sign in with the
printed URL, watch a machine's delta grow and drop to zero live, entitle a layer, hostile
text rendered as text, and actions refused without the CSRF token. One browser session
walks through the steps in order (each step starts from what the previous one left)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from lamina.delta.file import delta_usage
from tests.console.conftest import HOSTILE_IMG, HOSTILE_SCRIPT, Fleet, login_url
from tests.nbdtools import ok, qemu_io

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Locator, Page

pytestmark = [pytest.mark.peers]

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _cell(page: Page, machine: str, field: str) -> Locator:
    return page.locator(f'#machines tr[data-key="{machine}"] [data-field="{field}"]')


def _qemu_io(url: str) -> subprocess.Popen[str]:
    """qemu-io holding an NBD connection open, taking commands on stdin."""
    return subprocess.Popen(
        ["qemu-io", "-f", "raw", url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _settle(page: Page) -> None:
    """Let the highlight of freshly updated cells fade before a screenshot."""
    page.wait_for_timeout(1300)


def test_console_in_chromium(fleet: Fleet, chromium: BrowserContext) -> None:
    fleet.server.start()
    # m2's agent reports a boot and alice logs in there: a session for the pages to show.
    with httpx.Client(base_url=f"{fleet.base}/api/v1") as api:
        auth = {"Authorization": f"Bearer {fleet.tokens['m2']}"}
        assert api.post("/agent/boot", headers=auth).status_code == 200
        assert api.post("/agent/login", headers=auth, json={"user": "alice"}).status_code == 200

    dialogs: list[str] = []
    page = chromium.new_page()
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    sign_in(fleet, chromium, page)
    watch_delta_then_reset(fleet, page)
    entitle_layer(fleet, page)
    hostile_text_is_text(fleet, page)
    actions_need_the_csrf_token(fleet, page)
    assert dialogs == []


def sign_in(fleet: Fleet, chromium: BrowserContext, page: Page) -> None:
    from playwright.sync_api import expect

    url = login_url(fleet.server)
    page.goto(url)
    assert page.url == f"{fleet.base}/"
    expect(page.locator("h1")).to_have_text("Dashboard")
    cookie = next(c for c in chromium.cookies() if c["name"] == "lamina_console")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    expect(page.locator('[data-field="machines"]')).to_have_text("2")
    expect(page.locator('[data-field="sessions"]')).to_have_text("1")
    # the token is used up: the same URL again signs nobody in
    again = httpx.get(url, follow_redirects=False)
    assert again.status_code == 401 and "set-cookie" not in again.headers


def watch_delta_then_reset(fleet: Fleet, page: Page) -> None:
    from playwright.sync_api import expect

    base = fleet.base
    page.goto(f"{base}/machines")
    expect(page.locator("#machines tbody tr")).to_have_count(2)
    expect(_cell(page, "m1", "delta")).to_have_text("0 B")
    expect(_cell(page, "m1", "state")).to_have_text("offline")
    expect(_cell(page, "m2", "users")).to_have_text("alice")
    expect(_cell(page, "m2", "state")).to_have_text("online")  # alice is logged in there
    page.evaluate("window.notReloaded = true")
    qemu = _qemu_io(fleet.server.url("machine/m1"))
    try:
        assert qemu.stdin is not None
        qemu.stdin.write("write -P 1 0 64k\n")
        qemu.stdin.flush()
        # the page updates itself: connected, and the delta holds the 64 KiB written
        expect(_cell(page, "m1", "state")).to_have_text("online")
        expect(_cell(page, "m1", "delta")).to_have_text("64.0 KiB")
        assert page.evaluate("window.notReloaded") is True
        page.locator('#machines tr[data-key="m1"] summary').click()  # show the other actions
        _settle(page)
        DOCS.mkdir(exist_ok=True)
        page.set_viewport_size({"width": 1360, "height": 420})
        page.screenshot(path=str(DOCS / "console-machines.png"))

        page.goto(f"{base}/")
        expect(page.locator('[data-field="online"]')).to_have_text("2")
        expect(page.locator('[data-field="delta_bytes"]')).to_have_text("64.0 KiB")
        page.set_viewport_size({"width": 1360, "height": 500})
        page.screenshot(path=str(DOCS / "console-dashboard.png"))
        page.set_viewport_size({"width": 1360, "height": 820})

        # a reset while the machine is connected is refused, and the page says why
        page.goto(f"{base}/machines")
        page.locator('#machines tr[data-key="m1"] button[name="reset"]').click()
        expect(page.locator(".flash.error")).to_contain_text("in use")
        expect(_cell(page, "m1", "delta")).to_have_text("64.0 KiB")
    finally:
        qemu.communicate("quit\n", timeout=30)
    assert qemu.returncode == 0
    expect(_cell(page, "m1", "state")).to_have_text("offline")

    page.locator('#machines tr[data-key="m1"] button[name="reset"]').click()
    expect(page.locator(".flash.ok")).to_have_text("m1: delta discarded (64.0 KiB)")
    expect(_cell(page, "m1", "delta")).to_have_text("0 B")
    assert delta_usage(fleet.cli.home / "deltas" / "m1") == (0, 0)


def entitle_layer(fleet: Fleet, page: Page) -> None:
    from playwright.sync_api import expect

    page.goto(f"{fleet.base}/layers/office")
    form = page.locator("form.entitle")
    form.locator('select[name="kind"]').select_option("user")
    form.locator('input[name="target"]').fill("alice")
    form.locator('button[type="submit"]').click()
    expect(page.locator(".flash.ok")).to_have_text("entitled office to user alice")
    expect(page.locator('#entitlements tr[data-key="user:alice"]')).to_have_count(1)
    admin = {"Authorization": f"Bearer {fleet.admin_token()}"}
    listed = httpx.get(f"{fleet.base}/api/v1/entitlements?layer=office&user=alice", headers=admin)
    assert listed.json()["total"] == 1
    page.goto(f"{fleet.base}/users")
    expect(page.locator('#users tr[data-key="alice"]')).to_contain_text("office")


def hostile_text_is_text(fleet: Fleet, page: Page) -> None:
    from playwright.sync_api import expect

    page.goto(f"{fleet.base}/machines/m2")
    expect(page.locator("#extra-config")).to_contain_text(HOSTILE_SCRIPT)
    assert page.evaluate("document.scripts.length") == 1  # console.js, nothing else
    page.goto(f"{fleet.base}/images")
    expect(page.locator("td.source").first).to_contain_text(HOSTILE_IMG)
    assert page.locator("img").count() == 0
    page.wait_for_timeout(300)  # a dialog would have opened by now


def actions_need_the_csrf_token(fleet: Fleet, page: Page) -> None:
    from playwright.sync_api import expect

    m2 = fleet.cli.home / "deltas" / "m2"
    ok(qemu_io(fleet.server.url("machine/m2"), "write -P 2 0 64k"))
    assert delta_usage(m2)[0] == 16
    reset = f"{fleet.base}/machines/m2/reset"
    for form in ({"next": "/machines"}, {"next": "/machines", "csrf": "forged"}):
        assert page.request.post(reset, form=form, max_redirects=0).status == 403
    csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert csrf
    cross_site = page.request.post(
        reset, form={"csrf": csrf}, headers={"Origin": "http://attacker.example"}, max_redirects=0
    )
    assert cross_site.status == 403
    assert delta_usage(m2)[0] == 16  # nothing was reset
    # with the token it goes through, to the confirmation step: m2 is stateful, and its
    # delta is its data
    asked = page.request.post(reset, form={"csrf": csrf, "next": "/machines"}, max_redirects=0)
    assert asked.status == 200 and "that a reset would discard" in asked.text()
    assert delta_usage(m2)[0] == 16
    # in the browser: the Reset button, then the page that says what goes, then its button
    page.goto(f"{fleet.base}/machines")
    page.locator('#machines tr[data-key="m2"] button[name="reset"]').click()
    expect(page.locator("#why")).to_contain_text("64.0 KiB that a reset would discard")
    assert delta_usage(m2)[0] == 16
    page.locator('button[name="confirmed"]').click()
    expect(page.locator(".flash.ok")).to_have_text("m2: delta discarded (64.0 KiB)")
    assert delta_usage(m2) == (0, 0)
