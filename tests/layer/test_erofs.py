"""A layer version's EROFS image as the manager builds it: the same bytes from every build
of one tree (whenever, in whatever order its files were written out), a superblock the
kernel accepts (its checksum recomputed after the build time is zeroed), and a mount that
reads as the layer exported whole."""

from __future__ import annotations

import struct
import time
from pathlib import Path

from lamina.home import Home
from lamina.layer import erofs
from lamina.layer.importer import load_tree
from lamina.layer.overlay import mounted_at
from lamina.layer.prepare import mount_image
from tests.conftest import Cli
from tests.trees import needs_root, rich_tree, snapshot, write_tree


def test_crc32c_is_linux_s_unfinished_crc32c() -> None:
    # CRC-32C of "123456789" is 0xE3069283; the kernel's crc32c(~0, ...) is its complement
    assert erofs.crc32c_raw(b"123456789") ^ 0xFFFFFFFF == 0xE3069283


def test_settle_writes_the_checksum_mkfs_would(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"a/b": "x\n", "c": b"\0" * 5000})
    image = tmp_path / "img"
    erofs.mkfs(src, image, erofs.uuid.UUID(int=7))  # settled
    sb = bytearray(image.read_bytes()[1024:4096])
    stored = struct.unpack_from("<I", sb, 4)[0]
    struct.pack_into("<I", sb, 4, 0)
    assert erofs.crc32c_raw(bytes(sb)) == stored
    assert struct.unpack_from("<QI", sb, 24) == (0, 0)  # no build time


def _build(cli: Cli, tmp_path: Path, name: str, manifest: str) -> bytes:
    home = Home(cli.home)
    try:
        mid = bytes.fromhex(manifest)
        image = erofs.build(home.store, load_tree(home.store, mid), mid, tmp_path / name)
        return image.read_bytes()
    finally:
        home.close()


@needs_root
def test_same_tree_same_image_and_it_reads_as_exported(cli: Cli, tmp_path: Path) -> None:
    info = cli.json("layer", "import", "rich", str(rich_tree(tmp_path / "src")), "--allow-setuid")
    first = _build(cli, tmp_path, "one", info["manifest"])
    time.sleep(1.1)  # another second of build time
    assert _build(cli, tmp_path, "two", info["manifest"]) == first
    image = tmp_path / "image.erofs"
    image.write_bytes(first)
    exported = tmp_path / "exported"
    cli("layer", "export", "rich@1", str(exported))
    target = mount_image(tmp_path / "host", bytes.fromhex(info["manifest"]), image)
    assert mounted_at(target) is not None
    assert snapshot(target) == snapshot(exported)
