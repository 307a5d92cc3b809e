"""Layer data between the manager and this host's home (its chunk store is the cache
every mount on the host shares).

Down: a layer version's manifest and the chunks it references that the local store lacks,
fetched in parallel from ``/api/v1/chunks/{id}``, each envelope checked against its id
before it is kept; then the version is recorded locally under the manager's ``NAME@V``.
Up (a writable layer's new version at logout): ask which chunks the manager lacks, send
those in batches, then the manager records the version in the logout call.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamina.errors import CorruptObject, NotFound, ProtocolError
from lamina.home import Home
from lamina.layer.importer import load_tree
from lamina.manager.client import ManagerClient
from lamina.store import codec

# 8 parallel fetches: chunks of file layers are small (files up to 1 MiB are one chunk),
# so latency, not bandwidth, bounds a single connection (managers without batches).
PARALLEL = 8
BATCH = 1024  # ids a batch request asks for
UPLOAD_BATCH = 16 << 20
_RECORD = struct.Struct(">32sI")


@dataclass(frozen=True, slots=True)
class Fetched:
    ref: str
    chunks: int  # fetched now (0: all were cached)
    bytes: int


def _get_envelope(client: ManagerClient, cid: bytes) -> bytes:
    for _attempt in range(3):
        envelope = client.request("GET", f"/chunks/{cid.hex()}").content
        try:
            codec.decode(envelope, expected=cid)
            return envelope
        except CorruptObject:
            continue  # damaged in transit: fetch it again
    raise CorruptObject(f"chunk {cid.hex()[:16]} arrived corrupt three times", chunk_id=cid)


def _batches_from(client: ManagerClient, wanted: list[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """(id, envelope) of ``wanted`` through ``POST /chunks/batch``, which answers a prefix of
    the ids asked each time; envelopes that fail their check are asked for again."""
    pending = list(wanted)
    retries = 0
    while pending:
        ids = [c.hex() for c in pending[:BATCH]]
        body = client.request("POST", "/chunks/batch", json={"ids": ids}).content
        got, pos = [], 0
        while pos < len(body):
            cid, size = _RECORD.unpack_from(body, pos)
            envelope = body[pos + _RECORD.size : pos + _RECORD.size + size]
            pos += _RECORD.size + size
            try:
                codec.decode(envelope, expected=cid)
            except CorruptObject:
                continue  # damaged in transit: it stays pending
            got.append(cid)
            yield cid, envelope
        if not got:
            retries += 1
            if retries == 3:
                raise CorruptObject("chunks arrived corrupt three times", chunk_id=pending[0])
        done = set(got)
        pending = [c for c in pending if c not in done]


def _fetch_all(home: Home, client: ManagerClient, ids: Iterable[bytes]) -> tuple[int, int]:
    wanted = [c for c in dict.fromkeys(ids) if not home.store.has(c)]
    if not wanted:
        return 0, 0
    total = 0
    try:
        with home.store.writer() as writer:
            for cid, envelope in _batches_from(client, wanted):
                writer.put_envelope(cid, envelope)
                total += len(envelope)
        return len(wanted), total
    except (NotFound, ProtocolError) as exc:
        # An older manager: no such route (404 "Not Found"), or only GET on its path (405).
        if str(exc) != "Not Found" and "405" not in str(exc):
            raise
    # A manager without batches: one request per chunk, in parallel.
    wanted = [c for c in wanted if not home.store.has(c)]
    total = 0
    with (
        ThreadPoolExecutor(PARALLEL, thread_name_prefix="fetch") as pool,
        home.store.writer() as writer,
    ):
        for cid, envelope in zip(
            wanted, pool.map(lambda c: _get_envelope(client, c), wanted), strict=True
        ):
            writer.put_envelope(cid, envelope)
            total += len(envelope)
    return len(wanted), total


def ensure_version(
    home: Home,
    client: ManagerClient,
    layer: dict[str, Any],
    kind: str,
    *,
    lazy: bool = False,
    ca: Path | None = None,
) -> Fetched:
    """Make ``layer`` ({name, version, manifest}) mountable here; fetch what is missing
    (``lazy``: only its metadata, its data when read, see ``lamina.agent.lazy``)."""
    from lamina.agent import lazy as lazily
    from lamina.agent import local_versions

    name, version, manifest = layer["name"], int(layer["version"]), layer["manifest"]
    ref = f"{name}@{version}"
    mid = bytes.fromhex(manifest)
    with home.session() as session:
        if local_versions.has_version(session, name=name, version=version, manifest=manifest):
            lazily.serve(home, mid)  # a lazily attached version's server, after a restart
            return Fetched(ref, 0, 0)
    chunks, size = _fetch_all(home, client, [mid])
    tree = load_tree(home.store, mid)
    if lazy and kind == "app":
        lazily.attach(home, client, layer, tree, ca=ca)
        more, more_bytes = 0, 0
    else:
        more, more_bytes = _fetch_all(home, client, tree.referenced())
    with home.session() as session:
        local_versions.record(
            session,
            name=name,
            kind=kind,
            version=version,
            manifest=manifest,
            files=sum(1 for e in tree if e.path),
            size=tree.data_bytes,
            policy=layer.get("policy"),
        )
    return Fetched(ref, chunks + more, size + more_bytes)


def _batches(home: Home, ids: list[bytes]) -> Iterator[bytes]:
    buf = bytearray()
    for cid in ids:
        envelope = home.store.get_envelope(cid)
        buf += _RECORD.pack(cid, len(envelope)) + envelope
        if len(buf) >= UPLOAD_BATCH:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


def upload_version(home: Home, client: ManagerClient, ref: str) -> dict[str, Any]:
    """Send a local writable-layer version's data; returns the logout's ``writable`` body."""
    from lamina.agent import local_versions

    with home.session() as session:
        manifest, files, size, bases, _policy = local_versions.version_facts(session, ref=ref)
    mid = bytes.fromhex(manifest)
    ids = [*sorted(load_tree(home.store, mid).referenced()), mid]  # the manifest last
    missing: list[bytes] = []
    for start in range(0, len(ids), 10_000):
        part = [c.hex() for c in ids[start : start + 10_000]]
        answer = client.json("POST", "/chunks/missing", json={"ids": part})
        missing += [bytes.fromhex(c) for c in answer["ids"]]
    for body in _batches(home, missing):
        client.request(
            "POST", "/chunks", content=body, headers={"Content-Type": "application/octet-stream"}
        )
    return {"manifest": manifest, "files": files, "size": size, "bases": bases}
