"""The console in real headless Chromium against a real `lamina serve`: sign in with the
printed URL, watch a machine's delta grow and drop to zero live, entitle a layer, hostile
text rendered as text, and actions refused without the CSRF token. One browser session
walks through the steps in order (each step starts from what the previous one left)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING
from xml.etree import ElementTree

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
    sort_search_machine_page_bulk_audit(fleet, page)
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
        # the NBD client holding its disk: qemu-io's address, from the block server
        expect(_cell(page, "m1", "client")).to_contain_text("127.0.0.1:")
        assert page.evaluate("window.notReloaded") is True
        page.locator('#machines tr[data-key="m1"] summary').click()  # show the other actions
        _settle(page)
        DOCS.mkdir(exist_ok=True)
        page.set_viewport_size({"width": 1360, "height": 420})
        page.screenshot(path=str(DOCS / "console-machines.png"))

        page.goto(f"{base}/")
        expect(page.locator('[data-field="online"]')).to_have_text("2")
        expect(page.locator('[data-field="delta_bytes"]')).to_have_text("64.0 KiB")
        # the last day's charts, drawn on the server: qemu-io's open of m1's disk a boot
        expect(page.locator("#charts svg.chart")).to_have_count(3)
        expect(page.locator("#charts figcaption").first).to_have_text("boots: 1")
        assert page.locator("#charts svg.chart").first.locator("rect").count() == 2  # frame, bar
        page.set_viewport_size({"width": 1360, "height": 720})
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


def sort_search_machine_page_bulk_audit(fleet: Fleet, page: Page) -> None:
    from playwright.sync_api import expect

    base = fleet.base
    rows = page.locator("#machines tbody tr")
    # search by a part of a MAC address; sort by a column header, then the other way
    mac = fleet.cli.json("machine", "show", "m2")["mac"]
    page.goto(f"{base}/machines?q={mac[-5:]}")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-key", "m2")
    page.goto(f"{base}/machines")
    expect(rows.first).to_have_attribute("data-key", "m1")
    page.locator("#machines thead a", has_text="machine").click()
    expect(rows.first).to_have_attribute("data-key", "m2")
    assert "sort=name" in page.url and "order=desc" in page.url
    expect(rows.nth(1).locator("td").nth(3)).to_have_text(
        fleet.cli.json("machine", "show", "m1")["mac"]
    )

    # a machine's page: its NBD URLs and a version picker (no free text)
    page.goto(f"{base}/machines/m1")
    expect(page.locator("#nbd-url")).to_have_text(fleet.server.url("machine/m1"))
    expect(page.locator("#seed-url")).to_have_text(fleet.server.url("machine/m1/seed"))
    # the libvirt devices it shows are XML naming its disk, seed and MAC address
    devices = ElementTree.fromstring(f"<devices>{page.locator('#libvirt').inner_text()}</devices>")
    sources = devices.findall("disk/source")
    assert [s.get("name") for s in sources] == ["machine/m1", "machine/m1/seed"]
    assert sources[0].find("host").get("port") == str(fleet.server.port)  # type: ignore[union-attr]
    mac = devices.find("interface/mac")
    assert mac is not None and mac.get("address") == fleet.cli.json("machine", "show", "m1")["mac"]
    assert devices.find("disk[2]/readonly") is not None
    picker = page.locator('form[action="/machines/m1/repin"] select[name="image"]')
    expect(picker.locator("option")).to_have_text(["base@1"])
    _settle(page)
    page.screenshot(path=str(DOCS / "console-machine.png"), full_page=True)

    # both machines reset at once, after a confirmation page that lists them
    page.goto(f"{base}/machines")
    page.locator("#select-all").check()
    page.locator('#bulk button[value="reset"]').click()
    expect(page.locator("h1")).to_have_text("Confirm: Reset 2 machines")
    expect(page.locator("#selected li")).to_have_text(["m1", "m2"])
    page.locator('button[name="confirmed"]').click()
    expect(page.locator(".flash.ok")).to_have_text("Reset: m1, m2 done")

    # the audit log names the console, the account and what was done
    page.goto(f"{base}/audit")
    first = page.locator("#audit tbody tr").first
    expect(first).to_contain_text("console")
    expect(first).to_contain_text("machine.reset")
    page.goto(f"{base}/audit?q=entitle")
    expect(page.locator("#audit tbody tr").first).to_contain_text("office")
    page.goto(f"{base}/audit")
    page.set_viewport_size({"width": 1360, "height": 520})
    page.screenshot(path=str(DOCS / "console-audit.png"))
    page.set_viewport_size({"width": 1360, "height": 820})

    # the dashboard's dedup counts data, not the image's 7 MiB of zeros
    page.goto(f"{base}/")
    expect(page.locator('[data-field="logical_bytes"]')).not_to_have_text("8.0 MiB")


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
