"""Delta blobs, the local delta stack and the manager's staged uploads (files, no sockets)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamina.delta import transfer, uploads
from lamina.delta.convert import apply_runs, delta_runs, write_blob
from lamina.delta.file import Delta
from lamina.delta.transfer import DATA, ZEROS, Run
from lamina.errors import Conflict, CorruptObject, InvalidInput
from lamina.home import Home
from lamina.nbd import ExportInfo
from lamina.nbd.device import BlockDevice, MemoryDevice
from lamina.stream.stack import DeltaStack

SIZE = 1 << 20  # 256 blocks
BASE = bytes(range(32))


def test_blob_round_trip_and_every_damage_is_caught() -> None:
    runs = [Run(0, 2, DATA, os.urandom(8192)), Run(10, 5, ZEROS), Run(255, 1, DATA, bytes(4096))]
    blob = transfer.encode(SIZE, BASE, runs)
    back = transfer.decode(blob)
    assert back.size == SIZE and back.base_id == BASE and back.blocks == 8
    assert [(r.first, r.count, r.kind) for r in back.runs] == [(0, 2, 1), (10, 5, 2), (255, 1, 1)]
    assert bytes(back.runs[0].data or b"") == runs[0].data
    assert transfer.digest(blob) == blob[-32:]
    for pos in (0, 5, 70, 100, len(blob) - 40, len(blob) - 1):
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(CorruptObject):
            transfer.decode(bytes(bad))
    with pytest.raises(CorruptObject):
        transfer.decode(blob[:-1])
    with pytest.raises(ValueError):
        transfer.encode(SIZE, BASE, [Run(255, 2, ZEROS)])  # past the end
    assert transfer.decode(transfer.encode(SIZE, BASE, [])).runs == []


def test_delta_to_blob_and_back(tmp_path: Path) -> None:
    src = Delta(tmp_path / "a", size=SIZE, base_id=BASE)
    data = os.urandom(3 * 4096)
    src.write_blocks(7, data)
    src.zero_blocks(100, 3)
    src.write_blocks(8, b"x" * 4096)  # rewrites a block in place
    path = tmp_path / "a.blob"
    write_blob(src, BASE, path)
    runs = list(delta_runs(src))
    src.close()
    dst = Delta(tmp_path / "b", size=SIZE, base_id=BASE)
    blob = transfer.decode(path.read_bytes())
    assert apply_runs(dst, blob.runs) == 6
    assert apply_runs(dst, blob.runs) == 6  # twice: same contents
    assert [(r.first, r.count, r.kind) for r in delta_runs(dst)] == [
        (r.first, r.count, r.kind) for r in runs
    ]
    assert dst.read_slots(dst.map[8] - 1, 1) == b"x" * 4096
    assert dst.read_slots(dst.map[9] - 1, 1) == data[8192:]
    dst.close()


def _stack_device(stack: DeltaStack, image: bytes) -> BlockDevice:
    info = ExportInfo("m", SIZE, read_only=False)
    return stack.device(info, MemoryDevice(info, image))


def test_stack_seal_merge_keeps_reads_and_survives_reopening(tmp_path: Path) -> None:
    image = os.urandom(SIZE)
    root = tmp_path / "deltas"
    stack = DeltaStack(root, size=SIZE, base_id=BASE)
    dev = _stack_device(stack, image)
    dev.write(4096, b"A" * 4096, False)
    stack.seal("u1")
    dev = _stack_device(stack, image)
    dev.write(8192, b"B" * 100, False)  # a partial block
    assert stack.local_blocks() == 2
    stack.close()
    # a crash now: reopening finds the sealed layer still in place
    stack = DeltaStack(root, size=SIZE, base_id=BASE)
    assert stack.state.sealed == "d000001" and stack.state.next_step() == "upload"
    dev = _stack_device(stack, image)
    got = b"".join(dev.read(0, 3 * 4096))
    assert got == image[:4096] + b"A" * 4096 + b"B" * 100 + image[8192 + 100 : 3 * 4096]
    write_blob(stack.sealed, BASE, root / "u1.blob")  # type: ignore[arg-type]
    stack.confirm()
    apply_runs(stack.synced, transfer.decode((root / "u1.blob").read_bytes()).runs)
    stack.finish_merge()
    assert stack.state.sealed is None and not (root / "d000001").exists()
    assert stack.local_blocks() == 1 and stack.synced.used_blocks == 1
    dev = _stack_device(stack, image)
    assert b"".join(dev.read(0, 3 * 4096)) == got
    stack.drop_local()  # a stateless restart
    dev = _stack_device(stack, image)
    assert b"".join(dev.read(0, 3 * 4096)) == image[:4096] + b"A" * 4096 + image[8192 : 3 * 4096]
    stack.close()
    with pytest.raises(Conflict):  # the deltas are locked while open
        held = DeltaStack(root, size=SIZE, base_id=BASE)
        DeltaStack(root, size=SIZE, base_id=BASE)
    held.close()


def _upload(home: Home, machine: str, uid: str, blob: bytes, part: int = 1000) -> None:
    for offset in range(0, len(blob), part):
        uploads.receive(home, machine, uid, offset, blob[offset : offset + part], image_size=SIZE)


def test_staged_upload_changes_nothing_until_applied_and_applies_once(home: Home) -> None:
    blob = transfer.encode(SIZE, BASE, [Run(3, 1, DATA, b"z" * 4096), Run(9, 2, ZEROS)])
    uid = "ab" * 16
    _upload(home, "m", uid, blob[:-10])
    assert uploads.state(home, "m", uid) == {"received": len(blob) - 10, "applied": False}
    with pytest.raises(Conflict):  # not all there yet
        uploads.apply(
            home, "m", uid, size=len(blob), digest=blob[-32:].hex(), base_id=BASE, image_size=SIZE
        )
    with pytest.raises(Conflict):  # a gap
        uploads.receive(home, "m", uid, len(blob), b"x", image_size=SIZE)
    _upload(home, "m", uid, blob)  # a retry from the start overwrites with the same bytes
    assert not (home.deltas_dir / "m" / "delta.map").exists()  # nothing applied yet
    with pytest.raises(InvalidInput):
        uploads.apply(
            home, "m", uid, size=len(blob), digest="00" * 32, base_id=BASE, image_size=SIZE
        )
    with pytest.raises(Conflict):
        uploads.apply(
            home,
            "m",
            uid,
            size=len(blob),
            digest=blob[-32:].hex(),
            base_id=bytes(32),
            image_size=SIZE,
        )
    held = Delta(home.deltas_dir / "m", size=SIZE, base_id=BASE)  # the machine is connected
    with pytest.raises(Conflict):
        uploads.apply(
            home, "m", uid, size=len(blob), digest=blob[-32:].hex(), base_id=BASE, image_size=SIZE
        )
    assert held.used_blocks == 0
    held.close()
    first = uploads.apply(
        home, "m", uid, size=len(blob), digest=blob[-32:].hex(), base_id=BASE, image_size=SIZE
    )
    again = uploads.apply(
        home, "m", uid, size=len(blob), digest=blob[-32:].hex(), base_id=BASE, image_size=SIZE
    )
    assert first["applied"] and again["applied"] and first["blocks"] == again["blocks"] == 3
    d = Delta(home.deltas_dir / "m", size=SIZE, base_id=BASE)
    assert d.used_blocks == 3 and d.read_slots(d.map[3] - 1, 1) == b"z" * 4096
    d.close()
    with pytest.raises(Conflict):
        uploads.receive(home, "m", uid, 0, b"late", image_size=SIZE)


def test_an_apply_cut_short_after_its_commit_point_is_finished_by_recover(home: Home) -> None:
    blob = transfer.encode(SIZE, BASE, [Run(0, 4, DATA, os.urandom(4 * 4096))])
    uid = "cd" * 16
    _upload(home, "m", uid, blob)
    staged = uploads.uploads_dir(home, "m") / uid
    (staged / "applying").touch()  # the commit point was reached, then the process died
    assert uploads.recover(home, "m") == 1
    assert uploads.state(home, "m", uid)["applied"]
    assert uploads.recover(home, "m") == 0
    d = Delta(home.deltas_dir / "m", size=SIZE, base_id=BASE)
    assert d.used_blocks == 4
    d.close()


def test_staged_uploads_are_bounded_expire_and_are_forgotten(home: Home) -> None:
    most = transfer.max_size(SIZE)
    everything = transfer.encode(
        SIZE, BASE, [Run(i, 1, DATA, bytes(4096)) for i in range(0, 256, 2)]
    )
    assert len(everything) < most
    with pytest.raises(uploads.TooLarge):  # past the largest blob a delta of SIZE makes
        uploads.receive(home, "m", "0" * 32, most - 10, bytes(11), image_size=SIZE)
    with pytest.raises(InvalidInput):  # ids match whole: a trailing newline is refused
        uploads.receive(home, "m", "a" * 32 + "\n", 0, b"x", image_size=SIZE)
    ids = [f"{i:032x}" for i in range(1, uploads.MAX_OPEN + 1)]
    for uid in ids:
        uploads.receive(home, "m", uid, 0, b"part", image_size=SIZE)
    with pytest.raises(Conflict, match="unfinished uploads"):
        uploads.receive(home, "m", "f" * 32, 0, b"part", image_size=SIZE)
    uploads.receive(home, "m", ids[0], 4, b"more", image_size=SIZE)  # open ones go on
    old = uploads.uploads_dir(home, "m") / ids[1]
    past = os.stat(old / "blob").st_mtime - uploads.ABANDONED_AFTER - 60
    os.utime(old / "blob", (past, past))
    uploads.receive(home, "m", "f" * 32, 0, b"part", image_size=SIZE)  # the stale one made room
    assert not old.exists()
    assert uploads.state(home, "m", ids[0]) == {"received": 8, "applied": False}
    assert uploads.forget(home, "m") == uploads.MAX_OPEN
    assert not uploads.uploads_dir(home, "m").exists()
    assert uploads.state(home, "m", ids[0]) == {"received": 0, "applied": False}
    assert uploads.forget(home, "m") == 0
