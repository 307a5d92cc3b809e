"""images, image versions, settings

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "image_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("chunk_size", sa.Integer, nullable=False),
        sa.Column("manifest_id", sa.String(64), nullable=False),
        sa.Column("stored_bytes", sa.BigInteger, nullable=False),
        sa.Column("source", sa.String(1000), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("image_id", "version"),
    )
    op.create_index("ix_image_versions_image_id", "image_versions", ["image_id"])
    op.create_table(
        "settings",
        sa.Column("key", sa.String(100), primary_key=True),
        sa.Column("value", sa.String(4000), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("settings")
    op.drop_table("image_versions")
    op.drop_table("images")
