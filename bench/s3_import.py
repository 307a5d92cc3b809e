"""Import into an S3 bucket vs uploading the same unique bytes with boto3 alone.

A single-node Ceph cluster with a RADOS Gateway (the test suite's) is the object store.
The image is 512 MiB of random data: every byte is unique and incompressible, so lamina
uploads as many bytes as the anchor does, and the question is whether chunking, hashing,
packing and indexing keep the object store the limit.

The anchor is the better of two programs that upload with boto3 alone: `upload_file` of
the image with its default transfer settings (multipart, 8 MiB parts, 10 threads), and the
image cut in 32 MiB objects (lamina's pack size) put by 3 threads. Each runs as its own
Python process, as `lamina image import` (into a fresh home and bucket prefix) does, so
every side pays for starting up and creating its client. Three interleaved rounds,
medians. Prints: ratio import=<anchor time / lamina time> (target >= 0.9).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from common import LAMINA, MiB, median, need, run, scratch, timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test suite's cluster
from tests.ceph import CephCluster

ROUNDS = 3
SIZE = 1024 * MiB
PIECE = 32 * MiB


# The anchors, run as `python -c SCRIPT IMAGE KEY` with the gateway in the environment.
_CLIENT = """
import os, sys, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=os.environ["LAMINA_S3_ENDPOINT_URL"],
    region_name="us-east-1", config=Config(request_checksum_calculation="when_required",
    s3={"addressing_style": "path"}, max_pool_connections=16))
image, key = sys.argv[1], sys.argv[2]
"""
UPLOAD_FILE = (
    _CLIENT
    + """
s3.upload_file(image, "bench", key)
"""
)
PUT_OBJECTS = (
    _CLIENT
    + f"""
from concurrent.futures import ThreadPoolExecutor
data = open(image, "rb").read()
def put(i):
    s3.put_object(Bucket="bench", Key=f"{{key}}/{{i}}", Body=data[i * {PIECE} : (i + 1) * {PIECE}])
with ThreadPoolExecutor(3) as pool:
    list(pool.map(put, range(len(data) // {PIECE})))
"""
)


def python(script: str, *args: str, env: dict[str, str]) -> None:
    run(sys.executable, "-c", script, *args, env=env)


def main() -> None:
    need("radosgw", "ceph-osd", "ceph-mon")
    work = scratch("s3-import")
    image = work / "random.raw"
    with open(image, "wb") as f:
        for _ in range(SIZE // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
    cluster = CephCluster(work / "ceph").start()
    try:
        cluster.create_bucket("bench")
        times: dict[str, list[float]] = {"lamina": [], "upload_file": [], "put_objects": []}
        for r in range(ROUNDS):
            env = {**cluster.env("bench", f"lamina{r}"), "LAMINA_HOME": str(work / f"home{r}")}

            def fresh_home(env: dict[str, str] = env) -> None:
                run(LAMINA, "init", env=env)  # the home: its identity, its migrated database

            def lamina(env: dict[str, str] = env) -> None:
                run(LAMINA, "image", "import", "random", str(image), env=env)

            def upload_file(r: int = r) -> None:
                python(UPLOAD_FILE, str(image), f"file{r}", env=cluster.env("bench"))

            def put_objects(r: int = r) -> None:
                python(PUT_OBJECTS, str(image), f"objects{r}", env=cluster.env("bench"))

            times["lamina"].append(timed(fresh_home, lamina))
            times["upload_file"].append(timed(lambda: None, upload_file))
            times["put_objects"].append(timed(lambda: None, put_objects))
        t = {k: median(v) for k, v in times.items()}
        for tool, values in times.items():
            runs = " ".join(f"{x:.2f}" for x in values)
            rate = SIZE / MiB / t[tool]
            print(f"{tool:12s} median {t[tool]:.2f} s = {rate:.0f} MiB/s (runs {runs})")
        anchor = min(t["upload_file"], t["put_objects"])
        print(f"ratio import={anchor / t['lamina']:.2f}")
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
