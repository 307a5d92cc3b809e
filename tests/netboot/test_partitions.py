"""Partition tables read as sfdisk (util-linux) wrote them, and as it reads them back."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lamina.errors import InvalidInput
from lamina.netboot.partitions import Partition, partitions

MiB = 1 << 20
SFDISK = shutil.which("sfdisk") or "/usr/sbin/sfdisk"


def disk(path: Path, size: int, layout: str) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run([SFDISK, "-q", str(path)], input=layout.encode(), check=True)
    return path


def reader(path: Path):  # type: ignore[no-untyped-def]
    data = path.read_bytes()

    def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    return read, len(data)


def sfdisk_view(path: Path) -> list[Partition]:
    """What sfdisk itself reads from the table (the oracle), as Partitions."""
    table = json.loads(
        subprocess.run([SFDISK, "--json", str(path)], capture_output=True, check=True).stdout
    )
    out = []
    for entry in table["partitiontable"]["partitions"]:
        number = int(entry["node"].rsplit(path.name, 1)[1])
        if entry.get("type") in ("5", "f", "85"):
            continue  # the extended container itself is no file system
        out.append(Partition(number, entry["start"] * 512, entry["size"] * 512))
    return out


def test_mbr_with_logical_partitions_matches_sfdisk(tmp_path: Path) -> None:
    path = disk(
        tmp_path / "mbr.img",
        64 * MiB,
        "label: dos\n"
        "start=2048, size=20480, type=83\n"
        "start=22528, size=100000, type=5\n"
        "start=24576, size=4096, type=83\n"
        "start=30720, size=4096, type=82\n"
        "start=124000, size=2048, type=83\n",
    )
    found = partitions(*reader(path))
    assert sorted(found, key=lambda p: p.number) == sfdisk_view(path)
    assert [p.number for p in found] == [1, 5, 6, 3]  # table order: logical ones in place


def test_gpt_matches_sfdisk(tmp_path: Path) -> None:
    path = disk(
        tmp_path / "gpt.img",
        64 * MiB,
        "label: gpt\n"
        "start=2048, size=2048, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n"
        "start=8192, size=40960, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"
        "start=60000, size=1000\n",
    )
    found = partitions(*reader(path))
    assert found == sfdisk_view(path)
    assert [p.number for p in found] == [1, 2, 3]


def test_a_disk_without_a_table_is_one_file_system(tmp_path: Path) -> None:
    path = tmp_path / "bare.img"
    path.write_bytes(bytes(4 * MiB))
    assert partitions(*reader(path)) == [Partition(0, 0, 4 * MiB)]


def test_a_partition_past_the_end_is_refused(tmp_path: Path) -> None:
    path = disk(tmp_path / "mbr.img", 16 * MiB, "label: dos\nstart=2048, size=8192, type=83\n")
    data = bytearray(path.read_bytes())
    data[446 + 12 : 446 + 16] = (10**6).to_bytes(4, "little")  # a sector count too large
    read = lambda o, n: bytes(data[o : o + n])  # noqa: E731
    with pytest.raises(InvalidInput, match="past the end"):
        partitions(read, len(data))
