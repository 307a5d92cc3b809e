"""A layer image mounted through a loop device set up in-process (kernels without
file-backed EROFS, such as Debian 12's 6.1): the files read back, the device is read-only
and bound to the image, and the kernel frees it when the mount goes."""

from __future__ import annotations

import struct
from pathlib import Path

from lamina.layer import loop, mountapi, prepare
from lamina.layer.overlay import mounted_at
from tests.servers import wait_for
from tests.trees import needs_root, write_tree


def test_the_config_is_linux_s_struct_loop_config() -> None:
    raw = loop.config(7, loop.LO_FLAGS_READ_ONLY | loop.LO_FLAGS_AUTOCLEAR)
    assert len(raw) == 304  # 4 + 4 + sizeof(struct loop_info64) 232 + 8 * 8 reserved
    assert struct.unpack_from("=II", raw) == (7, 0)
    assert struct.unpack_from("=I", raw, 8 + 52) == (5,)  # lo_flags
    assert raw.count(0) == len(raw) - 2


@needs_root
def test_an_image_mounts_through_a_loop_device_freed_with_its_mount(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"usr/bin/app": "#!/bin/sh\necho app\n", "etc": None})
    image = tmp_path / "app.erofs"
    prepare.mkfs(src, image)
    target = tmp_path / "mnt"
    target.mkdir()
    prepare._loop_mount(image, target)
    try:
        found = mounted_at(target)
        assert found is not None and found.fstype == "erofs"
        device = Path(found.source)
        assert device.name.startswith("loop")
        assert loop.backing_file(device) == str(image)
        assert (target / "usr/bin/app").read_text() == "#!/bin/sh\necho app\n"
        assert (Path("/sys/block") / device.name / "ro").read_text().strip() == "1"
    finally:
        mountapi.umount(target)
    # LO_FLAGS_AUTOCLEAR: the last user gone, the kernel unbinds the device
    wait_for(lambda: loop.backing_file(device) is None, 10.0)
