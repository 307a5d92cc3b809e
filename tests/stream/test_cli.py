"""`lamina stream` refuses bad names before it touches the filesystem."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Cli


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["../../escaped"], "image name"),
        (["../../escaped@1"], "image name"),
        (["img", "--machine", "../../escaped"], "machine name"),
    ],
)
def test_a_bad_name_is_refused_before_any_cache_directory_is_made(
    cli: Cli, tmp_path: Path, args: list[str], what: str
) -> None:
    # HOME is tmp_path/home: the default cache HOME/stream/../../escaped is tmp_path/escaped
    done = cli("stream", *args, "--from", "http://127.0.0.1:9", "--token", "t", check=False)
    assert done.code == 2 and f"bad {what}" in done.err
    assert not (tmp_path / "escaped").exists()
    assert not (cli.home / "stream").exists()
    # with --cache too: no directory, no lock file
    cache = tmp_path / "cache"
    done = cli("stream", *args, "--cache", str(cache), "--token", "t", check=False)
    assert done.code == 2 and not cache.exists()
