"""`lamina serve` with real NBD clients: nbdinfo, qemu-img, qemu-io, fio, nbdcopy."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lamina.nbd import Cmd, Errno
from lamina.nbd.aioclient import NbdClient
from tests.conftest import Cli, write_sparse
from tests.nbdtools import ok, qemu_io
from tests.servers import Server, wait_for

MiB = 1 << 20


@pytest.fixture
def image(cli: Cli, tmp_path: Path) -> Path:
    src = write_sparse(
        tmp_path / "base.raw",
        16 * MiB,
        [(0, os.urandom(2 * MiB)), (6 * MiB, b"lamina" * 50000), (12 * MiB, os.urandom(MiB))],
    )
    cli("image", "import", "base", str(src))
    cli("machine", "add", "m1", "--image", "base", "--mode", "stateful")
    cli("machine", "add", "m2", "--image", "base", "--mode", "stateless")
    return src


def test_nbdinfo_lists_the_exports(server: Server, image: Path) -> None:
    server.start()
    out = subprocess.run(
        ["nbdinfo", "--list", "--json", server.url("")], capture_output=True, text=True, check=True
    ).stdout
    exports = {e["export-name"]: e for e in json.loads(out)["exports"]}
    assert {"base", "base@1", "machine/m1", "machine/m1/seed", "machine/m2"} <= exports.keys()
    assert exports["base"]["is_read_only"] and not exports["machine/m1"]["is_read_only"]
    # one writer per machine: several connections are offered for reading only
    assert exports["base"]["can_multi_conn"] and not exports["machine/m1"]["can_multi_conn"]
    assert exports["base@1"]["export-size"] == 16 * MiB


def test_qemu_img_convert_equals_the_imported_file(
    server: Server, image: Path, tmp_path: Path
) -> None:
    server.start()
    out = tmp_path / "copy.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", server.url("base"), str(out)], check=True)
    assert out.read_bytes() == image.read_bytes()
    # base:allocation tells the zero chunks apart, so the copy stays sparse
    assert out.stat().st_blocks * 512 < 8 * MiB


def nbdcopy(url: str, out: Path) -> bytes:
    subprocess.run(["nbdcopy", url, str(out)], check=True, capture_output=True)
    data = out.read_bytes()
    out.unlink()
    return data


def test_writes_stay_in_their_machine(server: Server, image: Path, tmp_path: Path) -> None:
    server.start()
    ok(qemu_io(server.url("machine/m1"), "write -P 0xab 1000 70000", "flush"))
    ok(qemu_io(server.url("machine/m1"), "read -P 0xab 1000 70000"))
    original = image.read_bytes()[1000:71000]
    assert len(set(original)) > 1
    for other in ("machine/m2", "base"):
        assert nbdcopy(server.url(other), tmp_path / "other.raw")[1000:71000] == original


def test_read_only_exports_refuse_writes(server: Server, image: Path) -> None:
    server.start()
    proc = qemu_io(server.url("base"), "write -P 1 0 4096")
    assert proc.returncode != 0  # qemu sees the read-only flag

    async def raw_write() -> tuple[int, int]:
        client = await NbdClient.connect("127.0.0.1", server.port, "machine/m1/seed")
        error, _ = await client.request(Cmd.WRITE, 0, data=b"x" * 512)
        again, data = await client.request(Cmd.READ, 0, 512)
        await client.close()
        return error, len(data) if not again else -1

    assert asyncio.run(raw_write()) == (Errno.EPERM, 512)


def test_out_of_range_and_malformed_requests_are_refused_and_serving_goes_on(
    server: Server, image: Path
) -> None:
    server.start()

    async def probe() -> list[int]:
        client = await NbdClient.connect("127.0.0.1", server.port, "base")
        results = [
            (await client.request(Cmd.READ, 16 * MiB - 10, 20))[0],
            (await client.request(Cmd.READ, 1 << 40, 4096))[0],
            (await client.request(Cmd.WRITE, 0, data=b"no"))[0],
            (await client.request(77, 0, 0))[0],
            (await client.request(Cmd.READ, 0, 64 * MiB))[0],
        ]
        error, data = await client.request(Cmd.READ, 0, 4096)
        results.append(error if error else len(data))
        await client.close()
        # a client that breaks framing is hung up on; the server stays up
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"garbage" * 100)
        await writer.drain()
        writer.close()
        return results

    assert asyncio.run(probe()) == [
        Errno.EINVAL,
        Errno.EINVAL,
        Errno.EPERM,
        Errno.EINVAL,
        Errno.EOVERFLOW,
        4096,
    ]
    subprocess.run(["nbdinfo", server.url("base")], check=True, capture_output=True)
    logged = [json.loads(line) for line in server.log_lines() if line.startswith("{")]
    assert any(e["event"] == "request-error" and e["error"] == "EINVAL" for e in logged)
    assert any(e["event"] == "disconnect" and e["export"] == "base" for e in logged)


def test_stateful_write_survives_kill_9_and_restart(server: Server, image: Path) -> None:
    server.start()
    ok(qemu_io(server.url("machine/m1"), "write -P 0x5a 0 12288", "flush"))
    ok(qemu_io(server.url("machine/m2"), "write -P 0x5a 0 12288", "flush"))
    server.stop(signal.SIGKILL)
    server.start()
    ok(qemu_io(server.url("machine/m1"), "read -P 0x5a 0 12288", read_only=True))
    # a stateless machine starts from its image version again
    assert qemu_io(server.url("machine/m2"), "read -P 0x5a 0 12288", read_only=True).stdout.count(
        "Pattern verification failed"
    )


def test_machine_reset_discards_a_delta(server: Server, cli: Cli, image: Path) -> None:
    """A stateful one (qemu-io's goodbye already ends a stateless machine's delta)."""
    server.start()
    ok(qemu_io(server.url("machine/m1"), "write -P 0x77 4096 4096"))
    assert cli.json("machine", "show", "m1")["delta_bytes"] == 4096
    cli("machine", "reset", "m1", "--force")
    assert cli.json("machine", "show", "m1")["delta_bytes"] == 0
    out = ok(qemu_io(server.url("machine/m1"), "read -v 4096 16", read_only=True))
    assert "77 77 77" not in out


def test_a_stateless_machine_starts_clean_after_its_client_said_goodbye(
    server: Server, cli: Cli, image: Path
) -> None:
    """A clean disconnect (NBD_CMD_DISC: qemu powering off) ends a stateless machine's
    boot: the next one starts from the image version. A connection that drops without a
    word keeps the delta (the machine may be running still, and reconnect); so does a
    stateful machine."""
    server.start()

    async def write_and_drop(export: str) -> None:
        client = await NbdClient.connect("127.0.0.1", server.port, export)
        assert (await client.request(Cmd.WRITE, 8192, data=b"\x66" * 4096))[0] == 0
        assert (await client.request(Cmd.FLUSH, 0, 0))[0] == 0
        client.writer.transport.abort()  # no NBD_CMD_DISC

    asyncio.run(write_and_drop("machine/m2"))
    wait_for(lambda: cli.json("machine", "show", "m2")["delta_bytes"] == 4096, 10)
    ok(qemu_io(server.url("machine/m2"), "read -P 0x66 8192 4096"))  # kept, and said goodbye
    # the boot it ended is over: the next opening of the disk is a new boot, from the image
    out = ok(qemu_io(server.url("machine/m2"), "read -v 8192 16", read_only=True))
    assert "66 66 66" not in out
    wait_for(lambda: cli.json("machine", "show", "m2")["delta_bytes"] == 0, 10)
    ok(qemu_io(server.url("machine/m1"), "write -P 0x66 8192 4096"))  # stateful: kept
    assert cli.json("machine", "show", "m1")["delta_bytes"] == 4096


def test_32_concurrent_clients_read_the_same_image(
    server: Server, image: Path, tmp_path: Path
) -> None:
    server.start()
    expected = hashlib.sha256(image.read_bytes()).hexdigest()

    def copy(i: int) -> str:
        out = tmp_path / f"c{i}.raw"
        subprocess.run(
            ["nbdcopy", server.url("base@1" if i % 2 else "machine/m1"), str(out)],
            check=True,
            capture_output=True,
        )
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        out.unlink()
        return digest

    with ThreadPoolExecutor(32) as pool:
        digests = list(pool.map(copy, range(32)))
    assert digests == [expected] * 32


def test_fio_verifies_random_writes_through_the_nbd_engine(server: Server, image: Path) -> None:
    server.start()
    proc = subprocess.run(
        [
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={server.url('machine/m1')}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    job = report["jobs"][0]
    assert (
        job["error"] == 0
        and job["write"]["io_bytes"] == 8 * MiB
        and job["read"]["io_bytes"] == 8 * MiB
    )


def test_delta_commit_makes_a_new_version(
    server: Server, cli: Cli, image: Path, tmp_path: Path
) -> None:
    server.start()
    ok(qemu_io(server.url("machine/m1"), "write -P 0x42 3000000 100000", "flush"))
    view = tmp_path / "view.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", server.url("machine/m1"), str(view)], check=True
    )
    server.stop()
    result = cli.json("delta", "commit", "m1", "--repin")
    assert result["ref"] == "base@2" and result["changed_chunks"] == 1
    assert cli.json("machine", "show", "m1")["image"] == "base@2"
    out = tmp_path / "v2.raw"
    cli("image", "export", "base@2", str(out))
    assert out.read_bytes() == view.read_bytes()
    server.start()
    copy = tmp_path / "after.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", server.url("machine/m1"), str(copy)], check=True
    )
    assert copy.read_bytes() == view.read_bytes()


def test_image_versions_in_use_cannot_be_removed(cli: Cli, image: Path) -> None:
    result = cli("image", "rm", "base@1", check=False)
    assert result.code == 9 and "m1" in result.err and len(result.err.splitlines()) == 1
    cli("machine", "rm", "m1")
    cli("machine", "rm", "m2")
    assert cli.json("image", "rm", "base")["removed"] == ["base@1"]


def test_repin_keeps_the_delta_until_the_target_is_known(
    server: Server, cli: Cli, image: Path
) -> None:
    server.start()
    ok(qemu_io(server.url("machine/m1"), "write -P 0xab 0 65536", "flush"))
    server.stop()
    assert cli("machine", "set", "m1", "--image", "bsae@2", check=False).code == 3  # a typo
    assert cli.json("machine", "show", "m1")["delta_bytes"] == 65536
    same = cli("machine", "set", "m1", "--image", "base@1")  # what it runs: no change
    assert same.out == "m1: unchanged\n"
    assert cli.json("machine", "show", "m1")["delta_bytes"] == 65536
    with open(image, "r+b") as f:  # a new version of the disk
        f.write(b"v2")
    assert cli("image", "import", "base", str(image)).out.strip() == "base@2"
    # m1 is stateful: its delta is its data, and re-pinning goes only when confirmed
    refused = cli("machine", "set", "m1", "--image", "base@2", check=False)
    assert refused.code == 13 and "holds 64.0 KiB" in refused.err
    assert cli.json("machine", "show", "m1")["delta_bytes"] == 65536
    shown = cli.json("machine", "set", "m1", "--image", "base@2", "--force")
    assert shown["image"] == "base@2" and shown["delta_bytes"] == 0


def test_a_recreated_machine_gets_its_own_seed_from_a_running_server(
    server: Server, cli: Cli, image: Path, tmp_path: Path
) -> None:
    from lamina.identity import read_seed_iso

    server.start()
    first = nbdcopy(server.url("machine/m2/seed"), tmp_path / "s1.iso")
    cli("machine", "rm", "m2")
    new_id = cli.json("machine", "add", "m2", "--image", "base")["machine_id"]
    second = nbdcopy(server.url("machine/m2/seed"), tmp_path / "s2.iso")
    assert first != second
    assert new_id in read_seed_iso(second)["meta-data"].decode()


def test_serve_fails_at_once_on_a_busy_port_or_a_busy_home(
    server: Server, cli: Cli, image: Path
) -> None:
    server.start()
    busy_http = cli(
        "serve",
        "--no-nbd",
        "--http",
        f"127.0.0.1:{server.http_port}",
        check=False,
        timeout=30,
    )
    assert busy_http.code != 0 and "cannot listen" in busy_http.err
    assert len(busy_http.err.strip().splitlines()) == 1
    second = cli("serve", "--nbd", "127.0.0.1:0", "--http", "127.0.0.1:0", check=False, timeout=30)
    assert second.code == 9 and "another `lamina serve`" in second.err


def test_a_locked_delta_is_an_error_reply_not_a_hang_up(
    server: Server, cli: Cli, image: Path
) -> None:
    from lamina.delta.file import exclusive

    server.start()
    with exclusive(cli.home / "deltas" / "m1"):  # as a commit or a reset holds it
        refused = subprocess.run(
            ["nbdinfo", server.url("machine/m1")], capture_output=True, text=True, check=False
        )
        assert refused.returncode != 0 and "replied with error to opt_go" in refused.stderr
    assert any('"refused"' in line and "in use" in line for line in server.log_lines())
    subprocess.run(["nbdinfo", server.url("machine/m1")], check=True, capture_output=True)
