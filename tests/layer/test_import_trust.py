"""Layer imports trust nothing: a small compressed archive cannot fill HOME/tmp, every
OCI digest is checked or refused, a blob may not be a symlink, links may not escape
through a chain of links, and values out of range are refused with one clear line."""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from tests.conftest import LAMINA, Cli
from tests.trees import member, oci_layout, tar_bytes

MiB = 1 << 20


def _layer() -> bytes:
    return tar_bytes([member("etc"), member("etc/motd", b"hello\n")])


class Zeros(io.RawIOBase):
    """``size`` zero bytes, produced as they are read."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


def _bomb(path: Path, size: int) -> Path:
    """A zstd-compressed tar whose first member looks like an OCI blob of ``size`` zeros
    (a few hundred KB for gigabytes), and nothing an image needs after it."""
    with (
        open(path, "wb") as raw,
        zstandard.ZstdCompressor(level=1).stream_writer(raw) as out,
        tarfile.open(fileobj=out, mode="w|") as tf,
    ):
        info = tarfile.TarInfo("blobs/sha256/" + "0" * 64)
        info.size = size
        tf.addfile(info, Zeros(size))
    return path


def _import_with_file_limit(home: Path, src: Path, limit: int) -> subprocess.CompletedProcess[str]:
    """`lamina layer import` unable to write a file beyond ``limit`` bytes (SIGXFSZ)."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [LAMINA, "layer", "import", "bomb", str(src)],
        env={**os.environ, "LAMINA_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=cap,
        check=False,
    )


def test_a_small_compressed_archive_cannot_fill_the_home(cli: Cli, tmp_path: Path) -> None:
    """2 GiB of zeros in about 70 KB: refused after unpacking no more than 256 MiB (on
    main every byte went to HOME/tmp before the archive was found not to be an image)."""
    bomb = _bomb(tmp_path / "bomb.tar.zst", 2 << 30)
    assert bomb.stat().st_size < MiB
    cli("store", "du")  # the home exists
    result = _import_with_file_limit(cli.home, bomb, 256 * MiB)
    assert result.returncode == 5, (result.returncode, result.stderr)
    assert "unpacks to more than" in result.stderr and result.stderr.count("\n") == 1
    assert not list((cli.home / "tmp").glob("image-*"))  # nothing left behind


def test_a_compressed_archive_with_members_no_image_has_is_refused_at_once(
    cli: Cli, tmp_path: Path
) -> None:
    data = tar_bytes([member("oci-layout", b"{}"), member("etc/passwd", b"root:x:0:0\n")])
    src = tmp_path / "odd.tar.zst"
    src.write_bytes(zstandard.ZstdCompressor().compress(data))
    result = cli("layer", "import", "odd", str(src), check=False)
    assert result.code == 5 and "etc/passwd" in result.err and "not part of" in result.err


def test_sha512_digests_are_checked(cli: Cli, tmp_path: Path) -> None:
    layout = oci_layout(tmp_path / "oci", [_layer()], algorithm="sha512")
    cli("layer", "import", "img", str(layout))
    out = tmp_path / "out"
    cli("layer", "export", "img", str(out))
    assert (out / "etc/motd").read_text() == "hello\n"
    blob = next(p for p in (layout / "blobs/sha512").iterdir() if p.read_bytes() == _layer())
    blob.write_bytes(tar_bytes([member("etc"), member("etc/motd", b"tampered\n")]))
    result = cli("layer", "import", "img", str(layout), check=False)
    assert result.code == 5 and "digest" in result.err


def test_a_manifest_that_does_not_match_its_digest_is_refused(cli: Cli, tmp_path: Path) -> None:
    layout = oci_layout(tmp_path / "oci", [_layer()])
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = layout / "blobs/sha256" / digest
    doc = json.loads(manifest.read_text())
    doc["annotations"] = {"changed": "yes"}
    manifest.write_text(json.dumps(doc))
    result = cli("layer", "import", "img", str(layout), check=False)
    assert result.code == 5 and "digest" in result.err


@pytest.mark.parametrize("algorithm", ["md5", "sha384", "blake2b"])
def test_digest_algorithms_oci_does_not_allow_are_refused(
    cli: Cli, tmp_path: Path, algorithm: str
) -> None:
    layout = oci_layout(tmp_path / "oci", [_layer()], algorithm=algorithm)
    result = cli("layer", "import", "img", str(layout), check=False)
    assert result.code == 5 and f"digest algorithm {algorithm!r}" in result.err


def test_a_symlinked_blob_is_refused(cli: Cli, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_bytes(_layer())
    layout = oci_layout(tmp_path / "oci", [_layer()])
    blob = next(p for p in (layout / "blobs/sha256").iterdir() if p.read_bytes() == _layer())
    blob.unlink()
    blob.symlink_to(secret)
    result = cli("layer", "import", "img", str(layout), check=False)
    assert result.code == 5 and "symlink" in result.err
    # a symlinked folder of blobs too
    (layout / "blobs/sha256").rename(tmp_path / "elsewhere")
    (layout / "blobs/sha256").symlink_to(tmp_path / "elsewhere")
    assert cli("layer", "import", "img", str(layout), check=False).code == 5


def _link(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info, _ = member(name, type=tarfile.SYMTYPE)
    info.linkname = target
    return info, None


def test_a_chain_of_links_that_escapes_is_refused(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "chain.tar"
    src.write_bytes(tar_bytes([member("d"), _link("d/b", ".."), _link("d/x", "b/..")]))
    result = cli("layer", "import", "chain", str(src), check=False)
    assert result.code == 5 and "'d/x'" in result.err and "escapes" in result.err
    fine = tmp_path / "fine.tar"
    fine.write_bytes(tar_bytes([member("d"), _link("d/b", ".."), _link("d/x", "b/d")]))
    cli("layer", "import", "fine", str(fine))


def _tar_with(**attrs: object) -> Iterator[bytes]:
    info, _ = member("f", b"hello")
    for key, value in attrs.items():
        setattr(info, key, value)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info.size = len(b"hello")
        tf.addfile(info, io.BytesIO(b"hello"))
    yield buf.getvalue()


@pytest.mark.parametrize(
    ("attrs", "word"),
    [
        ({"mtime": -(10**12)}, "mtime"),
        ({"mtime": 10**12}, "mtime"),
        ({"uid": 1 << 40}, "uid"),
        ({"gid": 1 << 40}, "gid"),
        ({"type": tarfile.CHRTYPE, "devmajor": 1 << 40, "devminor": 1}, "device"),
    ],
)
def test_values_out_of_range_are_refused_clearly(
    cli: Cli, tmp_path: Path, attrs: dict[str, object], word: str
) -> None:
    src = tmp_path / "odd.tar"
    src.write_bytes(next(_tar_with(**attrs)))
    result = cli("layer", "import", "odd", str(src), "--allow-devices", check=False)
    assert result.code == 5, result.err
    assert word in result.err and "internal error" not in result.err
