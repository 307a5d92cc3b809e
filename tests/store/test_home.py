"""A home knows it is a home: a folder that is not one, a lost database, another home's or
an empty one are refused in one line and left as they were; `store gc` removes only what
the database vouches for; `store reindex` rebuilds what the packs can tell."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import Cli, write_sparse

MiB = 1 << 20


def packs(home: Path) -> set[Path]:
    return set((home / "store" / "packs").glob("*/*.pack"))


def disk(tmp_path: Path, name: str) -> Path:
    return write_sparse(tmp_path / f"{name}.raw", 4 * MiB, [(0, os.urandom(3 * MiB))])


def refused(result: object, *words: str) -> str:
    code, err = getattr(result, "code"), getattr(result, "err")  # noqa: B009
    assert code == 14, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    return str(lines[0])


def test_a_folder_that_is_not_a_home_is_refused_and_left_alone(cli: Cli, tmp_path: Path) -> None:
    typo = tmp_path / "hoem"
    line = refused(cli("image", "list", "--home", str(typo), check=False), str(typo), "init")
    assert "not a lamina home" in line
    assert not typo.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(cli("machine", "list", "--home", str(empty), check=False), str(empty))
    refused(cli("store", "gc", "--home", str(empty), check=False), str(empty))
    assert not list(empty.iterdir())


def test_init_makes_a_home_once(tmp_path: Path) -> None:
    new = Cli(tmp_path / "new")
    first = new.json("init")
    assert first["created"] and first["home"] == str(new.home) and len(first["id"]) == 32
    again = new.json("init")
    assert not again["created"] and again["id"] == first["id"]
    assert new.json("image", "list") == []
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    refused(Cli(busy)("init", check=False), "not empty")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


def test_a_lost_database_is_refused_and_the_store_kept(cli: Cli, tmp_path: Path) -> None:
    src = disk(tmp_path, "golden")
    cli("image", "import", "golden", str(src))
    before = packs(cli.home)
    for f in cli.home.glob("lamina.db*"):
        f.unlink()
    for command in (("image", "list"), ("store", "du"), ("store", "gc")):
        refused(cli(*command, check=False), "database", "restore", "reindex")
    assert not (cli.home / "lamina.db").exists()  # nothing made a new, empty one
    assert packs(cli.home) == before

    rebuilt = cli.json("store", "reindex")
    (ref,) = rebuilt["recovered"]
    assert ref.startswith("recovered-") and ref.endswith("@1")
    out = tmp_path / "out.raw"
    cli("image", "export", ref, str(out))
    assert out.read_bytes() == src.read_bytes()
    assert cli.json("store", "gc")["chunks_removed"] == 0
    assert cli.json("store", "verify")["ok"]


def test_another_homes_database_is_refused(cli: Cli, tmp_path: Path) -> None:
    other = Cli(tmp_path / "other")
    other("init")
    other("image", "import", "theirs", str(disk(tmp_path, "theirs")))
    for f in cli.home.glob("lamina.db*"):
        f.unlink()
    _sqlite_copy(other.home / "lamina.db", cli.home / "lamina.db")
    refused(cli("image", "list", check=False), "belongs to another home")
    refused(cli("store", "reindex", check=False), "belongs to another home")


@pytest.mark.peers
def test_an_empty_postgresql_database_is_refused(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    from tests.pg import fresh_database

    url = fresh_database(request.getfixturevalue("pg_cluster"))
    cli("image", "import", "golden", str(disk(tmp_path, "golden")))
    monkeypatch.setenv("LAMINA_DATABASE_URL", url)
    refused(cli("image", "list", check=False), "is empty", "restore", "reindex")
    refused(cli("store", "gc", check=False), "is empty")
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    assert not sqlalchemy.inspect(engine).get_table_names()  # left empty
    engine.dispose()


def test_gc_keeps_what_a_stale_database_does_not_know(cli: Cli, tmp_path: Path) -> None:
    """A database restored from before an import does not know that import's version:
    gc keeps its chunks, reindex lists it again; a version removed through the database
    is collected."""
    old, new = disk(tmp_path, "old"), disk(tmp_path, "new")
    cli("image", "import", "old", str(old))
    cli("image", "import", "gone", str(disk(tmp_path, "gone")))
    _sqlite_copy(cli.home / "lamina.db", tmp_path / "stale.db")
    cli("image", "import", "new", str(new))
    for f in cli.home.glob("lamina.db*"):
        f.unlink()
    _sqlite_copy(tmp_path / "stale.db", cli.home / "lamina.db")
    cli("image", "rm", "gone")

    planned = cli.json("store", "gc", "--dry-run")
    assert planned["dry_run"] and planned["chunks_removed"] == 13  # gone's 12 + its manifest
    assert len(planned["unknown_manifests"]) == 1 and planned["chunks_kept_unknown"] == 13
    report = cli.json("store", "gc")
    assert report["chunks_removed"] == planned["chunks_removed"]
    assert report["bytes_freed"] == planned["bytes_freed"]
    assert report["unknown_manifests"] == planned["unknown_manifests"]

    (ref,) = cli.json("store", "reindex")["recovered"]
    for name, src in ((ref, new), ("old", old)):
        out = tmp_path / "out.raw"
        cli("image", "export", name, str(out))
        assert out.read_bytes() == src.read_bytes()
    assert cli.json("store", "gc")["chunks_removed"] == 0
    assert cli.json("store", "reindex")["recovered"] == []


def test_gc_dry_run_changes_nothing(cli: Cli, tmp_path: Path) -> None:
    cli("image", "import", "a", str(disk(tmp_path, "a")))
    cli("image", "rm", "a")
    before = packs(cli.home)
    planned = cli.json("store", "gc", "--dry-run")
    assert planned["chunks_removed"] > 0 and planned["packs_removed"] == len(before)
    assert packs(cli.home) == before
    done = cli.json("store", "gc")
    assert done["chunks_removed"] == planned["chunks_removed"] and not packs(cli.home)


def _sqlite_copy(src: Path, dest: Path) -> None:
    """A consistent copy of a live SQLite database (its online backup API)."""
    with sqlite3.connect(src) as a, sqlite3.connect(dest) as b:
        a.backup(b)
    a.close()
    b.close()
    shutil.copymode(src, dest)
