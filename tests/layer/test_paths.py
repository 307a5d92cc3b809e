"""Archive member names and link targets that must never enter a tree."""

from __future__ import annotations

import pytest

from lamina.errors import UnsafeArchive
from lamina.layer import paths


@pytest.mark.parametrize(
    ("name", "path"),
    [("./a/b", "a/b"), ("a//b/./c/", "a/b/c"), ("./", ""), (".", ""), ("a/.wh.b", "a/.wh.b")],
)
def test_normalize(name: str, path: str) -> None:
    assert paths.normalize(name) == path


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "../x", "a/../../x", "a/..", "a\0b", "x" * 256, "a/" * 2100]
)
def test_hostile_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafeArchive):
        paths.normalize(name)


@pytest.mark.parametrize(
    ("path", "target"),
    [("a/l", "../b"), ("l", "b/c"), ("a/b/l", "../../c"), ("l", "/etc/localtime"), ("l", "./x")],
)
def test_symlinks_inside_the_layer_are_fine(path: str, target: str) -> None:
    paths.check_symlink(path, target)


@pytest.mark.parametrize(
    ("path", "target"), [("l", "../etc"), ("a/l", "../../x"), ("a/l", "b/../../../x"), ("l", "")]
)
def test_symlinks_that_escape_are_refused(path: str, target: str) -> None:
    with pytest.raises(UnsafeArchive):
        paths.check_symlink(path, target)


def test_hardlinks_must_stay_in_the_archive() -> None:
    assert paths.check_hardlink("b", "./a/x") == "a/x"
    for target in ("/etc/shadow", "../x", "a/../../x", "."):
        with pytest.raises(UnsafeArchive):
            paths.check_hardlink("b", target)
