"""`lamina store du|verify` count and check image and layer versions alike."""

from __future__ import annotations

import os
from pathlib import Path

from lamina.home import Home
from lamina.manager.home import open_home
from lamina.manager.services.store import live_chunks
from tests.conftest import Cli, write_sparse


def test_du_and_verify_cover_layers(cli: Cli, tmp_path: Path) -> None:
    cli(
        "image",
        "import",
        "base",
        str(write_sparse(tmp_path / "d.raw", 1 << 20, [(0, os.urandom(1 << 19))])),
    )
    tree = tmp_path / "tree"
    (tree / "opt").mkdir(parents=True)
    (tree / "opt" / "tool").write_bytes(os.urandom(300_000))
    cli("layer", "import", "app", str(tree))
    du = cli.json("store", "du")
    assert du["versions"] == 2 and du["logical_bytes"] >= (1 << 20) + 300_000
    assert cli.json("store", "verify")["ok"]

    # drop every chunk only the layer needs: verify must name them
    home = open_home(cli.home)
    with home.session() as session:
        everything = live_chunks(session, store=home.store)
    layer_only = _layer_chunks(home)
    home.store.gc(lambda: everything - layer_only)
    home.close()
    result = cli("store", "verify", "--json", check=False)
    assert result.code == 7
    assert any("layer app@1" in p["reason"] for p in result.json()["corrupt"])


def _layer_chunks(home: Home) -> set[bytes]:
    from lamina.layer.importer import load_tree
    from lamina.manager.services import layers

    with home.session() as session:
        out: set[bytes] = set()
        for mid in layers.manifest_ids(session):
            out |= load_tree(home.store, bytes.fromhex(mid)).referenced()
        return out
