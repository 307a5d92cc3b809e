"""Machine deltas: a machine's writes on top of its pinned image version.

Shared by the block server (a machine's disk), the streaming endpoint (its local delta
stack and syncs) and the manager (applying uploaded deltas, commits, resets).

file.py       the delta on disk (map LMDM + data file): open, read, write, flush, discard
device.py     a machine's disk as a block device: image version + delta
transfer.py   delta blobs (LMSD): a delta's blocks as one self-checking byte stream (pure)
convert.py    blocks between an open delta and a blob (export, apply)
uploads.py    staged delta uploads applied to a machine's delta atomically, once
"""
