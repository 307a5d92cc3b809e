"""S3-compatible backend: each pack is one object, read back by ranged GETs.

The client is boto3's; its errors are mapped into lamina's tree here and nowhere else:
a missing object is FileNotFoundError (the Backend contract), every other failure a
StoreError naming the bucket and what to check.

Objects are immutable once written, which is what makes the store simple on S3: a size
seen in a listing never goes stale, a range read once reads the same forever.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

from lamina.errors import StoreError
from lamina.store.backends.base import Buffer

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

# Objects from this size go up as a multipart upload, parts of MULTIPART_PART sent in
# parallel. Packs (32 MiB) stay below it: to the RADOS Gateway of the test suite a 32 MiB
# object took 0.14 s as one PUT and 0.22 s as 4 parallel parts of 8 MiB (a median of 6).
# Several packs in flight give the parallelism instead: importing 1 GiB of random data
# took 8.5-10.3 / 7.6 / 6.9-7.5 / 6.7-6.8 s with 2 / 3 / 4 / 6 packs in flight. Each costs
# a pack in memory and its joined copy while it uploads: with the pack filling, 288 MiB.
MULTIPART_FROM: Final = 64 << 20
MULTIPART_PART: Final = 16 << 20
UPLOAD_THREADS: Final = 4
PUT_DEPTH: Final = 4
# PUT bodies from this size are copied into reused buffers: joining 1 GiB of 32 MiB packs
# into fresh bytes took 0.56-0.76 s here (page faults), copying it into a reused buffer 0.11.
REUSE_FROM: Final = 8 << 20
# Unfinished multipart uploads older than this are aborted by gc. Another block server's
# upload may be in flight at any time: a day leaves every live one alone.
UPLOAD_GRACE: Final = 24 * 3600.0
_MISSING: Final = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED: Final = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}
)

Lock = Callable[..., AbstractContextManager[None]]


def make_client(endpoint_url: str | None, pool: int = 32) -> S3Client:
    """A thread-safe boto3 client with the settings S3-compatible stores need."""
    import boto3
    from botocore.config import Config

    config = Config(
        # Checksums only where the API requires them: the default CRC trailers of recent
        # botocore are refused by gateways such as Ceph's RGW 16.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"},
        max_pool_connections=pool,
        connect_timeout=10,
        read_timeout=60,
        retries={"max_attempts": 5, "mode": "standard"},
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    session = boto3.session.Session()  # sessions are not thread-safe, clients are
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


class S3Backend:
    """Objects under ``s3://bucket/prefix/``. The store lock stays on this machine (``lock``,
    the home's file lock): one home writes to a bucket prefix at a time."""

    put_depth = PUT_DEPTH  # packs a Writer may have in flight at once

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None,
        lock: Lock,
        client: S3Client | None = None,
        upload_grace: float = UPLOAD_GRACE,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self._lock = lock
        self._client = client if client is not None else make_client(endpoint_url)
        self._sizes: dict[str, int] = {}
        self._state_lock = threading.Lock()
        self._bodies: list[bytearray] = []
        self._uploads = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="s3-part")
        self.upload_grace = upload_grace

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        return f"{where} at {self.endpoint_url}" if self.endpoint_url else where

    def _key(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise StoreError(f"bad object name {name!r}")
        return f"{self.prefix}/{name}" if self.prefix else name

    def _name(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    @contextmanager
    def _mapped(self, what: str, name: str = "") -> Iterator[None]:
        """Turn boto3's exceptions into lamina's (FileNotFoundError for a missing object)."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING and name:
                raise FileNotFoundError(name) from None
            raise StoreError(self._explain(what, name, code, exc)) from exc
        except NoCredentialsError:
            raise StoreError(
                f"{self.describe()}: no credentials (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY)"
            ) from None
        except BotoCoreError as exc:
            raise StoreError(f"{self.describe()}: {what} {name}: {exc}".replace("  ", " ")) from exc

    def _explain(self, what: str, name: str, code: str, exc: Exception) -> str:
        if code == "NoSuchBucket":
            return f"{self.describe()}: the bucket does not exist"
        if code in _DENIED:
            return f"{self.describe()}: access denied ({code}): check the credentials"
        return f"{self.describe()}: {what} {name}: {exc}".replace("  ", " ")

    # -- Backend ----------------------------------------------------------------------------

    def put(self, name: str, parts: Sequence[Buffer], *, durable: bool = True) -> None:
        """One PUT, or a multipart upload for large objects; either way the object appears
        whole or not at all. The gateway acknowledges only what it has stored, so
        ``durable`` needs nothing more."""
        total = sum(len(p) for p in parts)
        key = self._key(name)
        if total >= MULTIPART_FROM:
            self._put_multipart(name, key, b"".join(parts))
        elif total < REUSE_FROM:
            with self._mapped("put", name):
                self._client.put_object(Bucket=self.bucket, Key=key, Body=b"".join(parts))
        else:
            body = self._body(parts, total)
            try:
                with self._mapped("put", name):
                    # botocore takes a bytearray as it takes bytes; the stubs miss it
                    self._client.put_object(Bucket=self.bucket, Key=key, Body=body)  # type: ignore[arg-type]
            finally:
                with self._state_lock:
                    if len(self._bodies) < self.put_depth:
                        self._bodies.append(body)
        with self._state_lock:
            self._sizes[name] = total

    def _body(self, parts: Sequence[Buffer], total: int) -> bytearray:
        """The parts copied into a reused buffer of exactly ``total`` bytes (CPython keeps
        the allocation when a bytearray shrinks by less than half, so pack after pack
        lands in memory already mapped)."""
        with self._state_lock:
            body = self._bodies.pop() if self._bodies else bytearray()
        if len(body) > total:
            del body[total:]
        elif len(body) < total:
            body.extend(bytes(total - len(body)))
        at = 0
        for part in parts:
            body[at : at + len(part)] = part
            at += len(part)
        return body

    def _put_multipart(self, name: str, key: str, data: bytes) -> None:
        with self._mapped("put", name):
            upload = self._client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        view = memoryview(data)

        def send(number: int) -> CompletedPartTypeDef:
            start = (number - 1) * MULTIPART_PART
            body = view[start : start + MULTIPART_PART].tobytes()
            with self._mapped("put", name):
                reply = self._client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number, Body=body
                )
            return {"PartNumber": number, "ETag": reply["ETag"]}

        count = -(-len(data) // MULTIPART_PART)
        try:
            done = list(self._uploads.map(send, range(1, count + 1)))
            with self._mapped("put", name):
                self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": done}
                )
                # RGW 16 answers the completion with an empty ETag; HEAD tells what landed.
                size = self._client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        except BaseException:
            # Best effort: what is left behind is aborted by a later gc.
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            raise
        if size != len(data):
            raise StoreError(f"{self.describe()}: {name} stored as {size} of {len(data)} bytes")

    def read(self, name: str, offset: int = 0, length: int = -1) -> bytes:
        if length == 0:
            return b""
        key = self._key(name)
        with self._mapped("read", name):
            if length > 0 or offset:
                end = offset + length - 1 if length > 0 else ""
                reply = self._client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{end}"
                )
            else:
                reply = self._client.get_object(Bucket=self.bucket, Key=key)
            data = reply["Body"].read()
        if length > 0 and len(data) != length:
            raise StoreError(f"{name}: short read at {offset} ({len(data)} of {length} bytes)")
        return data

    def size(self, name: str) -> int:
        with self._state_lock:
            known = self._sizes.get(name)
        if known is not None:
            return known
        with self._mapped("size", name):
            size = int(
                self._client.head_object(Bucket=self.bucket, Key=self._key(name))["ContentLength"]
            )
        with self._state_lock:
            self._sizes[name] = size
        return size

    def delete(self, name: str) -> None:
        with self._mapped("delete", ""):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(name))
        with self._state_lock:
            self._sizes.pop(name, None)

    def list(self, prefix: str = "") -> Iterator[str]:
        yield from (name for name, _size in self.list_sizes(prefix))

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(name, size) of every object under ``prefix``, in key order, from the listing
        alone (no HEAD per object)."""
        key_prefix = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        pages = self._client.get_paginator("list_objects_v2")
        with self._mapped("list", ""):
            for page in pages.paginate(Bucket=self.bucket, Prefix=key_prefix):
                for obj in page.get("Contents", []):
                    name, size = self._name(obj["Key"]), int(obj["Size"])
                    with self._state_lock:
                        self._sizes[name] = size
                    yield name, size

    def lock(self, *, exclusive: bool, timeout: float) -> AbstractContextManager[None]:
        return self._lock(exclusive=exclusive, timeout=timeout)

    def clean_temporaries(self, older_than: float = 3600.0) -> int:
        """Abort multipart uploads left by writers killed mid-put (never one younger than
        ``upload_grace``: it may belong to another server); returns how many."""
        cutoff = datetime.now(UTC) - timedelta(seconds=max(older_than, self.upload_grace))
        key_prefix = f"{self.prefix}/packs/" if self.prefix else "packs/"
        aborted = 0
        pages = self._client.get_paginator("list_multipart_uploads")
        with self._mapped("clean", ""):
            for page in pages.paginate(Bucket=self.bucket, Prefix=key_prefix):
                for up in page.get("Uploads", []):
                    if up["Initiated"] < cutoff:
                        self._client.abort_multipart_upload(
                            Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                        )
                        aborted += 1
        return aborted

    def close(self) -> None:
        self._uploads.shutdown(wait=True)
        self._client.close()
