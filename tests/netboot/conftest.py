"""The demo image (built once and cached, as for the demo's own tests)."""

from __future__ import annotations

from tests.demo.conftest import demo

__all__ = ["demo"]
