"""lamina layer import|capture|list|log|export|diff|rm"""

from __future__ import annotations

import typer

app = typer.Typer(
    help="File-tree layers: base OS, applications, writable layers.", no_args_is_help=True
)
