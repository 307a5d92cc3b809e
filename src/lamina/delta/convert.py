"""Moving blocks between open deltas (``lamina.delta.file``) and delta blobs.

Used on both sides of a sync: the endpoint exports its sealed delta as a blob and merges
it into its synced layer; the manager applies an uploaded blob to a machine's delta and
exports a stateful machine's delta for a first start.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from lamina.delta import transfer
from lamina.delta.file import BLOCK, Delta
from lamina.delta.transfer import DATA, ZEROS, Run

# Data runs are read and written 1 MiB at a time: memory stays flat for any delta size.
PIECE_BLOCKS = 256


def delta_runs(delta: Delta) -> Iterator[Run]:
    """Every block the delta holds, as runs of data or zeros (base runs left out)."""
    for run in delta.runs(0, delta.blocks):
        if run.kind == "base":
            continue
        if run.kind == "zero":
            yield Run(run.first, run.count, ZEROS)
            continue
        for start in range(0, run.count, PIECE_BLOCKS):
            n = min(PIECE_BLOCKS, run.count - start)
            yield Run(run.first + start, n, DATA, delta.read_slots(run.slot + start, n))


def count_runs(delta: Delta) -> int:
    n = 0
    for run in delta.runs(0, delta.blocks):
        if run.kind == "zero":
            n += 1
        elif run.kind == "delta":
            n += -(-run.count // PIECE_BLOCKS)
    return n


def write_blob(delta: Delta, base_id: bytes, path: Path) -> int:
    """Write the delta as a blob to ``path`` (fsynced); returns its length in bytes."""
    enc = transfer.Encoder(delta.size, base_id, count_runs(delta))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(enc.head)
        for run in delta_runs(delta):
            for part in enc.run(run):
                f.write(part)
        f.write(enc.trailer())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def read_blob(path: Path) -> transfer.Blob:
    """A blob file, mapped and checked (its data runs are views into the mapping)."""
    return transfer.decode(transfer.map_file(path))


def apply_runs(delta: Delta, runs: list[Run]) -> int:
    """Write the runs into ``delta`` and make them durable; returns the blocks written.
    Idempotent: applying the same runs again leaves the same contents."""
    total = 0
    for run in transfer.split(runs, PIECE_BLOCKS):
        if run.kind == ZEROS:
            delta.zero_blocks(run.first, run.count)
        else:
            assert run.data is not None
            data = memoryview(run.data)
            end = min((run.first + run.count) * BLOCK, delta.size)
            delta.write_blocks(run.first, data[: end - run.first * BLOCK])
        total += run.count
    delta.flush()  # every write above moved the delta's generation: this syncs them
    return total
