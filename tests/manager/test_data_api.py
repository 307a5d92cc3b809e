"""Manifests and chunks over real HTTP (lamina serve on loopback)."""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import zstandard

from lamina.image import Manifest
from lamina.layer import tree
from lamina.store import chunker, codec
from tests.conftest import Cli, write_sparse
from tests.servers import Server


def test_manifest_and_chunks_with_tokens_and_etags(
    cli: Cli, server: Server, tmp_path: Path
) -> None:
    src = write_sparse(tmp_path / "d.raw", 4 << 20, [(0, os.urandom(1 << 20))])
    cli("image", "import", "base", str(src))
    cli("image", "import", "other", str(src))
    token = cli.json("machine", "add", "m1", "--image", "base")["token"]
    admin = cli("admin", "token").out.strip()
    server.start()
    base = f"{server.http_url}/api/v1"
    with httpx.Client(base_url=base) as http:
        assert http.get("/images/base/versions/1/manifest").status_code == 401
        assert (
            http.get(
                "/images/base/versions/1/manifest", headers={"Authorization": "Bearer nope"}
            ).status_code
            == 401
        )
        ok = http.get(
            "/images/base/versions/1/manifest", headers={"Authorization": f"Bearer {token}"}
        )
        assert ok.status_code == 200 and "immutable" in ok.headers["cache-control"]
        assert "private" in ok.headers["cache-control"]  # checked per token: no shared caching
        manifest = Manifest.from_bytes(ok.content)
        assert manifest.size == 4 << 20
        etag = ok.headers["etag"]
        again = http.get(
            "/images/base/versions/1/manifest",
            headers={"Authorization": f"Bearer {token}", "If-None-Match": etag},
        )
        assert again.status_code == 304
        # a machine token opens only its own image
        assert (
            http.get(
                "/images/other/versions/1/manifest", headers={"Authorization": f"Bearer {token}"}
            ).status_code
            == 403
        )
        assert (
            http.get(
                "/images/base/versions/9/manifest", headers={"Authorization": f"Bearer {admin}"}
            ).status_code
            == 404
        )
        cid = manifest.id_at(1)  # the second 256 KiB of the file
        chunk = http.get(f"/chunks/{cid.hex()}", headers={"Authorization": f"Bearer {token}"})
        assert chunk.status_code == 200 and chunk.headers["etag"] == f'"{cid.hex()}"'
        size = manifest.chunk_size
        assert codec.decode(chunk.content, expected=cid) == src.read_bytes()[size : 2 * size]
        assert (
            http.get(
                f"/chunks/{'0' * 63}x", headers={"Authorization": f"Bearer {admin}"}
            ).status_code
            == 404
        )
        assert (
            http.get(
                f"/chunks/{'ab' * 32}", headers={"Authorization": f"Bearer {token}"}
            ).status_code
            == 403
        )
        assert (
            http.get(
                f"/chunks/{'ab' * 32}", headers={"Authorization": f"Bearer {admin}"}
            ).status_code
            == 404
        )


def _raw_post(port: int, token: str, headers: str, body: Iterator[bytes]) -> tuple[int, int]:
    """POST to /chunks ``body`` piece by piece on a raw socket until the server answers (or
    the body ends); returns the status (0: no answer within 10 s) and how many body bytes
    were sent before the answer came."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST /api/v1/chunks HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\n"
            f"Content-Type: application/octet-stream\r\n{headers}\r\n".encode()
        )
        for piece in body:
            if select.select([sock], [], [], 0)[0]:
                break  # answered before the body was all there
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        answer = b""
        try:
            while b"\r\n" not in answer:
                part = sock.recv(4096)
                if not part:
                    break
                answer += part
        except TimeoutError:
            return 0, sent
    return int(answer.split(b" ", 2)[1]), sent


def _chunked(total: int, piece: int = 1 << 20) -> Iterator[bytes]:
    data = b"\0" * piece
    for _ in range(total // piece):
        yield f"{piece:x}\r\n".encode() + data + b"\r\n"
    yield b"0\r\n\r\n"


def _zeros_envelope(claimed: int, magic: bytes = b"") -> tuple[bytes, bytes]:
    """A record whose header claims ``claimed`` bytes of plaintext (``magic``, then zeros),
    made without holding that much: zstd of zeros is tiny."""
    compressor = zstandard.ZstdCompressor().compressobj()
    payload = compressor.compress(magic)
    zeros = b"\0" * (1 << 20)
    left = claimed - len(magic)
    while left > 0:
        payload += compressor.compress(zeros[: min(left, len(zeros))])
        left -= len(zeros)
    payload += compressor.flush()
    cid = bytes(32)  # what the plaintext hashes to does not matter: it is refused first
    head = codec.HEADER.pack(
        codec.MAGIC, codec.VERSION, codec.CODEC_ZSTD, 0, claimed, len(payload), cid
    )
    return cid, head + payload


def test_chunk_uploads_are_bounded_while_they_are_read(
    cli: Cli, server: Server, tmp_path: Path
) -> None:
    cli("image", "import", "base", str(write_sparse(tmp_path / "d.raw", 1 << 20, [])))
    token = cli.json("machine", "add", "m1", "--image", "base")["token"]
    server.start()
    port = server.http_port
    # a length over 256 MiB is refused from the headers, no byte of the body needed
    status, _ = _raw_post(port, token, f"Content-Length: {(256 << 20) + 1}\r\n", iter([]))
    assert status == 413
    # a body without a length is refused once 256 MiB came, not after all of it
    status, sent = _raw_post(port, token, "Transfer-Encoding: chunked\r\n", _chunked(400 << 20))
    assert status == 413 and sent < 300 << 20, sent
    base = f"http://127.0.0.1:{port}/api/v1"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as http:

        def post(cid: bytes, envelope: bytes) -> httpx.Response:
            return http.post("/chunks", content=cid + struct.pack(">I", len(envelope)) + envelope)

        # a record claiming 1 GiB (a few KiB of zstd) is refused before it is unpacked
        r = post(*_zeros_envelope(1 << 30))
        assert r.status_code == 413 and "at most 4 MiB" in r.json()["detail"], r.text
        # over 4 MiB only a layer manifest passes, up to 256 MiB
        r = post(*_zeros_envelope(5 << 20))
        assert r.status_code == 413, r.text
        r = post(*_zeros_envelope((256 << 20) + 1, tree.MAGIC))
        assert r.status_code == 413, r.text
        # ... that compresses as a manifest does, not 32 times or more
        r = post(*_zeros_envelope(5 << 20, tree.MAGIC))
        assert r.status_code == 413 and "compresses" in r.json()["detail"], r.text
        manifest = tree.MAGIC + os.urandom(5 << 20)
        r = post(codec.chunk_id(manifest), codec.encode(manifest))
        assert r.status_code == 200 and r.json()["stored"] == 1, r.text
        # the largest file chunk passes
        data = os.urandom(chunker.CDC_MAX)
        r = post(codec.chunk_id(data), codec.encode(data))
        assert r.status_code == 200 and r.json()["stored"] == 1, r.text


def test_a_chunk_upload_in_progress_does_not_hold_up_database_writes(
    cli: Cli, server: Server, tmp_path: Path
) -> None:
    import time

    cli("image", "import", "base", str(write_sparse(tmp_path / "d.raw", 1 << 20, [])))
    token = cli.json("machine", "add", "m1", "--image", "base")["token"]
    admin = cli("admin", "token").out.strip()
    server.start()
    port = server.http_port
    with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
        # an upload whose body is still on its way: the caller is known, the body is not
        slow.sendall(
            f"POST /api/v1/chunks HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {1 << 20}\r\n\r\n".encode()
            + b"\0" * 100
        )
        time.sleep(0.5)
        started = time.monotonic()
        added = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/users",
            json={"name": "alice"},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=60,
        )
        assert added.status_code == 201, added.text
        assert time.monotonic() - started < 10  # not queued behind the upload's transaction


def records(body: bytes) -> list[tuple[bytes, bytes]]:
    out, pos, head = [], 0, struct.Struct(">32sI")
    while pos < len(body):
        cid, size = head.unpack_from(body, pos)
        out.append((cid, body[pos + head.size : pos + head.size + size]))
        pos += head.size + size
    return out


def test_chunk_batches_answer_what_a_token_may_read_in_one_round_trip(
    cli: Cli, server: Server, tmp_path: Path
) -> None:
    src = write_sparse(tmp_path / "d.raw", 4 << 20, [(0, os.urandom(3 << 20))])
    other = write_sparse(tmp_path / "o.raw", 1 << 20, [(0, os.urandom(1 << 20))])
    cli("image", "import", "base", str(src))
    cli("image", "import", "other", str(other))
    token = cli.json("machine", "add", "m1", "--image", "base")["token"]
    admin = cli("admin", "token").out.strip()
    server.start()
    with httpx.Client(base_url=f"{server.http_url}/api/v1") as http:
        mine = Manifest.from_bytes(
            http.get(
                "/images/base/versions/1/manifest", headers={"Authorization": f"Bearer {token}"}
            ).content
        )
        theirs = Manifest.from_bytes(
            http.get(
                "/images/other/versions/1/manifest", headers={"Authorization": f"Bearer {admin}"}
            ).content
        )
        ids = [mine.id_at(i) for i in range(12)]
        auth = {"Authorization": f"Bearer {token}"}
        answer = http.post("/chunks/batch", json={"ids": [c.hex() for c in ids]}, headers=auth)
        assert answer.status_code == 200
        got = records(answer.content)
        assert [cid for cid, _ in got] == ids  # all of them, in the order asked
        for cid, envelope in got:
            codec.decode(envelope, expected=cid)
        # one chunk it may not read refuses the batch; an unknown id is told apart only
        # after that check, and a malformed body is a 422
        foreign = [ids[0].hex(), theirs.id_at(0).hex()]
        assert http.post("/chunks/batch", json={"ids": foreign}, headers=auth).status_code == 403
        unknown = {"ids": ["ab" * 32]}
        assert http.post("/chunks/batch", json=unknown, headers=auth).status_code == 403
        admin_auth = {"Authorization": f"Bearer {admin}"}
        assert http.post("/chunks/batch", json=unknown, headers=admin_auth).status_code == 404
        assert http.post("/chunks/batch", json={"ids": []}, headers=admin_auth).status_code == 422
        assert http.post("/chunks/batch", json={"ids": ["x"]}).status_code == 401
