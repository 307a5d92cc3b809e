"""A cold first-pass read of an image in an S3 bucket: lamina vs raw ranged GETs.

A single-node Ceph cluster with a RADOS Gateway (the test suite's) is the object store; a
512 MiB image of random data is imported into it. Each round:

- the anchor, a Python program using boto3 alone, GETs the byte range of every chunk's
  envelope (the exact bytes lamina needs) with 8 threads;
- lamina: `lamina serve` starts on the home with an empty disk cache and nbdcopy reads the
  whole image through it (lamina fetches with its 8 I/O threads, checks every chunk
  against its id, decompresses, caches and serves it over NBD).

Both read the same objects from the same gateway; an untimed pass first warms the gateway
for both. Three interleaved rounds, medians.
Prints: ratio cold_read=<anchor time / lamina time> (target >= 0.8).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import LAMINA, MiB, free_port, median, need, run, scratch, wait_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test suite's cluster
from tests.ceph import CephCluster

ROUNDS = 3
SIZE = 512 * MiB

# `python -c RANGED_GETS RANGES.json` with the gateway in the environment.
RANGED_GETS = """
import json, os, sys, boto3
from concurrent.futures import ThreadPoolExecutor
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=os.environ["LAMINA_S3_ENDPOINT_URL"],
    region_name="us-east-1", config=Config(response_checksum_validation="when_required",
    s3={"addressing_style": "path"}, max_pool_connections=16))
ranges = json.load(open(sys.argv[1]))
def get(r):
    key, start, size = r
    body = s3.get_object(Bucket="bench", Key=key, Range=f"bytes={start}-{start + size - 1}")
    assert len(body["Body"].read()) == size
import time
started = time.perf_counter()
with ThreadPoolExecutor(8) as pool:
    list(pool.map(get, ranges))
print(time.perf_counter() - started)
"""


def envelope_ranges(home: Path, env: dict[str, str], out: Path) -> int:
    """Write [key, offset, size] of every chunk in the home's index; returns how many."""
    script = (
        "import json, sys; from lamina.home import Home; h = Home(); "
        "print(json.dumps([[l.pack, l.offset, l.size] for _, l in h.store.index.all_chunks()]))"
    )
    ranges = json.loads(run(sys.executable, "-c", script, env={**env, "LAMINA_HOME": str(home)}))
    prefix = env["LAMINA_STORE_URL"].removeprefix("s3://bench").strip("/")
    out.write_text(json.dumps([[f"{prefix}/{k}", o, n] for k, o, n in ranges]))
    return len(ranges)


def lamina_pass(home: Path, env: dict[str, str]) -> float:
    """Seconds for nbdcopy to read the image through a fresh `lamina serve`."""
    shutil.rmtree(home / "store" / "cache", ignore_errors=True)
    port = free_port()
    proc = subprocess.Popen(
        [LAMINA, "serve", "--no-http", "--nbd", f"127.0.0.1:{port}"],
        env={**os.environ, **env, "LAMINA_HOME": str(home)},
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc)
        started = time.perf_counter()
        run("nbdcopy", f"nbd://127.0.0.1:{port}/random", "null:")
        return time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    need("radosgw", "ceph-osd", "ceph-mon", "nbdcopy")
    work = scratch("s3-read")
    image = work / "random.raw"
    with open(image, "wb") as f:
        for _ in range(SIZE // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
    cluster = CephCluster(work / "ceph").start()
    try:
        cluster.create_bucket("bench")
        env = cluster.env("bench", "lamina")
        home = work / "home"
        run(LAMINA, "init", env={**env, "LAMINA_HOME": str(home)})
        run(LAMINA, "image", "import", "random", str(image), env={**env, "LAMINA_HOME": str(home)})
        ranges = work / "ranges.json"
        chunks = envelope_ranges(home, env, ranges)

        def anchor() -> float:
            """The GETs alone, timed inside the program (as lamina's side is: nbdcopy
            against a server already started)."""
            return float(run(sys.executable, "-c", RANGED_GETS, str(ranges), env=env))

        anchor()  # warm the gateway for both sides
        times: dict[str, list[float]] = {"lamina": [], "ranged_gets": []}
        for _ in range(ROUNDS):
            times["lamina"].append(lamina_pass(home, env))
            times["ranged_gets"].append(anchor())
        t = {k: median(v) for k, v in times.items()}
        print(f"{chunks} chunks, {SIZE // MiB} MiB")
        for tool, values in times.items():
            runs = " ".join(f"{x:.2f}" for x in values)
            rate = SIZE / MiB / t[tool]
            print(f"{tool:12s} median {t[tool]:.2f} s = {rate:.0f} MiB/s (runs {runs})")
        print(f"ratio cold_read={t['ranged_gets'] / t['lamina']:.2f}")
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
