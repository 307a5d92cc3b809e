"""Files read out of file systems that e2fsprogs made (mkfs -d from a tree, debugfs to
make unwritten extents): every file, link and directory reads as in the source tree."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from lamina.errors import InvalidInput, NotFound
from lamina.netboot.ext4 import Ext4

MiB = 1 << 20
Read = Callable[[int, int], bytes]


def source_tree(root: Path) -> Path:
    """Files of many shapes: tiny, block-sized, large, sparse with many holes (an extent
    tree deeper than the inode holds), a directory big enough to be hashed, symlinks short
    (kept in the inode) and long (kept in a block), absolute and relative."""
    (root / "boot").mkdir(parents=True)
    (root / "boot" / "vmlinuz-6.1.0-9").write_bytes(os.urandom(3 * MiB + 123))
    (root / "boot" / "initrd.img-6.1.0-9").write_bytes(os.urandom(1 * MiB))
    (root / "vmlinuz").symlink_to("boot/vmlinuz-6.1.0-9")
    (root / "etc").mkdir()
    (root / "etc" / "os-release").write_text("ID=test\n")
    (root / "etc" / "tiny").write_bytes(b"x")
    (root / "etc" / "block").write_bytes(os.urandom(4096))
    with open(root / "sparse", "wb") as f:  # 40 data runs between holes: 40 extents
        for i in range(40):
            f.seek(i * 256 * 1024)
            f.write(os.urandom(5000))
    many = root / "many"
    many.mkdir()
    for i in range(1000):  # more than a block of names: a hashed directory
        (many / f"entry-{i:05d}").write_text(str(i))
    deep = root / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "file").write_text("deep")
    (root / "long-link").symlink_to("/" + "x" * 70 + "/../etc/os-release")
    (root / ("x" * 70)).mkdir()
    (root / "up").symlink_to("a/b/c/../../../etc")
    return root


def make_fs(image: Path, tree: Path, *args: str, size: int = 64 * MiB) -> Read:
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", *args, "-d", str(tree), str(image)],
        check=True,
        capture_output=True,
    )
    data = image.read_bytes()
    return lambda offset, length: data[offset : offset + length]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return source_tree(tmp_path_factory.mktemp("tree") / "root")


@pytest.mark.parametrize(
    "args",
    [
        (),  # ext4 defaults: extents, 64bit, flex_bg, metadata_csum, 4 KiB blocks
        ("-b", "1024"),
        ("-O", "^64bit,^metadata_csum"),
        ("-t", "ext2", "-b", "1024"),  # the classic block map: single and double indirect
        ("-t", "ext3", "-b", "2048"),
    ],
    ids=["ext4", "ext4-1k", "ext4-32bit", "ext2-1k", "ext3-2k"],
)
def test_every_file_reads_as_in_the_tree(tmp_path: Path, tree: Path, args: tuple[str, ...]) -> None:
    fs = Ext4(make_fs(tmp_path / "fs.img", tree, *args))
    for path in tree.rglob("*"):
        inside = "/" + str(path.relative_to(tree))
        if path.is_symlink():
            assert fs.link_target(fs.lookup_no_follow(inside)) == os.readlink(path)
        elif path.is_dir():
            assert set(fs.listdir(inside)) - {".", ".."} == set(os.listdir(path))
        else:
            assert fs.read_file(inside) == path.read_bytes(), inside


def test_symlinks_are_followed_inside_the_file_system(tmp_path: Path, tree: Path) -> None:
    fs = Ext4(make_fs(tmp_path / "fs.img", tree))
    kernel = (tree / "boot" / "vmlinuz-6.1.0-9").read_bytes()
    assert fs.read_file("/vmlinuz") == kernel
    assert fs.read_file("/long-link") == b"ID=test\n"  # absolute, through a '..'
    assert fs.read_file("/up/os-release") == b"ID=test\n"
    with pytest.raises(NotFound):
        fs.read_file("/boot/missing")
    with pytest.raises(InvalidInput, match="not a regular file"):
        fs.read_file("/boot")


def test_unwritten_extents_read_as_zeros(tmp_path: Path, tree: Path) -> None:
    image = tmp_path / "fs.img"
    make_fs(image, tree)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    script = tmp_path / "debugfs.cmd"
    # ten allocated, never written blocks inside the file's size (what fallocate(1) makes)
    script.write_text(
        f"write {empty} /etc/prealloc\nfallocate /etc/prealloc 0 9\nsif /etc/prealloc size 40960\n"
    )
    subprocess.run(
        ["debugfs", "-w", "-f", str(script), str(image)], check=True, capture_output=True
    )
    data = image.read_bytes()
    fs = Ext4(lambda o, n: data[o : o + n])
    inode = fs.lookup("/etc/prealloc")
    runs = fs._runs(inode)
    assert runs and all(physical == 0 for _, _, physical in runs)  # unwritten: no data to read
    assert fs.read_file("/etc/prealloc") == bytes(40960)


def test_features_it_cannot_follow_are_refused_by_name(tmp_path: Path, tree: Path) -> None:
    with pytest.raises(InvalidInput, match="inline_data"):
        Ext4(make_fs(tmp_path / "fs.img", tree, "-O", "inline_data"))


def test_not_an_ext_file_system(tmp_path: Path) -> None:
    data = bytes(8 * MiB)
    with pytest.raises(InvalidInput, match="0xEF53"):
        Ext4(lambda o, n: data[o : o + n])


def test_a_damaged_directory_is_refused_not_looped_on(tmp_path: Path, tree: Path) -> None:
    image = tmp_path / "fs.img"
    read = make_fs(image, tree, "-O", "^metadata_csum")
    fs = Ext4(read)
    root = fs.inode(2)
    data = bytearray(image.read_bytes())
    (_logical, _count, block), *_ = fs._runs(root)
    at = block * fs.block_size
    data[at + 4 : at + 6] = (3).to_bytes(2, "little")  # a record length under 8
    broken = Ext4(lambda o, n: bytes(data[o : o + n]))
    with pytest.raises(InvalidInput, match="damaged"):
        broken.listdir("/")
