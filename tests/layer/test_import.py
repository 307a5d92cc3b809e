"""layer import from directories, tars (plain, gz, zst) and image archives, through the CLI:
what goes in comes back out by ``layer export``, bit for bit and attribute for attribute.

Tests whose trees or exports carry other owners, devices or capabilities, or that mount,
need root; the refusals, image archives and plain round trips run as any user."""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from lamina.home import Home
from lamina.manager.services import layers
from tests.conftest import Cli
from tests.trees import (
    docker_archive,
    member,
    needs_root,
    oci_layout,
    rich_tree,
    snapshot,
    tar_bytes,
    write_tree,
)

MiB = 1 << 20


@needs_root
def test_directory_round_trip_keeps_everything(cli: Cli, tmp_path: Path) -> None:
    src = rich_tree(tmp_path / "src")
    # the rich tree has a file with capabilities: allowed explicitly, like setuid
    info = cli.json("layer", "import", "rich", str(src), "--allow-setuid")
    assert info["ref"] == "rich@1" and info["files"] == 15
    out = tmp_path / "out"
    cli("layer", "export", "rich", str(out))
    assert snapshot(out) == snapshot(src)
    one, two = (out / "srv/data/one").stat(), (out / "srv/data/two").stat()
    assert one.st_ino == two.st_ino and one.st_nlink == 2  # still one inode
    assert (out / "usr/bin/tool").stat().st_blocks * 512 < 8 * MiB  # zero chunks: holes


@needs_root
@pytest.mark.parametrize("compression", ["none", "gz", "zst"])
def test_tar_import_matches_directory_import(cli: Cli, tmp_path: Path, compression: str) -> None:
    src = rich_tree(tmp_path / "src")
    plain = tmp_path / "t.tar"
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--format=pax",
            "-cf",
            str(plain),
            "-C",
            str(src),
            ".",
        ],
        check=True,
    )
    data = plain.read_bytes()
    tar = {"none": plain, "gz": tmp_path / "t.tar.gz", "zst": tmp_path / "t.tar.zst"}[compression]
    if compression == "gz":
        tar.write_bytes(gzip.compress(data))
    elif compression == "zst":
        tar.write_bytes(zstandard.ZstdCompressor().compress(data))
    cli("layer", "import", "from-dir", str(src), "--allow-setuid")
    info = cli.json("layer", "import", "from-tar", str(tar), "--allow-setuid")
    # identical file data: only the manifest is new (the store dedups across layers)
    assert info["new_chunks"] <= 1 and info["stored_bytes"] < 4096
    diff = cli.json("layer", "diff", "from-dir", "from-tar")
    assert diff["added"] == diff["removed"] == []
    assert diff["changed"] == []  # owners, modes, xattrs, link targets and data all agree
    out = tmp_path / "out"
    cli("layer", "export", "from-tar", str(out))
    assert snapshot(out) == snapshot(src)


def test_versions_diff_list_log_rm(cli: Cli, tmp_path: Path) -> None:
    v1 = write_tree(tmp_path / "v1", {"a": "1", "b": "1", "d/c": "1"})
    v2 = write_tree(tmp_path / "v2", {"a": "2", "b": "1", "e": "new"})
    assert cli("layer", "import", "app", str(v1)).out.strip() == "app@1"
    assert cli("layer", "import", "app", str(v2)).out.strip() == "app@2"
    d = cli.json("layer", "diff", "app@1", "app@2")
    assert (d["added"], d["removed"], d["changed"]) == (["/e"], ["/d", "/d/c"], ["/a"])
    text = cli("layer", "diff", "app@1", "app@2").out.splitlines()
    assert sorted(text) == ["A /e", "D /d", "D /d/c", "M /a"]  # the same paths as the JSON
    listed = cli.json("layer", "list")
    assert [(r["name"], r["versions"], r["latest"]) for r in listed] == [("app", 2, 2)]
    assert [r["ref"] for r in cli.json("layer", "log", "app")] == ["app@1", "app@2"]
    cli("layer", "rm", "app@1")
    assert [r["ref"] for r in cli.json("layer", "log", "app")] == ["app@2"]
    missing = cli("layer", "export", "app@1", str(tmp_path / "x"), check=False)
    assert missing.code == 3 and missing.err.count("\n") == 1


def _hostile(name: str) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    good = [member("big", os.urandom(2 * MiB))]  # would be stored first if checks were late
    bad = {
        "dotdot": [member("../evil", b"x")],
        "absolute": [member("/etc/evil", b"x")],
        "symlink-escape": [member("l", type=tarfile.SYMTYPE, linkname="../../etc/shadow")],
        "hardlink-escape": [member("h", type=tarfile.LNKTYPE, linkname="/etc/shadow")],
        "through-symlink": [
            member("etc", type=tarfile.SYMTYPE, linkname="/etc"),
            member("etc/cron.d/evil", b"x"),
        ],
        "device": [member("dev/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0)],
        "setuid": [member("bin/su", b"x", mode=0o4755)],
        # cap_setuid+ep: as good as setuid root once mounted
        "capability": [
            member(
                "bin/tool",
                b"x",
                pax_headers={
                    "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x80\x00"
                    "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
                },
            )
        ],
    }[name]
    return good + bad


@pytest.mark.parametrize(
    "name",
    [
        "dotdot",
        "absolute",
        "symlink-escape",
        "hardlink-escape",
        "through-symlink",
        "device",
        "setuid",
        "capability",
    ],
)
def test_hostile_tars_are_refused_before_anything_is_written(
    cli: Cli, home: Home, tmp_path: Path, name: str
) -> None:
    tar = tmp_path / "hostile.tar"
    tar.write_bytes(tar_bytes(_hostile(name)))
    result = cli("layer", "import", "evil", str(tar), check=False)
    assert result.code == 5, result.err
    assert result.err.startswith("lamina: ") and result.err.count("\n") == 1
    with home.session() as session:
        assert layers.list_layers(session) == []
    assert home.store.usage().chunks == 0  # not even the good member's data


@needs_root
def test_devices_and_setuid_need_their_flags(cli: Cli, tmp_path: Path) -> None:
    tar = tmp_path / "dev.tar"
    tar.write_bytes(
        tar_bytes(
            [
                member("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
                member("bin/su", b"su", mode=0o4755),
            ]
        )
    )
    # one attempt names both, and both flags
    refused = cli("layer", "import", "d", str(tar), check=False)
    assert refused.code == 5 and refused.err.strip().splitlines() == [
        "lamina: refused 1 device nodes ('dev/null'); 1 setuid/setgid files ('bin/su'): "
        "allow with --allow-devices --allow-setuid"
    ]
    assert cli("layer", "import", "d", str(tar), "--allow-devices", check=False).code == 5
    cli("layer", "import", "d", str(tar), "--allow-devices", "--allow-setuid")
    out = tmp_path / "out"
    cli("layer", "export", "d", str(out))
    st = (out / "dev/null").lstat()
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_IMODE((out / "bin/su").stat().st_mode) == 0o4755


def _image_layers() -> list[bytes]:
    base = tar_bytes(
        [
            member("etc"),
            member("etc/motd", b"base motd\n"),
            member("etc/old.conf", b"old\n"),
            member("opt/app/lib/a.so", b"a"),
            member("opt/app/lib/b.so", b"b"),
        ]
    )
    top = tar_bytes(
        [
            member("etc/.wh.old.conf", b""),
            member("opt/app/lib/.wh..wh..opq", b""),
            member("opt/app/lib/c.so", b"c"),
            member("etc/motd", b"top motd\n"),
        ]
    )
    return [base, gzip.compress(top)]


def _check_image(cli: Cli, tmp_path: Path, ref: str) -> None:
    out = tmp_path / f"out-{ref}"
    cli("layer", "export", ref, str(out))
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["etc/motd", "opt/app/lib/c.so"]  # whiteout and opaque directory applied
    assert (out / "etc/motd").read_text() == "top motd\n"
    assert not list(out.rglob(".wh.*"))


def test_oci_layout_directory_and_tar(cli: Cli, tmp_path: Path) -> None:
    layout = oci_layout(tmp_path / "oci", _image_layers())
    cli("layer", "import", "img", str(layout))
    _check_image(cli, tmp_path, "img@1")
    archive = tmp_path / "oci.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(layout), "."], check=True)
    # the same image as a tar: the same tree, so the version it already is
    assert cli("layer", "import", "img", str(archive)).out.strip() == "unchanged, img@1"
    assert [v["ref"] for v in cli.json("layer", "log", "img")] == ["img@1"]


def test_docker_save_archive_plain_and_gzipped(cli: Cli, tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "docker.tar", _image_layers())
    cli("layer", "import", "dock", str(archive))
    _check_image(cli, tmp_path, "dock@1")
    gz = tmp_path / "docker.tar.gz"
    gz.write_bytes(gzip.compress(archive.read_bytes()))
    assert cli.json("layer", "import", "dock", str(gz))["unchanged"]
    cli("layer", "import", "dock2", str(gz))
    _check_image(cli, tmp_path, "dock2@1")


def test_oci_blob_with_wrong_digest_is_refused(cli: Cli, tmp_path: Path) -> None:
    layout = oci_layout(tmp_path / "oci", _image_layers())
    blob = next(
        p for p in (layout / "blobs/sha256").iterdir() if p.read_bytes().startswith(b"\x1f\x8b")
    )
    blob.write_bytes(gzip.compress(tar_bytes([member("etc/motd", b"tampered\n")])))
    result = cli("layer", "import", "img", str(layout), check=False)
    assert result.code == 5 and "digest" in result.err


def test_not_an_archive(cli: Cli, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(5000))
    result = cli("layer", "import", "x", str(junk), check=False)
    assert result.code == 5 and result.err.count("\n") == 1
    assert cli("layer", "import", "x", str(tmp_path / "missing"), check=False).code == 3


def test_gc_keeps_layer_chunks_and_frees_them_after_rm(cli: Cli, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"big": os.urandom(3 * MiB), "small": "s"})
    cli("layer", "import", "keep", str(src))
    cli("store", "gc")
    out = tmp_path / "out"
    cli("layer", "export", "keep", str(out))
    assert (out / "big").read_bytes() == (src / "big").read_bytes()
    cli("layer", "rm", "keep")
    freed = cli.json("store", "gc")
    assert freed["chunks_removed"] >= 3 and cli.json("store", "du")["chunks"] == 0


@needs_root
def test_hard_link_sorting_before_its_target_exports_and_mounts(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "z").write_bytes(b"shared inode\n")
    os.link(src / "a" / "z", src / "a" / "b" / "c")  # "a/b/c" sorts before "a/z"
    cli("layer", "import", "links", str(src))
    out = tmp_path / "out"
    cli("layer", "export", "links", str(out))
    assert (out / "a/b/c").stat().st_ino == (out / "a/z").stat().st_ino
    root = tmp_path / "root"
    root.mkdir()
    cli("mount", str(root), "--layer", "links")
    try:
        assert (root / "a/b/c").read_bytes() == b"shared inode\n"
    finally:
        cli("umount", str(root))
