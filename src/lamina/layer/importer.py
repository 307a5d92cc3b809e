"""Turn a layer source into a tree in the chunk store: scan (check everything), then store.

File data is cut into content-defined chunks (``cdc_boundaries``; files up to 1 MiB are
one chunk), so a file shared by two layers, or by two versions of one layer, is stored
once. The manifest (``lamina.layer.tree``) is one more object in the store.

``import_tree`` calls ``commit`` (which records the manifest in the database) while the
store writer still holds the store's shared lock, so ``store gc`` cannot collect a chunk
this import found already present and reused (the same contract as image imports).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TypeVar

from lamina.errors import InvalidInput
from lamina.home import Home
from lamina.layer.builder import Built, DataRef, Permits, TreeBuilder
from lamina.layer.records import APP, LayerRecords, NewVersion
from lamina.layer.sources import LayerSource
from lamina.layer.tree import Chunk, Entry, Kind, Tree
from lamina.names import check_name
from lamina.store import ChunkStore, Writer
from lamina.store.chunker import cdc_boundaries

R = TypeVar("R")
Progress = Callable[[int], None]
# Data is chunked in windows of this size, so a file of any size needs bounded memory;
# the chunk cut just before a window's end is re-cut with the next window.
WINDOW = 16 << 20


@dataclass(frozen=True, slots=True)
class Imported:
    tree: Tree
    manifest_id: bytes
    files: int
    size: int  # bytes of file data
    new_chunks: int
    stored_bytes: int  # bytes this import added to the store


def new_version(imported: Imported, source: str) -> NewVersion:
    """What ``imported`` stored, as a layer version is recorded (``source``: what made it)."""
    return NewVersion(
        imported.manifest_id,
        imported.files,
        imported.size,
        imported.stored_bytes,
        source,
    )


def scan(source: LayerSource, permits: Permits = Permits(), *, root: bool = True) -> Built:
    """Pass one: every member checked and applied; nothing is written."""
    builder = TreeBuilder(permits)
    source.scan(builder)
    return builder.finish(root=root)


def store_stream(writer: Writer, stream: IO[bytes]) -> tuple[list[Chunk], int, int, int]:
    """Chunk a file's data into the store: (chunks, length, new chunks, stored bytes)."""
    chunks: list[Chunk] = []
    buf = bytearray()
    total = new = stored = 0
    eof = False
    while not eof:
        data = stream.read(WINDOW)
        eof = not data
        buf += data
        total += len(data)
        if not eof and len(buf) < WINDOW:
            continue
        ends = cdc_boundaries(memoryview(buf))
        if not eof and len(ends) > 1:
            ends = ends[:-1]  # the last cut may move once more data arrives
        elif not eof:
            continue
        start = 0
        for end in ends:
            # A copy: the writer keeps what it is given until its pack is written.
            put = writer.put(bytes(buf[start:end]))
            chunks.append((put.chunk_id, end - start))
            new += put.new
            stored += put.stored
            start = end
        del buf[:start]
    return chunks, total, new, stored


def store_files(
    writer: Writer, source: LayerSource, built: Built, progress: Progress | None = None
) -> tuple[Tree, int, int]:
    """Pass two: the data of every surviving file; (tree with chunks, new chunks, bytes)."""
    wanted: dict[DataRef, str] = {ref: path for path, ref in built.refs.items()}
    filled: dict[str, Entry] = {}
    new = stored = 0

    def sink(ref: DataRef, stream: IO[bytes]) -> None:
        nonlocal new, stored
        path = wanted[ref]
        chunks, size, n, s = store_stream(writer, stream)
        new, stored = new + n, stored + s
        entry = built.tree.get(path) or Entry(path, Kind.FILE)
        filled[path] = replace(entry, chunks=tuple(chunks), size=size)
        if progress is not None:
            progress(size)

    source.read(wanted, sink)
    missing = [p for p in built.refs if p not in filled]
    if missing:
        raise InvalidInput(f"{source.description}: could not read {missing[0]!r}")
    return Tree(tuple(filled.get(e.path, e) for e in built.tree)), new, stored


def store_manifest(writer: Writer, tree: Tree, new: int = 0, stored: int = 0) -> Imported:
    """Put a tree's manifest (its files' data already in) and sum up what was added."""
    put = writer.put(tree.to_bytes())
    files = sum(1 for e in tree if e.path)
    return Imported(tree, put.chunk_id, files, tree.data_bytes, new + put.new, stored + put.stored)


def store_tree(
    writer: Writer, source: LayerSource, built: Built, progress: Progress | None = None
) -> Imported:
    tree, new, stored = store_files(writer, source, built, progress)
    return store_manifest(writer, tree, new, stored)


def import_tree(
    store: ChunkStore,
    source: LayerSource,
    commit: Callable[[Imported], R],
    *,
    permits: Permits = Permits(),
    progress: Progress | None = None,
    built: Built | None = None,
) -> tuple[R, Imported]:
    """Scan ``source`` (refusing it before anything is written), store it, ``commit``."""
    if built is None:
        built = scan(source, permits)
    with store.writer() as writer:
        imported = store_tree(writer, source, built, progress)
        writer.flush()
        return commit(imported), imported


def load_tree(store: ChunkStore, manifest_id: bytes) -> Tree:
    return Tree.from_bytes(store.get(manifest_id))


def import_layer(
    home: Home,
    records: LayerRecords,
    name: str,
    src: Path,
    *,
    allow_devices: bool = False,
    allow_setuid: bool = False,
    progress: Progress | None = None,
) -> tuple[str, Imported]:
    """``layer import``: SRC (directory, tar, OCI layout or docker archive) -> ``NAME@N``."""
    from lamina.layer.oci import open_source

    check_name(name, "layer name")
    permits = Permits(allow_devices=allow_devices, allow_setuid=allow_setuid)
    with open_source(src, tmp_dir=home.tmp_dir) as source:
        built = scan(source, permits)

        def commit(imported: Imported) -> str:
            return records.add_version(name=name, kind=APP, new=new_version(imported, str(src)))

        return import_tree(home.store, source, commit, built=built, progress=progress)
