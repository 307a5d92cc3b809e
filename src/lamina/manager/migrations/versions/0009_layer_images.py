"""Layer versions' EROFS images (built once, stored chunked) and read-ahead profiles

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("layer_versions", sa.Column("image_manifest_id", sa.String(64), nullable=True))
    op.add_column("layer_versions", sa.Column("image_profile", sa.LargeBinary, nullable=True))
    op.add_column(
        "layer_versions",
        sa.Column("image_profile_runs", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    for column in ("image_profile_runs", "image_profile", "image_manifest_id"):
        op.drop_column("layer_versions", column)
