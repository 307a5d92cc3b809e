"""lamina mount|umount|attach|detach: compose layers on a root with overlayfs."""

from __future__ import annotations

import typer


def register(root: typer.Typer) -> None:
    """Add the top-level verbs of this module to the root command."""
