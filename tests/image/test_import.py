"""Block images end to end through the real CLI (qemu-img for the non-raw formats)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lamina.store.chunker import IMAGE_CHUNK
from tests.conftest import LAMINA, Cli, write_sparse

MiB = 1 << 20


def _image(path: Path, size: int = 32 * MiB) -> Path:
    extents = [(0, os.urandom(3 * MiB)), (8 * MiB, b"lamina" * 100000), (20 * MiB, os.urandom(MiB))]
    return write_sparse(path, size, extents)


def test_raw_round_trip_is_byte_identical_and_sparse(cli: Cli, tmp_path: Path) -> None:
    src = _image(tmp_path / "disk.raw")
    assert cli("image", "import", "base", str(src)).out.strip() == "base@1"
    out = tmp_path / "out.raw"
    cli("image", "export", "base@1", str(out))
    assert out.read_bytes() == src.read_bytes()
    assert out.stat().st_blocks * 512 < 12 * MiB  # holes stay holes


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx", "vpc"])
def test_other_formats_import_through_qemu_img(cli: Cli, tmp_path: Path, fmt: str) -> None:
    src = _image(tmp_path / "disk.raw")
    converted = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "convert", "-O", fmt, str(src), str(converted)], check=True)
    info = cli.json("image", "import", "img", str(converted))
    assert info["format"] == fmt
    out = tmp_path / "back.raw"
    cli("image", "export", "img", str(out))
    # vpc rounds the size up to its CHS geometry; the data must match where both exist
    assert out.read_bytes()[: src.stat().st_size] == src.read_bytes()


def test_qcow2_export_round_trip(cli: Cli, tmp_path: Path) -> None:
    src = _image(tmp_path / "disk.raw")
    qcow = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(src), str(qcow)], check=True)
    cli("image", "import", "q", str(qcow))
    out = tmp_path / "out.qcow2"
    cli("image", "export", "q", str(out), "--format", "qcow2")
    assert (
        "file format: qcow2"
        in subprocess.run(
            ["qemu-img", "info", str(out)], capture_output=True, text=True, check=True
        ).stdout
    )
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(out)], check=False
    )
    assert cmp.returncode == 0


def test_sparse_10gib_imports_without_reading_holes(cli: Cli, tmp_path: Path) -> None:
    src = write_sparse(tmp_path / "big.raw", 10 << 30, [(5 << 30, os.urandom(MiB))])
    started = time.monotonic()
    info = cli.json("image", "import", "big", str(src))
    assert time.monotonic() - started < 20
    assert info["size"] == 10 << 30
    assert info["bytes_read"] <= MiB + IMAGE_CHUNK  # only the chunks around the data
    assert MiB <= info["stored_bytes"] <= MiB + 64 * 1024 + 400 * 1024  # + headers and manifest
    du = cli.json("store", "du")
    assert du["stored_bytes"] < 1.5 * MiB


def test_one_changed_byte_adds_at_most_one_chunk(cli: Cli, tmp_path: Path) -> None:
    src = _image(tmp_path / "disk.raw")
    cli("image", "import", "base", str(src))
    with open(src, "r+b") as f:
        f.seek(21 * MiB + 12345)
        byte = f.read(1)
        f.seek(21 * MiB + 12345)
        f.write(bytes([byte[0] ^ 0xFF]))
    second = cli.json("image", "import", "base", str(src))
    assert second["ref"] == "base@2"
    assert second["new_chunks"] == 1
    log = cli.json("image", "log", "base")
    assert [v["ref"] for v in log] == ["base@1", "base@2"]
    assert all(v["unique_bytes"] <= IMAGE_CHUNK + 64 for v in log)


@pytest.mark.parametrize("kind", ["missing", "text", "truncated-qcow2"])
def test_bad_input_gives_one_line_and_leaves_store_valid(
    cli: Cli, tmp_path: Path, kind: str
) -> None:
    cli("image", "import", "good", str(_image(tmp_path / "good.raw")))
    if kind == "missing":
        bad = tmp_path / "absent.raw"
    elif kind == "text":
        bad = tmp_path / "notes.txt"
        bad.write_text("not a disk image\n")
    else:
        qcow = tmp_path / "full.qcow2"
        subprocess.run(
            ["qemu-img", "convert", "-O", "qcow2", str(_image(tmp_path / "x.raw")), str(qcow)],
            check=True,
        )
        bad = tmp_path / "cut.qcow2"
        bad.write_bytes(qcow.read_bytes()[: qcow.stat().st_size // 2])
    result = cli("image", "import", "bad", str(bad), check=False)
    assert result.code != 0
    assert len(result.err.strip().splitlines()) == 1 and result.err.startswith("lamina: ")
    assert "Traceback" not in result.err
    assert cli.json("store", "verify")["ok"]
    assert [i["name"] for i in cli.json("image", "list")] == ["good"]


def test_kill_9_during_import_leaves_a_valid_store(cli: Cli, tmp_path: Path) -> None:
    src = write_sparse(tmp_path / "big.raw", 256 * MiB, [(0, os.urandom(200 * MiB))])
    for delay in (0.3, 0.8, 1.5):
        env = {**os.environ, "LAMINA_HOME": str(cli.home)}
        proc = subprocess.Popen(
            [LAMINA, "image", "import", "big", str(src)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert cli.json("store", "verify")["ok"]
    cli("store", "gc")  # takes what the killed imports left behind, temporaries included
    assert not [p for p in (cli.home / "store").rglob(".*.tmp")]
    assert cli.json("store", "verify")["ok"]
    cli("image", "import", "big", str(src))
    out = tmp_path / "out.raw"
    cli("image", "export", "big", str(out))
    assert out.read_bytes() == src.read_bytes()


def test_gc_with_concurrent_imports_loses_nothing(cli: Cli, tmp_path: Path) -> None:
    sources = []
    for i in range(4):
        sources.append(
            write_sparse(
                tmp_path / f"d{i}.raw",
                64 * MiB,
                [(0, os.urandom(24 * MiB)), (40 * MiB, os.urandom(8 * MiB))],
            )
        )
    # shared chunks: every image carries d0's first 8 MiB, which a concurrent gc must keep
    head = sources[0].read_bytes()[: 8 * MiB]
    for src in sources[1:]:
        with open(src, "r+b") as f:
            f.write(head)
    cli("image", "import", "seed", str(sources[0]))
    cli("image", "rm", "seed")  # its chunks are now garbage, unless an import reuses them
    env = {**os.environ, "LAMINA_HOME": str(cli.home)}
    imports = [
        subprocess.Popen(
            [LAMINA, "image", "import", f"img{i}", str(s)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i, s in enumerate(sources)
    ]
    gcs = 0
    while any(p.poll() is None for p in imports):
        cli("store", "gc")
        gcs += 1
    assert all(p.wait() == 0 for p in imports)
    cli("store", "gc")
    assert gcs >= 1
    assert cli.json("store", "verify")["ok"]
    for i, src in enumerate(sources):
        out = tmp_path / f"o{i}.raw"
        cli("image", "export", f"img{i}", str(out))
        assert out.read_bytes() == src.read_bytes()


def test_images_that_refer_to_other_files_are_refused(cli: Cli, tmp_path: Path) -> None:
    secret = write_sparse(tmp_path / "secret.raw", MiB, [(0, b"root:x:0:0:root:/root:/bin/bash\n")])
    backed = tmp_path / "backed.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(secret),
            "-F",
            "raw",
            str(backed),
            "1M",
        ],
        check=True,
    )
    flat = tmp_path / "flat.vmdk"
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentFlat",
            str(secret),
            str(flat),
        ],
        check=True,
    )
    for image in (backed, flat):
        result = cli("image", "import", "evil", str(image), check=False)
        assert result.code == 5 and "refers to other files" in result.err, result.err
    assert cli.json("image", "list") == []
    # the same data, flattened into one file, is fine
    single = tmp_path / "single.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(backed), str(single)], check=True)
    assert cli("image", "import", "ok", str(single)).out.strip() == "ok@1"


def test_version_numbers_are_never_handed_out_twice(cli: Cli, tmp_path: Path) -> None:
    disks = [_image(tmp_path / f"disk{i}.raw") for i in range(4)]  # four different disks
    cli("image", "import", "base", str(disks[0]))
    cli("image", "import", "base", str(disks[1]))
    cli("image", "rm", "base@2")
    assert cli("image", "import", "base", str(disks[2])).out.strip() == "base@3"
    cli("image", "rm", "base")
    assert cli("image", "import", "base", str(disks[3])).out.strip() == "base@4"


def test_an_identical_disk_gives_back_its_version(cli: Cli, tmp_path: Path) -> None:
    src = _image(tmp_path / "disk.raw")
    assert cli("image", "import", "base", str(src)).out.strip() == "base@1"
    again = cli.json("image", "import", "base", str(src))
    assert again["ref"] == "base@1" and again["unchanged"] and again["new_chunks"] == 0
    qcow = tmp_path / "disk.qcow2"  # the same disk in another format is the same content
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(src), str(qcow)], check=True)
    assert cli("image", "import", "base", str(qcow)).out.strip() == "unchanged, base@1"
    with open(src, "r+b") as f:
        f.write(b"changed")
    assert cli("image", "import", "base", str(src)).out.strip() == "base@2"
    assert [v["ref"] for v in cli.json("image", "log", "base")] == ["base@1", "base@2"]
    # under another name it is a version of that image
    assert cli("image", "import", "copy", str(qcow)).out.strip() == "copy@1"
