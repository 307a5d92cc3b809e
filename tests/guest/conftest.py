"""Guest tests: whatever a test mounted under its tmp_path goes (as in the layer tests)."""

from __future__ import annotations

from tests.layer.conftest import (
    _unmount_leftovers,  # noqa: F401 (autouse)
)
