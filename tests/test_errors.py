"""The one error tree: every kind with its exit code and HTTP status as the admin guide's table
says, every kind back from an HTTP answer as itself (the three HTTP clients of the manager
use the same table), and the adapters that map external failures at the edge."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lamina import errors
from lamina.errors import (
    Conflict,
    InvalidInput,
    LaminaError,
    NotFound,
    ProtocolError,
    Refused,
    ToolError,
    Unconfirmed,
    Unreachable,
    UsageError,
    from_http,
    http_body,
    http_status,
)
from tests.conftest import Cli, write_sparse
from tests.servers import Server

README = Path(__file__).resolve().parent.parent / "docs" / "admin.md"
_ROW = re.compile(r"^\| (\d+) \| ((?:`\w+`(?:, )?)+) \| (\d{3}) \| [^|]+ \|$")


def readme_table() -> dict[str, tuple[int, int]]:
    """The README's table of kinds: name -> (exit code, HTTP status)."""
    found: dict[str, tuple[int, int]] = {}
    for line in README.read_text().splitlines():
        row = _ROW.match(line)
        if row:
            for name in re.findall(r"`(\w+)`", row.group(2)):
                found[name] = (int(row.group(1)), int(row.group(3)))
    return found


def test_the_readme_table_is_the_tree() -> None:
    tree = errors.kinds()
    table = readme_table()
    assert set(table) == set(tree), set(table) ^ set(tree)
    for name, kind in tree.items():
        assert table[name] == (kind.exit_code, http_status(kind("x"))), name
    # one code per kind: a kind that refines another shares its code only when the README
    # lists them as one kind of failure (5, 6); all others differ from every other kind
    codes = sorted(k.exit_code for k in tree.values())
    assert sorted({c for c in codes if codes.count(c) > 1}) == [5, 6]
    assert max(codes) == 15 and 130 not in codes


def test_unreachable_and_refused_are_in_the_tree_once() -> None:
    import lamina.manager.client
    import lamina.stream.remote

    assert Unreachable.exit_code == 11 and Refused.exit_code == 12
    for module in (lamina.manager.client, lamina.stream.remote):
        assert getattr(module, "Unreachable", Unreachable) is Unreachable
        assert not hasattr(module, "Refused")


@pytest.mark.parametrize("kind", sorted(errors.kinds().values(), key=lambda k: k.__name__))
def test_every_kind_comes_back_from_http_as_itself(kind: type[LaminaError]) -> None:
    error = kind("what went wrong, in the server's words")
    body = json.dumps(http_body(error)).encode()
    back = from_http(http_status(error), body, what="manager")
    assert type(back) is kind and str(back) == str(error)


def test_refinements_made_elsewhere_travel_as_their_kind() -> None:
    from lamina.delta.uploads import TooLarge
    from lamina.rebase.jobs import InUse

    assert http_body(TooLarge("too big"))["kind"] == "InvalidInput"
    assert type(from_http(422, json.dumps(http_body(TooLarge("x"))))) is InvalidInput
    assert http_body(InUse("busy"))["kind"] == "Conflict"


@pytest.mark.parametrize(
    ("status", "body", "kind", "text"),
    [
        (401, b'{"detail": "invalid token"}', Refused, "manager: 401 invalid token"),
        (403, b'{"detail": "admin token required"}', Refused, "manager: 403 admin token required"),
        (404, b'{"detail": "Not Found"}', NotFound, "manager: 404 Not Found"),
        (409, b"{}", Conflict, "manager: 409"),
        (422, b'{"detail": [{"loc": ["body", "name"], "msg": "bad"}]}', UsageError, "name: bad"),
        (429, b"slow down", Unreachable, "manager: 429 slow down"),
        (502, b"<html>bad gateway</html>", Unreachable, "manager: 502 <html>bad gateway</html>"),
        (418, b"", ProtocolError, "manager: 418"),
        # a body naming a kind that is not in the tree goes by its status
        (409, b'{"detail": "x", "kind": "SystemExit"}', Conflict, "manager: 409 x"),
    ],
)
def test_answers_without_a_kind_go_by_status(
    status: int, body: bytes, kind: type[LaminaError], text: str
) -> None:
    error = from_http(status, body, what="manager")
    assert type(error) is kind and str(error) == text


# -- the three clients, against a server that answers what the test says ----------------------


class _Answers(BaseHTTPRequestHandler):
    status = 200
    body = b""

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *_args: object) -> None:
        return None


@pytest.fixture
def answering() -> Iterator[tuple[str, type[_Answers]]]:
    handler = type("Handler", (_Answers,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (409, Unconfirmed("sf is stateful and its delta holds 1.0 MiB")),
        (404, NotFound("no machine named 'x'")),
        (403, Refused("this machine is not pinned to that image")),
        (503, Unreachable("the database is away")),
    ],
)
def test_the_three_clients_raise_the_kind_the_server_sent(
    answering: tuple[str, type[_Answers]], status: int, error: LaminaError
) -> None:
    from lamina.manager.client import ManagerClient
    from lamina.stream.hydrate import _Connection
    from lamina.stream.remote import Remote

    url, handler = answering
    handler.status, handler.body = status, json.dumps(http_body(error)).encode()
    client = ManagerClient(url, "token")
    with pytest.raises(type(error)) as sync:
        client.json("GET", "/machines/x")
    client.close()

    async def stream() -> None:
        remote = Remote(url, "token")
        try:
            await remote.machine_info("x")
        finally:
            await remote.close()

    with pytest.raises(type(error)) as fetched:
        asyncio.run(stream())
    connection = _Connection(url, "token", 5.0)
    with pytest.raises(type(error)) as hydrated:
        connection.get("/stream/chunks?ids=00", fresh=False)
    connection.close()
    for raised in (sync.value, fetched.value, hydrated.value):
        assert type(raised) is type(error) and str(raised) == str(error)


def test_a_manager_that_is_not_there_is_unreachable() -> None:
    from lamina.manager.client import ManagerClient
    from tests.servers import free_port

    client = ManagerClient(f"http://127.0.0.1:{free_port()}", "token", timeout=2)
    with pytest.raises(Unreachable):
        client.json("GET", "/health")
    client.close()


# -- qemu-img: what failed decides the kind ---------------------------------------------------


def test_qemu_img_failures_are_mapped_by_what_failed(tmp_path: Path) -> None:
    from lamina.image import qemu

    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 65536)
    # the output cannot be made: the tool's failure, not the input's
    with pytest.raises(ToolError, match="Could not create"):
        qemu.convert(raw, tmp_path / "no" / "such" / "dir.qcow2", src_fmt="raw", dst_fmt="qcow2")
    # the input is not what it claims: the input's
    fake = tmp_path / "fake.vhd"
    fake.write_bytes(b"\1" * 600 + b"conectix")
    with pytest.raises(InvalidInput, match=r"fake\.vhd"):
        qemu.convert(fake, tmp_path / "out.raw", src_fmt="vpc", dst_fmt="raw")
    with pytest.raises(InvalidInput):
        qemu.info(tmp_path / "fake.vhd", "qcow2")


def test_the_cli_exits_with_the_kind_of_what_the_manager_refused(tmp_path: Path, cli: Cli) -> None:
    """Through --manager, a refusal exits with the code it has on the home."""
    disk = write_sparse(tmp_path / "d.raw", 1 << 20, [(0, b"x" * 4096)])
    cli("image", "import", "base", str(disk))
    cli("machine", "add", "m1", "--image", "base")
    server = Server(cli.home, tmp_path / "serve.log")
    server.start()
    try:
        token = cli("admin", "token").out.strip()
        remote = ("--manager", server.http_url, "--token", token)
        for args, code in (
            (("image", "rm", "base"), 9),  # m1 is pinned to it
            (("machine", "rm", "nope"), 3),
            (("machine", "add", "m1", "--image", "base"), 4),
            (("machine", "add", "m2", "--image", "base", "--mode", "sometimes"), 2),
        ):
            local = cli(*args, check=False)
            through = cli(*args, *remote, check=False)
            assert (local.code, local.err) == (through.code, through.err) and local.code == code
        wrong = cli(
            "image", "rm", "base", "--manager", server.http_url, "--token", "no", check=False
        )
        assert wrong.code == 12 and "401" in wrong.err
    finally:
        server.stop()
