"""Import of a 1 GiB mixed disk image: lamina vs borg (fixed 4 MiB chunks) vs casync.

The image: 256 MiB random, 256 MiB zeros, a 128 MiB repeat of the first random part,
128 MiB more random, 256 MiB zeros; written densely (zeros are real bytes, not holes), so
every tool reads the whole GiB. Unique data: 384 MiB.

Each tool starts from an initialized empty repository (`borg init`, a lamina home whose
database exists) and runs three times, interleaved; the median time is reported.
Prints: ratio time borg/lamina=… casync/lamina=… stored/unique lamina=… borg=… casync=…
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from common import LAMINA, MiB, du, median, need, run, scratch, timed

ROUNDS = 3


def build_image(path: Path) -> None:
    first = os.urandom(256 * MiB)
    with open(path, "wb") as f:
        f.write(first)
        f.write(bytes(256 * MiB))
        f.write(first[: 128 * MiB])
        f.write(os.urandom(128 * MiB))
        f.write(bytes(256 * MiB))


def main() -> None:
    need("borg", "casync")
    work = scratch("import")
    image = work / "mixed.raw"
    build_image(image)
    unique = 384 * MiB
    home, repo, castore = work / "home", work / "borg", work / "casync"
    env = {"LAMINA_HOME": str(home), "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}

    def fresh_lamina() -> None:
        shutil.rmtree(home, ignore_errors=True)
        run(LAMINA, "init", env=env)  # the home: its identity, its migrated database

    def fresh_borg() -> None:
        shutil.rmtree(repo, ignore_errors=True)
        run("borg", "init", "-e", "none", str(repo), env=env)

    def fresh_casync() -> None:
        shutil.rmtree(castore, ignore_errors=True)
        (work / "image.caibx").unlink(missing_ok=True)

    times: dict[str, list[float]] = {"lamina": [], "borg": [], "casync": []}
    with open(image, "rb") as f:  # page cache warm for everyone
        while f.read(64 * MiB):
            pass
    for _ in range(ROUNDS):
        times["lamina"].append(
            timed(
                fresh_lamina, lambda: run(LAMINA, "image", "import", "mixed", str(image), env=env)
            )
        )
        times["borg"].append(
            timed(
                fresh_borg,
                lambda: run(
                    "borg",
                    "create",
                    "--chunker-params",
                    "fixed,4194304",
                    f"{repo}::a",
                    str(image),
                    env=env,
                ),
            )
        )
        times["casync"].append(
            timed(
                fresh_casync,
                lambda: run(
                    "casync", "make", f"--store={castore}", str(work / "image.caibx"), str(image)
                ),
            )
        )
    t = {k: median(v) for k, v in times.items()}
    stored = {
        "lamina": du(home / "store" / "packs"),
        "borg": du(repo / "data"),
        "casync": du(castore),
    }
    for tool, values in times.items():
        runs = " ".join(f"{x:.2f}" for x in values)
        print(
            f"{tool:7s} median {t[tool]:.2f} s (runs {runs}), stored {stored[tool] / MiB:.1f} MiB"
        )
    print(
        f"ratio time borg/lamina={t['borg'] / t['lamina']:.2f} casync/lamina={t['casync'] / t['lamina']:.2f} "
        f"stored/unique lamina={stored['lamina'] / unique:.3f} borg={stored['borg'] / unique:.3f} "
        f"casync={stored['casync'] / unique:.3f}"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
