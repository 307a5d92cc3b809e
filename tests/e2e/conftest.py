"""End-to-end runs with real Debian machines under qemu (``make e2e``; marked ``e2e``, left
out of ``make test``).

The image is built with ``lamina image build`` into the test cache
(``$LAMINA_TEST_CACHE``, default ``/var/tmp/lamina-test-cache``): the first run pays for
the bootstrap (a few minutes), later runs with the same lamina code import the cached disk,
and a change of lamina's code rebuilds only the kit and the disk (about a minute).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cli
from tests.demo.conftest import cache_root
from tests.trees import needs_root

pytestmark = [pytest.mark.e2e, needs_root]


def image_cache() -> Path:
    return cache_root() / "images"


@pytest.fixture(scope="module")
def e2e_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("e2e") / "home"
    home.mkdir()
    return home


@pytest.fixture(scope="module")
def e2e_cli(e2e_home: Path) -> Cli:
    return Cli(e2e_home)


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lamina-e2e", "-f", str(key)],
        check=True,
    )
    return key


@pytest.fixture(scope="module")
def debian_image(e2e_cli: Cli) -> Iterator[dict[str, object]]:
    """``lamina image build debian12``: the image and its root as a layer."""
    built = e2e_cli(
        "image", "build", "debian12", "--cache", str(image_cache()), "--json", timeout=2400
    ).json()
    yield built
