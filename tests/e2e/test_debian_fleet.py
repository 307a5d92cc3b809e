"""A real Debian fleet: two machines booted at once from lamina under qemu (TCG), driven
through ssh.

- first boot of a stateless machine: its hostname, /etc/machine-id, the journal's
  directory and machine-id field, and the SSH host key are the database's; cloud-init
  22.4 finds nothing to complain about in the seed; the seed is root's only;
- alice logs in (3 app layers captured with ``apt-get install``) and runs them; while her
  ssh session stays open the admin entitles a fourth, and her existing shell runs it
  (timed; see LIVE_LIMIT); she writes a file in her home and logs out;
- she logs in on the other machine: her file and all the apps;
- the stateless machine reboots clean (a file written before is gone, its identity stays).

The timings (login to a composed session with 3 app layers, entitlement to app visible)
are printed and kept in ``$LAMINA_TEST_CACHE/e2e-timings.json``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Cli
from tests.demo.conftest import cache_root
from tests.e2e.machine import HOST_FROM_GUEST, Machine, Shell
from tests.servers import Server, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

APPS = ("cowsay", "sl", "hello")  # entitled before alice logs in
LIVE = "figlet"  # entitled while she is logged in (its command is an /etc/alternatives link)
BOOT_TIMEOUT = 900.0  # two machines under TCG on a shared 2-core host
# The agent's work between an entitlement and the app in the shell (fetch, an EROFS image,
# an overlay switch, three binds) is Python that TCG runs 20-50 times slower than a real
# CPU: 0.1-0.4 s natively, where tests/guest/test_session.py asserts the 2 s target, and
# 1.6-3.1 s in all here with the host's load average between 5 and 19 (5.4-11 s before the
# agent kept its mounts in memory and set up loop devices itself). This run asserts that
# the open shell gets the app live, within a bound emulation keeps, and reports the time
# and its steps.
LIVE_LIMIT = 30.0


def capture(cli: Cli, app: str) -> dict[str, Any]:
    return cli(
        "layer", "capture", app, "--on", "debian12", "--json", "--",
        "sh", "-c", f"apt-get update -qq && apt-get install -y -qq {app}",
        timeout=900,
    ).json()  # fmt: skip


def users_config(key: Path) -> str:
    public = key.with_suffix(".pub").read_text().strip()
    return json.dumps(
        {
            "users": [
                "default",
                {"name": "alice", "shell": "/bin/bash", "ssh_authorized_keys": [public]},
            ],
            "ssh_authorized_keys": [public],  # the first user's (debian, with sudo)
        }
    )


@pytest.fixture(scope="module")
def fleet(
    e2e_cli: Cli,
    debian_image: dict[str, Any],
    ssh_key: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Server, dict[str, Machine], httpx.Client]]:
    cli, logs = e2e_cli, tmp_path_factory.mktemp("logs")
    assert debian_image["image"] == "debian12@1" and debian_image["layer"] == "debian12@1"
    for app in (*APPS, LIVE):
        captured = capture(cli, app)
        assert captured["bases"] == ["debian12@1"]
        assert captured["caches_left_out"] > 0 and captured["size"] < 8 << 20, captured
    cli("user", "add", "alice", "--policy", "profile")
    for app in APPS:
        cli("entitle", app, "--user", "alice")
    config = logs / "users.yaml"
    config.write_text(users_config(ssh_key))
    for name in ("vm1", "vm2"):
        cli("machine", "add", name, "--image", "debian12", "--mode", "stateless")
        cli("machine", "set", name, "--config", str(config))
        cli("entitle", "debian12", "--machine", name)
    server = Server(cli.home, logs / "serve.log")
    server.args = ("--agent-url", f"http://{HOST_FROM_GUEST}:{server.http_port}")
    server.start()
    nbd = f"nbd://127.0.0.1:{server.port}"
    machines = {
        name: Machine(name, cli.json("machine", "show", name)["mac"], nbd, ssh_key, logs)
        for name in ("vm1", "vm2")
    }
    admin = cli("admin", "token").out.strip()
    http = httpx.Client(
        base_url=f"{server.http_url}/api/v1",
        headers={"Authorization": f"Bearer {admin}"},
        timeout=30,
    )
    try:
        yield server, machines, http
    finally:
        for m in machines.values():
            m.stop()
        server.stop()


def identity_is_the_databases(cli: Cli, vm: Machine) -> None:
    shown = cli.json("machine", "show", vm.name)
    machine_id = shown["machine_id"]
    assert vm.ssh("debian", "hostname").strip() == vm.name
    assert vm.ssh("debian", "cat /etc/machine-id").strip() == machine_id
    assert vm.root("ls /var/log/journal").split() == [machine_id]
    # journald's own idea of the machine (it stamps every entry with it)
    entry = json.loads(vm.root("journalctl -b -o json -n 1 --no-pager"))
    assert entry["_MACHINE_ID"] == machine_id and entry["_HOSTNAME"] == vm.name
    # sshd presents the database's host key
    scanned = subprocess.run(
        ["ssh-keyscan", "-t", "ed25519", "-p", str(vm.port), "127.0.0.1"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert scanned[-2:] == shown["ssh_host_keys"]["ed25519"].split()[:2]
    # cloud-init 22.4 took the seed without a schema warning; the seed and the agent's
    # token are root's only
    assert "Valid cloud-config" in vm.root("cloud-init schema --system")
    # ([c]: the pattern must not match sudo's own log line of this command)
    warned = vm.root("journalctl -b --no-pager | grep -c 'Invalid [c]loud-config' || true")
    assert warned == "0\n"
    assert "status: done" in vm.root("cloud-init status --wait")
    assert vm.root("stat -c %a $(blkid -L cidata)").strip() == "600"
    assert vm.root("stat -c %a /etc/lamina/agent.env").strip() == "600"
    assert "en_US.utf8" in vm.ssh("debian", "locale -a").split()


def alice_session(vm: Machine, http: httpx.Client) -> dict[str, float]:
    """Login with 3 app layers; a live entitlement seen by her open shell; a file in her
    home; logout. Returns the timings."""
    baseline = time.monotonic()
    vm.ssh("debian", "true")  # a login without layers, for comparison
    timings = {"ssh_login_without_layers": time.monotonic() - baseline}
    started = time.monotonic()
    shell = Shell(vm, "alice")
    try:
        first = shell.run("cowsay -f tux composed")
        timings["login_3_apps"] = time.monotonic() - started
        assert "composed" in first and "|o_o |" in first, first
        assert "Hello, world!" in shell.run("hello")
        assert shell.run("command -v sl").strip() == "/usr/games/sl"
        assert shell.run("findmnt -n -o FSTYPE /usr").strip() == "overlay"
        assert shell.run(f"command -v {LIVE} || echo absent").strip() == "absent"

        offset = guest_clock_offset(shell)
        started, wall = time.monotonic(), time.time()
        created = http.post("/entitlements", json={"layer": LIVE, "user": "alice"})
        assert created.status_code == 201
        posted = time.time()
        out = shell.run(
            f"until command -v {LIVE} >/dev/null; do sleep 0.05; done; date +%s.%N; {LIVE} live"
        )
        timings["entitlement_to_visible"] = time.monotonic() - started
        seen, _, letters = out.partition("\n")
        assert "_" in letters  # figlet's letters
        ends = {"posted": posted, "seen": float(seen), "back": time.time()}
        print(live_breakdown(vm, wall, offset, ends))
        assert shell.run("readlink /etc/alternatives/figlet").strip() == "/usr/bin/figlet-figlet"
        shell.run("echo remember > ~/notes.txt")
        assert shell.run("pwd").strip() == "/home/alice"
    finally:
        shell.close()
    return timings


def guest_clock_offset(shell: Shell) -> float:
    """The guest's clock minus the host's (within half a round trip of the shell)."""
    before = time.time()
    guest = float(shell.run("date +%s.%N"))
    return guest - (before + time.time()) / 2


def live_breakdown(vm: Machine, posted_at: float, offset: float, ends: dict[str, float]) -> str:
    """Where a live entitlement's time went, in steps on the host's clock (the guest's
    times less ``offset``): the admin's call, the long-poll's answer reaching the agent
    (its ``desired`` log line), the agent's live change (``reconciled``, with its own
    steps), the open shell finding the command, the app's run and its output back."""
    lines = vm.root(
        "journalctl -b -u lamina-agent -o cat --no-pager"
        ' | grep -e \'"event": "desired"\' -e \'"event": "reconciled"\''
    )
    events = [json.loads(line) for line in lines.splitlines() if line.startswith("{")]
    got = [e for e in events if e["event"] == "desired"][-1]
    done = [e for e in events if e["event"] == "reconciled"][-1]
    marks = {
        "posted": ends["posted"],
        "reached the agent": guest_time(got["ts"]) - offset,
        "agent done": guest_time(done["ts"]) - offset,
        "shell found it": ends["seen"] - offset,
        "app ran, output back": ends["back"],
    }
    steps, last = [], posted_at
    for name, at in marks.items():
        steps.append(f"{name} +{at - last:.2f} s")
        last = at
    return (
        f"a live entitlement: {', '.join(steps)}; "
        f"the agent's change: {done['actions']} (after planning {done['planned']})"
    )


def guest_time(ts: str) -> float:
    """A log line's timestamp (2026-12-07T17:45:55.868Z) as seconds since the epoch."""
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def session_ended(http: httpx.Client) -> bool:
    return http.get("/sessions", params={"user": "alice"}).json()["total"] == 0


def test_a_debian_fleet_from_lamina(
    e2e_cli: Cli, fleet: tuple[Server, dict[str, Machine], httpx.Client]
) -> None:
    _server, machines, http = fleet
    vm1, vm2 = machines["vm1"], machines["vm2"]
    for vm in (vm1, vm2):
        vm.start()
    boots = {vm.name: vm.wait_ssh(BOOT_TIMEOUT) for vm in (vm1, vm2)}
    print(f"boot to ssh, two machines at once: {boots}")

    identity_is_the_databases(e2e_cli, vm1)
    timings = alice_session(vm1, http)
    print(f"alice's session on vm1: {timings}")
    wait_for(lambda: session_ended(http), 120)
    assert http.get("/users/alice").json()["writable_version"] >= 1

    # roaming: the other machine, her file and every app
    out = vm2.ssh("alice", "cat ~/notes.txt; cowsay -f tux moo; figlet -w 60 both; hello")
    assert out.startswith("remember\n") and "moo" in out and "Hello, world!" in out
    wait_for(lambda: session_ended(http), 120)
    # after her logout the machine is the plain image again
    assert vm2.root(f"command -v cowsay {LIVE} || echo none").strip() == "none"

    # the stateless machine reboots clean: what was written is gone, the identity stays
    vm1.root("echo dirty > /var/tmp/marker && sync")
    vm1.ssh("debian", "sudo systemctl reboot", check=False)
    vm1.wait_exit(300)  # -no-reboot: the reboot ends qemu, the NBD connection closes
    vm1.start()
    boots["vm1 again"] = vm1.wait_ssh(BOOT_TIMEOUT)
    assert vm1.root("test -e /var/tmp/marker && echo dirty || echo clean").strip() == "clean"
    # one boot in its journal: the one before went with the delta (the header is IDX ...)
    assert vm1.root("journalctl --list-boots --no-pager | grep -vc '^ *IDX'").strip() == "1"
    identity_is_the_databases(e2e_cli, vm1)

    report = {k: round(v, 2) for k, v in {**timings, **boots}.items()}
    print(f"timings: {report}")
    (cache_root() / "e2e-timings.json").write_text(json.dumps(report, indent=2) + "\n")
    assert timings["entitlement_to_visible"] < LIVE_LIMIT, report
