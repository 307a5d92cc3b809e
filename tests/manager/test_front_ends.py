"""Every admin operation through its three front ends - the CLI on the home, the CLI
through ``--manager`` (the HTTP API), the console's form POST with its CSRF token - on a
real ``lamina serve`` and a real database: each answers alike (the same result or the
same refusal, the same exit code on both CLIs) and leaves the same state behind.

Each front end works on objects of its own (``NAME-home``, ``NAME-manager``,
``NAME-console``), made the same way; answers are compared with that suffix taken out.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from lamina.layer.importer import import_layer
from lamina.layer.records import WRITABLE, NewVersion
from lamina.manager.admin import HomeAdmin
from lamina.manager.home import open_home
from lamina.manager.layer_records import DatabaseRecords
from lamina.manager.schemas import EntitlementCreate, MachineCreate, Mode, UserCreate
from lamina.manager.services import images, layers
from tests.conftest import Cli, Result, write_sparse
from tests.console.conftest import login_url
from tests.nbdtools import ok, qemu_io
from tests.servers import Server

FRONTS = ("home", "manager", "console")
KEEPER_MAC = "52:54:00:aa:00:01"
_FLASH = re.compile(r'<p class="flash (\w+)" role="status">([^<]*)</p>')
_WHY = re.compile(r'<p class="flash error" role="alert" id="why">([^<]*)</p>')
_MAC = re.compile(r"\b[0-9a-f]{2}(?::[0-9a-f]{2}){5}\b")
_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


@dataclass
class Answer:
    ok: bool
    text: str
    code: int | None = None  # the CLI's exit code
    asked: bool = False  # the console asked for a confirmation


@dataclass
class Fleet:
    cli: Cli
    server: Server
    console: httpx.Client
    csrf: str
    admin_token: str
    desk_token: str  # machine "desk", where users log in
    admin: HomeAdmin  # in this process: what each front end starts from
    api: httpx.Client  # the admin API: what each front end left

    def get(self, path: str, **params: str) -> Any:
        answer = self.api.get(path, params=params)
        return answer.json() if answer.status_code == 200 else answer.status_code

    def remote(self) -> Cli:
        return _Remote(self.cli.home, self.server.http_url, self.admin_token)

    def login(self, user: str) -> None:
        answer = httpx.post(
            f"{self.server.http_url}/api/v1/agent/login",
            json={"user": user},
            headers={"Authorization": f"Bearer {self.desk_token}"},
        )
        assert answer.status_code == 200, answer.text

    def write_delta(self, machine: str) -> None:
        ok(qemu_io(self.server.url(f"machine/{machine}"), "write -P 7 0 8k", "flush"))


class _Remote(Cli):
    """The CLI through --manager: no --home given, so nothing local can be used."""

    def __init__(self, home: Path, url: str, token: str) -> None:
        super().__init__(home)
        self.url, self.token = url, token

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> Result:
        return super().__call__(
            *args, "--manager", self.url, "--token", self.token, check=check, timeout=timeout
        )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One home served by one `lamina serve`: images base@1 and base@2, machine "keeper"
    (its MAC and hostname taken), machine "desk" for logins, image "solo" that machine
    "solo-m" is pinned to, an app layer "office", a group "staff"; a console signed in."""
    tmp = tmp_path_factory.mktemp("front-ends")
    home = tmp / "home"
    cli = Cli(home)
    cli("init")
    disk = write_sparse(tmp / "d.raw", 4 << 20, [(0, b"one" * 1000)])
    cli("image", "import", "base", str(disk))
    disk.write_bytes(disk.read_bytes()[:-3] + b"two")
    cli("image", "import", "base", str(disk))
    cli("machine", "add", "keeper", "--image", "base", "--mac", KEEPER_MAC)
    cli("image", "import", "solo", str(write_sparse(tmp / "solo.raw", 1 << 20, [])))
    cli("machine", "add", "solo-m", "--image", "solo")
    desk = cli.json("machine", "add", "desk", "--image", "base")["token"]
    app = tmp / "office" / "opt" / "office"
    app.mkdir(parents=True)
    (app / "README").write_text("office\n")
    cli("layer", "import", "office", str(app.parent.parent))
    cli("group", "add", "staff")
    server = Server(home, tmp / "serve.log")
    server.start()
    token = cli("admin", "token").out.strip()
    console = httpx.Client(base_url=server.http_url, timeout=60)
    api = httpx.Client(
        base_url=f"{server.http_url}/api/v1", headers={"Authorization": f"Bearer {token}"}
    )
    opened = open_home(home)
    try:
        assert console.get(login_url(server)).status_code == 303
        found = _CSRF.search(console.get("/").text)
        assert found is not None
        yield Fleet(cli, server, console, found.group(1), token, desk, HomeAdmin(opened), api)
    finally:
        opened.close()
        api.close()
        console.close()
        server.stop()


# -- running one step on each front end -------------------------------------------------------


@dataclass(frozen=True)
class Step:
    cli: tuple[str, ...]  # arguments, "{n}" is the front end's object
    path: str  # the console action
    form: dict[str, str] = field(default_factory=dict)
    force: bool = False  # --force / confirm=1


def _fill(text: str, n: str) -> str:
    return text.replace("{n}", n)


def _cli_answer(result: Result) -> Answer:
    if result.code == 0:
        return Answer(True, result.out.strip(), 0)
    return Answer(False, result.err.strip().removeprefix("lamina: "), result.code)


def _console_answer(fleet: Fleet, step: Step, n: str) -> Answer:
    form = {k: _fill(v, n) for k, v in step.form.items()}
    form |= {"csrf": fleet.csrf, "next": "/machines"} | ({"confirm": "1"} if step.force else {})
    answer = fleet.console.post(_fill(step.path, n), data=form)
    if answer.status_code == 200:  # the confirmation step: nothing was done
        why = _WHY.search(answer.text)
        assert why is not None and "Confirm:" in answer.text, answer.text[:500]
        return Answer(False, html.unescape(why.group(1)), asked=True)
    assert answer.status_code == 303, (answer.status_code, answer.text[:300])
    flash = _FLASH.search(fleet.console.get("/machines").text)
    assert flash is not None
    return Answer(flash.group(1) == "ok", html.unescape(flash.group(2)))


def run_step(fleet: Fleet, step: Step, names: dict[str, str]) -> dict[str, Answer]:
    answers: dict[str, Answer] = {}
    for front, n in names.items():
        if front == "console":
            answers[front] = _console_answer(fleet, step, n)
            continue
        cli = fleet.cli if front == "home" else fleet.remote()
        args = [_fill(a, n) for a in step.cli] + (["--force"] if step.force else [])
        answers[front] = _cli_answer(cli(*args, check=False))
    return answers


def _norm(text: str, n: str) -> str:
    """The answer with the front end's name as "{n}", generated MACs as "{mac}"."""
    text = _MAC.sub(lambda m: m.group(0) if m.group(0) == KEEPER_MAC else "{mac}", text)
    return text.replace(n, "{n}").replace(" (--force)", "")


def _same(answers: dict[str, Answer], names: dict[str, str]) -> Answer:
    """The answers, with each front end's name put back as "{n}", agree; returns the CLI's."""
    norm = {f: Answer(a.ok, _norm(a.text, names[f]), a.code, a.asked) for f, a in answers.items()}
    home, remote, console = norm["home"], norm["manager"], norm["console"]
    assert home == remote, (home, remote)
    assert console.ok == home.ok, (console, home)
    assert home.text in console.text, (console.text, home.text)
    if not home.ok:
        assert console.asked == (home.code == 13), (console, home)
    return home


# -- the operations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Fleet, str], None]
    steps: tuple[tuple[Step, bool, str], ...]  # step, succeeds, a piece of its answer
    state: Callable[[Fleet, str], Any]


def _machine(mode: Mode = "stateful", delta: bool = False) -> Callable[[Fleet, str], None]:
    def setup(fleet: Fleet, n: str) -> None:
        fleet.admin.add_machine(MachineCreate(name=n, image="base@1", mode=mode))
        if delta:
            fleet.write_delta(n)

    return setup


def _nothing(_fleet: Fleet, _n: str) -> None:
    return None


def _user(fleet: Fleet, n: str) -> None:
    fleet.admin.add_user(UserCreate(name=n))


def _logged_in_user(fleet: Fleet, n: str) -> None:
    _user(fleet, n)
    fleet.login(n)


def _app_layer(entitled: bool) -> Callable[[Fleet, str], None]:
    def setup(fleet: Fleet, n: str) -> None:
        src = fleet.cli.home.parent / f"src-{n}" / "opt" / n
        src.mkdir(parents=True)
        (src / "file").write_text("same in each\n")
        home = fleet.admin.home
        import_layer(home, DatabaseRecords(home), n, src.parent.parent)
        if entitled:
            fleet.admin.add_user(UserCreate(name=f"u-{n}"))
            fleet.admin.entitle(EntitlementCreate(layer=n, user=f"u-{n}"))

    return setup


def _writable(logged_in: bool) -> Callable[[Fleet, str], None]:
    """User n with two saved versions of its writable layer (and logged in on desk)."""

    def setup(fleet: Fleet, n: str) -> None:
        _user(fleet, n)
        with fleet.admin.home.session() as session:
            for i in (1, 2):
                new = NewVersion(bytes([i]) * 32, files=1, size=10, stored_bytes=0, source="t")
                layers.add_version(session, name=f"writable-{n}", kind=WRITABLE, new=new)
        if logged_in:
            fleet.login(n)

    return setup


def _image(fleet: Fleet, n: str) -> None:
    disk = write_sparse(fleet.cli.home.parent / f"{n}.raw", 1 << 20, [(0, b"own" * 100)])
    home = fleet.admin.home
    images.import_image(store=home.store, session=home.session, name=n, path=disk)


# What each front end left, read through the admin API.


def _machine_state(fleet: Fleet, n: str) -> Any:
    shown = fleet.get(f"/machines/{n}")
    if isinstance(shown, int):
        return shown
    keys = ("image", "mode", "hostname", "domain", "delta_bytes", "identity_rev")
    state = {k: str(shown[k]).replace(n, "{n}") for k in keys}
    return state | {"mac": shown["mac"] == KEEPER_MAC}


def _user_state(fleet: Fleet, n: str) -> Any:
    u = fleet.get(f"/users/{n}")
    if isinstance(u, int):
        return u
    return {"groups": u["groups"], "policy": u["policy"], "in_use_on": u["in_use_on"]}


def _group_state(fleet: Fleet, n: str) -> Any:
    groups = fleet.get("/groups", q=n)["items"]
    return {g["name"].replace(n, "{n}"): g["members"] for g in groups}


def _layer_state(fleet: Fleet, n: str) -> Any:
    found = [la for la in fleet.get("/layers", q=n)["items"] if la["name"] == n]
    return [v["ref"].replace(n, "{n}") for v in found[0]["versions"]] if found else None


def _writable_state(fleet: Fleet, n: str) -> Any:
    return _layer_state(fleet, f"writable-{n}")


def _entitlements(fleet: Fleet, n: str) -> Any:
    items = fleet.get("/entitlements", user=n)["items"]
    return [(e["layer"], e["version"], e["priority"]) for e in items]


def _image_state(fleet: Fleet, n: str) -> Any:
    return [i["name"] for i in fleet.get("/images", q=n)["items"]] == [n]


RESET = Step(("machine", "reset", "{n}"), "/machines/{n}/reset")
REPIN = Step(
    ("machine", "set", "{n}", "--image", "base@2"), "/machines/{n}/repin", {"image": "base@2"}
)
REMOVE = Step(("machine", "rm", "{n}"), "/machines/{n}/remove")
LAYER_RM = Step(("layer", "rm", "{n}"), "/layers/{n}/remove")


def _forced(step: Step) -> Step:
    return Step(step.cli, step.path, step.form, force=True)


CASES = [
    Case(
        "machine-add",
        _nothing,
        (
            (
                Step(
                    ("machine", "add", "{n}", "--image", "base", "--mode", "stateful"),
                    "/machines/add",
                    {"name": "{n}", "image": "base", "mode": "stateful"},
                ),
                True,
                "{n}: base@2, stateful, hostname {n}",
            ),
            (
                Step(("machine", "add", "{n}", "--image", "base"), "/machines/add",
                     {"name": "{n}", "image": "base"}),
                False,
                "a machine named '{n}' already exists",
            ),
        ),
        _machine_state,
    ),
    Case(
        "machine-add-duplicate-mac-or-hostname",
        _nothing,
        (
            (
                Step(("machine", "add", "{n}", "--image", "base", "--mac", KEEPER_MAC),
                     "/machines/add", {"name": "{n}", "image": "base", "mac": KEEPER_MAC}),
                False,
                f"MAC address {KEEPER_MAC} belongs to machine keeper",
            ),
            (
                Step(("machine", "add", "{n}", "--image", "base", "--hostname", "KEEPER"),
                     "/machines/add", {"name": "{n}", "image": "base", "hostname": "KEEPER"}),
                False,
                "hostname keeper belongs to machine keeper",
            ),
        ),
        _machine_state,
    ),
    Case(
        "machine-set-identity",
        _machine(),
        (
            (
                Step(("machine", "set", "{n}", "--mac", KEEPER_MAC), "/machines/{n}/set",
                     {"mac": KEEPER_MAC}),
                False,
                f"MAC address {KEEPER_MAC} belongs to machine keeper",
            ),
            (
                Step(("machine", "set", "{n}", "--hostname", "h-{n}", "--domain", "lab.example"),
                     "/machines/{n}/set", {"hostname": "h-{n}", "domain": "lab.example"}),
                True,
                "hostname h-{n}.lab.example, identity rev 2",
            ),
        ),
        _machine_state,
    ),
    Case(
        "machine-reset-stateful",
        _machine(delta=True),
        (
            (RESET, False, "{n} is stateful and its delta holds 8.0 KiB that a reset would"),
            (_forced(RESET), True, "{n}: delta discarded"),
            (RESET, True, "{n}: delta discarded (0 B)"),  # nothing left to lose
        ),
        _machine_state,
    ),
    Case(
        "machine-repin-stateful",
        _machine(delta=True),
        (
            (REPIN, False, "that re-pinning it to base@2 would discard"),
            (_forced(REPIN), True, ""),
        ),
        _machine_state,
    ),
    Case(
        "machine-stateless-loses-the-delta",
        _machine(delta=True),
        (
            (
                Step(("machine", "set", "{n}", "--mode", "stateless"), "/machines/{n}/set",
                     {"mode": "stateless"}),
                False,
                "that making it stateless would discard",
            ),
        ),
        _machine_state,
    ),
    Case(
        "machine-remove",
        _machine(delta=True),
        (
            (REMOVE, False, "that removing it would discard"),
            (_forced(REMOVE), True, "removed {n} and its delta (8.0 KiB)"),
            (REMOVE, False, "no machine named '{n}'"),
        ),
        _machine_state,
    ),
    Case(
        "delta-commit",
        _machine(delta=True),
        (
            (
                Step(("delta", "commit", "{n}", "--as", "c-{n}", "--repin"),
                     "/machines/{n}/commit", {"as_image": "c-{n}", "repin": "1"}),
                True,
                "c-{n}@1",
            ),
            (
                Step(("delta", "commit", "{n}"), "/machines/{n}/commit"),
                True,
                "unchanged, c-{n}@1",
            ),
        ),
        _machine_state,
    ),
    Case(
        "image-remove",
        _image,
        (
            (
                Step(("image", "rm", "solo"), "/images/solo/remove"),
                False,
                "machines are pinned to what you want to remove: solo-m (solo@1)",
            ),
            (Step(("image", "rm", "{n}"), "/images/{n}/remove"), True, "removed {n}@1"),
            (Step(("image", "rm", "{n}"), "/images/{n}/remove"), False, "no image named '{n}'"),
        ),
        _image_state,
    ),
    Case(
        "layer-remove-entitled",
        _app_layer(entitled=True),
        (
            (LAYER_RM, False, "{n} is entitled to user u-{n}: removing it takes that away"),
            (_forced(LAYER_RM), True, "removed {n}@1"),
        ),
        _layer_state,
    ),
    Case(
        "layer-remove-writable",
        _writable(logged_in=False),
        (
            (
                Step(("layer", "rm", "writable-{n}"), "/layers/writable-{n}/remove"),
                False,
                "writable-{n} holds {n}'s saved files (2 versions: writable-{n}@1, writable-{n}@2)",
            ),
            (
                Step(("layer", "rm", "writable-{n}@2"), "/layers/writable-{n}/remove",
                     {"version": "2"}, force=True),
                True,
                "removed writable-{n}@2",
            ),
        ),
        _writable_state,
    ),
    Case(
        "layer-remove-writable-in-a-session",
        _writable(logged_in=True),
        (
            (
                Step(("layer", "rm", "writable-{n}"), "/layers/writable-{n}/remove", force=True),
                False,
                "writable-{n} is in use by {n}'s session on desk: log {n} out first",
            ),
        ),
        _writable_state,
    ),
    Case(
        "user-add-set-remove",
        _nothing,
        (
            (
                Step(("user", "add", "{n}", "--group", "staff"), "/users/add",
                     {"name": "{n}", "groups": "staff"}),
                True,
                "added user {n}, groups staff, writable layer writable-{n}",
            ),
            (
                Step(("user", "add", "{n}x", "--group", "nope"), "/users/add",
                     {"name": "{n}x", "groups": "nope"}),
                False,
                "no group named 'nope'",
            ),
            (
                Step(("user", "set", "{n}", "--no-groups", "--policy", "apps"), "/users/{n}/set",
                     {"groups": "", "policy": "apps"}),
                True,
                "changed user {n}, writable layer writable-{n}",
            ),
        ),
        _user_state,
    ),
    Case(
        "user-remove-logged-in",
        _logged_in_user,
        (
            (Step(("user", "rm", "{n}"), "/users/{n}/remove"), False,
             "user '{n}' is logged in on desk"),
        ),
        _user_state,
    ),
    Case(
        "group-and-members",
        _user,
        (
            (Step(("group", "add", "g-{n}"), "/groups/add", {"name": "g-{n}"}), True,
             "added group g-{n}"),
            (Step(("group", "add-member", "g-{n}", "{n}"), "/groups/g-{n}/members/add",
                  {"user": "{n}"}), True, "{n} is in group g-{n}"),
            (Step(("group", "add-member", "g-{n}", "{n}"), "/groups/g-{n}/members/add",
                  {"user": "{n}"}), False, "'{n}' is already in 'g-{n}'"),
            (Step(("group", "rm-member", "g-{n}", "{n}"), "/groups/g-{n}/members/remove",
                  {"user": "{n}"}), True, "{n} is no longer in group g-{n}"),
            (Step(("group", "rm-member", "g-{n}", "{n}"), "/groups/g-{n}/members/remove",
                  {"user": "{n}"}), False, "'{n}' is not in 'g-{n}'"),
            (Step(("group", "rm", "g-{n}"), "/groups/g-{n}/remove"), True, "removed group g-{n}"),
        ),
        _group_state,
    ),
    Case(
        "entitle-unentitle",
        _user,
        (
            (
                Step(("entitle", "office@1", "--user", "{n}", "--priority", "7"),
                     "/layers/office/entitle",
                     {"kind": "user", "target": "{n}", "version": "1", "priority": "7"}),
                True,
                "entitled office@1 to user {n}",
            ),
            (
                Step(("entitle", "office", "--user", "{n}"), "/layers/office/entitle",
                     {"kind": "user", "target": "{n}"}),
                False,
                "office is already entitled to user {n}",
            ),
            (
                Step(("entitle", "writable-{n}", "--user", "{n}"), "/layers/writable-{n}/entitle",
                     {"kind": "user", "target": "{n}"}),
                False,
                "'writable-{n}' is a writable layer: only app layers are entitled",
            ),
        ),
        _entitlements,
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_front_ends_answer_alike(fleet: Fleet, case: Case) -> None:
    names = {front: f"c{CASES.index(case)}-{front}" for front in FRONTS}
    for n in names.values():
        case.setup(fleet, n)
    for step, succeeds, expected in case.steps:
        answer = _same(run_step(fleet, step, names), names)
        assert answer.ok == succeeds, (step, answer)
        assert expected in answer.text, (expected, answer.text)
    states = {front: case.state(fleet, n) for front, n in names.items()}
    assert states["home"] == states["manager"] == states["console"], states


def test_unentitle_by_target_and_by_number_answer_alike(fleet: Fleet) -> None:
    """The CLI names the target, the console the entitlement's number: one service, one
    answer."""
    answers = {}
    for front in FRONTS:
        n = f"unent-{front}"
        _user(fleet, n)
        ent = fleet.admin.entitle(EntitlementCreate(layer="office", user=n))
        if front == "console":
            answers[front] = _console_answer(
                fleet, Step((), "/layers/office/unentitle", {"id": str(ent.id)}), n
            )
        else:
            cli = fleet.cli if front == "home" else fleet.remote()
            answers[front] = _cli_answer(cli("unentitle", "office", "--user", n, check=False))
    answer = _same(answers, {f: f"unent-{f}" for f in FRONTS})
    assert answer.ok and answer.text == "unentitled office from user {n}"
