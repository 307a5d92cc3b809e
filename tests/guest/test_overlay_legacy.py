"""The overlay mount of kernels before 6.8 (no "lowerdir+", 255 bytes a fsconfig value):
many layers with long paths, through mount(2), as a detached mount like the new API's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamina.layer import mountapi, overlay
from tests.trees import needs_root

pytestmark = needs_root


def test_many_long_lower_paths_compose_without_lowerdir_plus(tmp_path: Path) -> None:
    lowers = []
    for i in range(6):  # 6 x ~100 bytes: far beyond one fsconfig value
        layer = tmp_path / "layers" / f"{i:02d}-{'x' * 80}"
        layer.mkdir(parents=True)
        (layer / f"file{i}").write_text(f"{i}\n")
        (layer / "shared").write_text(f"from {i}\n")
        lowers.append(layer)
    assert len(":".join(map(str, lowers))) > 255
    for sub in ("upper", "work", "root"):
        (tmp_path / sub).mkdir()
    fd = overlay._compose_legacy(lowers, tmp_path / "upper", tmp_path / "work")
    overlay.mount_new(fd, tmp_path / "root")
    try:
        names = sorted(os.listdir(tmp_path / "root"))
        assert names == [*(f"file{i}" for i in range(6)), "shared"]
        assert (tmp_path / "root/shared").read_text() == "from 0\n"  # the first wins
        (tmp_path / "root/new").write_text("written\n")
        assert (tmp_path / "upper/new").read_text() == "written\n"
        # the staging mount is gone; only the detached one was attached
        assert overlay.mounted_at(tmp_path / "work.stage") is None
        assert not (tmp_path / "work.stage").exists()
    finally:
        mountapi.umount(tmp_path / "root")


def test_a_refused_legacy_mount_leaves_no_staging_directory(tmp_path: Path) -> None:
    for sub in ("upper", "work"):
        (tmp_path / sub).mkdir()
    with pytest.raises(OSError):
        overlay._compose_legacy([tmp_path / "missing"], tmp_path / "upper", tmp_path / "work")
    assert not (tmp_path / "work.stage").exists()
