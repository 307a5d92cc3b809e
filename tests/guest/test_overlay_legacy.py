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


def test_a_kernel_without_lowerdir_plus_is_asked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refusal is a line in the kernel's log: after the first, mount(2) directly.
    (Linux < 6.8 cannot run here: its refusal is played by a stand-in for new_mount.)"""
    asked: list[int] = []

    def refuse(fstype: str, params: object) -> int:
        asked.append(1)
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(mountapi, "new_mount", refuse)
    monkeypatch.setattr(overlay, "_REFUSED", set())
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "f").write_text("f\n")
    for i in range(2):
        for sub in (f"upper{i}", f"work{i}", f"root{i}"):
            (tmp_path / sub).mkdir()
        fd = overlay.compose([layer], tmp_path / f"upper{i}", tmp_path / f"work{i}")
        overlay.mount_new(fd, tmp_path / f"root{i}")
        try:
            assert (tmp_path / f"root{i}/f").read_text() == "f\n"
        finally:
            mountapi.umount(tmp_path / f"root{i}")
    assert len(asked) == 1
