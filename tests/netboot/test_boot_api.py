"""Network boot over a real `lamina serve`: the scripts iPXE gets by MAC, the boot files a
MAC may fetch, new devices, auto-add, and a patched image patching what machines boot."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import update

from lamina.demo.image import DemoImage
from lamina.home import Home
from lamina.manager.models import Machine
from tests.conftest import Cli
from tests.servers import Server

MAC = "52:54:00:00:00:01"
OTHER = "52:54:00:00:00:02"
MiB = 1 << 20


def script_url(server: Server, mac: str, **query: str) -> str:
    """The per-MAC URL as iPXE sends it: the colons URL-encoded (``52%3A54...``)."""
    url = f"{server.http_url}/boot/{quote(mac, safe='')}.ipxe"
    return url + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


def booting(script: str) -> bool:
    return any(line.startswith(("kernel ", "initrd ", "boot")) for line in script.splitlines())


def kernel_line(script: str) -> list[str]:
    return next(line for line in script.splitlines() if line.startswith("kernel ")).split()


def debugfs_dump(image: Path, path: str, out: Path) -> bytes:
    subprocess.run(
        ["debugfs", "-R", f"dump {path} {out}", f"{image}?offset={MiB}"],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


@pytest.fixture
def served(cli: Cli, demo: DemoImage, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """The demo image imported; ``served(*serve_args)`` starts a server on the home."""
    cli("image", "import", "demo", str(demo.path))
    servers: list[Server] = []

    def start(*args: str) -> Server:
        srv = Server(cli.home, tmp_path / f"serve-{len(servers)}.log", args=args)
        srv.start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def test_entry_script_needs_no_token(served: Callable[..., Server]) -> None:
    server = served()
    answer = httpx.get(f"{server.http_url}/boot.ipxe")
    assert answer.status_code == 200 and answer.text.startswith("#!ipxe\n")
    assert f"{server.http_url}/boot/${{net0/mac}}.ipxe" in answer.text
    assert answer.headers["cache-control"] == "no-store"


def test_unknown_mac_is_told_and_listed_then_added(
    cli: Cli, served: Callable[..., Server], demo: DemoImage, tmp_path: Path
) -> None:
    server = served()
    first = httpx.get(script_url(server, MAC, platform="efi", buildarch="x86_64", serial="SN%201"))
    assert first.status_code == 200
    assert "is not known to the manager" in first.text and not booting(first.text)
    assert f"--mac {MAC}" in first.text
    httpx.get(script_url(server, MAC, platform="efi", buildarch="x86_64"))
    (new,) = cli.json("machine", "list", "--new")
    assert (new["mac"], new["requests"], new["platform"], new["arch"]) == (MAC, 2, "efi", "x86_64")
    assert new["serial"] == "SN 1" and new["address"] == "127.0.0.1"
    assert "52:54:00:00:00:01" in cli("machine", "list", "--new").out

    cli("machine", "add", "desk-001", "--image", "demo", "--mac", MAC)
    assert cli.json("machine", "list", "--new") == []
    script = httpx.get(script_url(server, MAC)).text
    kernel = kernel_line(script)
    assert kernel[1] == f"{server.http_url}/boot/52-54-00-00-00-01/demo/1/vmlinuz"
    assert f"nbdroot=127.0.0.1:{server.port}/machine/desk-001" in kernel  # the host it reached
    assert f"lamina.seed=127.0.0.1:{server.port}/machine/desk-001/seed" in kernel
    assert "root=/dev/nbd0p1" in kernel and "console=ttyS0" in kernel
    initrd = next(line for line in script.splitlines() if line.startswith("initrd "))
    assert initrd.split()[1] == f"{server.http_url}/boot/52-54-00-00-00-01/demo/1/initrd.img"

    got = httpx.get(kernel[1])
    assert got.status_code == 200
    assert got.content == debugfs_dump(demo.path, "/boot/vmlinuz", tmp_path / "k")
    assert httpx.get(initrd.split()[1]).content == debugfs_dump(
        demo.path, "/boot/initrd.img", tmp_path / "i"
    )


def test_boot_files_open_only_to_the_mac_pinned_to_them(
    cli: Cli, served: Callable[..., Server]
) -> None:
    cli("machine", "add", "desk-001", "--image", "demo", "--mac", MAC)
    server = served()
    base = f"{server.http_url}/boot"
    assert httpx.get(f"{base}/52-54-00-00-00-01/demo/1/vmlinuz").status_code == 200
    assert httpx.get(f"{base}/{quote(MAC, safe='')}/demo/1/initrd.img").status_code == 200
    assert httpx.get(f"{base}/52-54-00-00-00-02/demo/1/vmlinuz").status_code == 404  # no machine
    assert httpx.get(f"{base}/52-54-00-00-00-01/demo/2/vmlinuz").status_code == 404  # not pinned
    assert httpx.get(f"{base}/52-54-00-00-00-01/demo/1/etc-shadow").status_code == 422
    assert httpx.get(f"{base}/not-a-mac/demo/1/vmlinuz").status_code == 422
    assert httpx.get(f"{base}/not-a-mac.ipxe").status_code == 422


def test_two_machines_claiming_one_mac_boot_neither(
    cli: Cli, served: Callable[..., Server], home: Home
) -> None:
    cli("machine", "add", "desk-001", "--image", "demo", "--mac", MAC)
    second = cli("machine", "add", "desk-002", "--image", "demo", "--mac", MAC, check=False)
    assert second.code != 0 and MAC in second.err  # refused when machines are added
    # a database from before that rule may still hold two: neither boots as the other
    cli("machine", "add", "desk-002", "--image", "demo", "--mac", OTHER)
    with home.session() as session:
        session.execute(update(Machine).where(Machine.name == "desk-002").values(mac=MAC))
    script = httpx.get(script_url(served(), MAC)).text
    assert "claimed by machines desk-001, desk-002" in script and not booting(script)


def test_an_image_without_a_kernel_tells_the_machine(
    cli: Cli, served: Callable[..., Server], tmp_path: Path
) -> None:
    blank = tmp_path / "blank.img"
    with open(blank, "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(blank)], check=True, capture_output=True)
    cli("image", "import", "blank", str(blank))
    cli("machine", "add", "desk-001", "--image", "blank", "--mac", MAC)
    server = served()
    script = httpx.get(script_url(server, MAC)).text
    assert "blank@1 cannot boot from the network:" in script and not booting(script)
    assert any('"netboot-no-kernel"' in line for line in server.log_lines())


def test_auto_add_names_new_machines_from_the_pattern(
    cli: Cli, served: Callable[..., Server]
) -> None:
    bad = cli(
        "serve", "--auto-add", "demo", "--auto-add-name", "lab", "--nbd", "127.0.0.1:0", check=False
    )
    assert bad.code == 2 and "#" in bad.err
    missing = cli(
        "serve",
        "--auto-add",
        "nosuch",
        "--nbd",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        check=False,
    )
    assert missing.code == 3 and "nosuch" in missing.err
    server = served("--auto-add", "demo@1", "--auto-add-name", "lab-##")
    assert "lab-01" in " ".join(kernel_line(httpx.get(script_url(server, MAC)).text))
    assert "lab-02" in " ".join(kernel_line(httpx.get(script_url(server, OTHER)).text))
    assert "lab-01" in " ".join(kernel_line(httpx.get(script_url(server, MAC)).text))  # again
    machines = {m["name"]: m for m in cli.json("machine", "list")}
    assert (machines["lab-01"]["mac"], machines["lab-02"]["mac"]) == (MAC, OTHER)
    assert machines["lab-01"]["mode"] == "stateless" and machines["lab-01"]["image"] == "demo@1"
    assert cli.json("machine", "list", "--new") == []


def test_boot_nbd_names_the_block_server(cli: Cli, served: Callable[..., Server]) -> None:
    cli("machine", "add", "desk-001", "--image", "demo", "--mac", MAC)
    server = served("--boot-nbd", "192.0.2.9:10999")
    assert "nbdroot=192.0.2.9:10999/machine/desk-001" in kernel_line(
        httpx.get(script_url(server, MAC)).text
    )


def test_patching_the_image_patches_what_machines_boot(
    cli: Cli, served: Callable[..., Server], demo: DemoImage, tmp_path: Path
) -> None:
    cli("machine", "add", "desk-001", "--image", "demo", "--mac", MAC)
    patched = tmp_path / "patched.img"
    shutil.copyfile(demo.path, patched)
    new_kernel = tmp_path / "vmlinuz"
    new_kernel.write_bytes(b"a patched kernel" * 1000)
    subprocess.run(
        ["debugfs", "-w", "-R", "rm /boot/vmlinuz", f"{patched}?offset={MiB}"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["debugfs", "-w", "-R", f"write {new_kernel} /boot/vmlinuz", f"{patched}?offset={MiB}"],
        check=True,
        capture_output=True,
    )
    assert cli("image", "import", "demo", str(patched)).out.strip() == "demo@2"
    server = served()
    before = kernel_line(httpx.get(script_url(server, MAC)).text)[1]
    assert before.endswith("/demo/1/vmlinuz")
    cli("machine", "set", "desk-001", "--image", "demo@2")
    after = kernel_line(httpx.get(script_url(server, MAC)).text)[1]
    assert after.endswith("/demo/2/vmlinuz")
    assert httpx.get(after).content == new_kernel.read_bytes()
    assert httpx.get(before).status_code == 404  # no longer its version
    cached = sorted(p.name for p in (cli.home / "cache" / "boot").iterdir())
    assert len(cached) == 2  # one folder of boot files per version booted


def test_the_console_lists_new_devices_as_text(cli: Cli, served: Callable[..., Server]) -> None:
    from tests.console.test_http import signed_in

    server = served()
    hostile = quote("<script>alert(1)</script>", safe="")
    httpx.get(script_url(server, MAC, platform="pcbios", product=hostile))
    with signed_in(server.http_url, cli("admin", "token").out.strip()) as (client, _csrf):
        page = client.get("/machines").text
    table = page[page.index('id="new-devices"') :]
    assert f'data-key="{MAC}"' in table and "pcbios" in table
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in table and "<script>alert" not in table
    cli("machine", "add", "desk-001", "--image", "demo", "--mac", MAC)
    with signed_in(server.http_url, cli("admin", "token").out.strip()) as (client, _csrf):
        assert 'id="new-devices"' not in client.get("/machines").text


def test_in_a_cluster_the_script_and_the_hypervisor_name_the_assigned_server(
    home: Home, cli: Cli, served: Callable[..., Server]
) -> None:
    from lamina.manager.services import servers

    with home.session() as session:
        servers.register(session, name="bs7", nbd_address="192.0.2.7:10809")
    cli("machine", "add", "desk-001", "--image", "demo", "--mac", MAC)
    assert "nbd_server: 192.0.2.7:10809" in cli("machine", "show", "desk-001").out
    server = served()
    line = kernel_line(httpx.get(script_url(server, MAC)).text)
    assert "nbdroot=192.0.2.7:10809/machine/desk-001" in line
    qemu = cli("machine", "qemu", "desk-001", "--no-tls").out
    assert "server.host=192.0.2.7,server.port=10809,export=machine/desk-001," in qemu
