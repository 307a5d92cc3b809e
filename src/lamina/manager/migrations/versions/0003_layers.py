"""layers, layer versions and their bases, layer mounts

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "layers",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "layer_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "layer_id", sa.Integer, sa.ForeignKey("layers.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("manifest_id", sa.String(64), nullable=False),
        sa.Column("files", sa.Integer, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("stored_bytes", sa.BigInteger, nullable=False),
        sa.Column("source", sa.String(1000), nullable=False),
        sa.Column("policy", sa.String(20), nullable=True),
        sa.Column(
            "parent_id",
            sa.Integer,
            sa.ForeignKey("layer_versions.id", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("layer_id", "version"),
    )
    op.create_index("ix_layer_versions_layer_id", "layer_versions", ["layer_id"])
    op.create_index("ix_layer_versions_manifest_id", "layer_versions", ["manifest_id"])
    op.create_table(
        "layer_version_bases",
        sa.Column(
            "version_id",
            sa.Integer,
            sa.ForeignKey("layer_versions.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column(
            "base_id",
            sa.Integer,
            sa.ForeignKey("layer_versions.id", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.Column("base_ref", sa.String(220), nullable=False),
    )
    op.create_index("ix_layer_version_bases_base_id", "layer_version_bases", ["base_id"])
    op.create_table(
        "layer_mounts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("host", sa.String(253), nullable=False),
        sa.Column("root", sa.String(4096), nullable=False),
        sa.Column(
            "writable_layer_id",
            sa.Integer,
            sa.ForeignKey("layers.id"),
            nullable=True,
            unique=True,
        ),
        sa.Column(
            "writable_version_id", sa.Integer, sa.ForeignKey("layer_versions.id"), nullable=True
        ),
        sa.Column("policy", sa.String(20), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("host", "root"),
    )
    op.create_table(
        "layer_mount_layers",
        sa.Column(
            "mount_id",
            sa.Integer,
            sa.ForeignKey("layer_mounts.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("version_id", sa.Integer, sa.ForeignKey("layer_versions.id"), nullable=False),
    )
    op.create_index("ix_layer_mount_layers_version_id", "layer_mount_layers", ["version_id"])


def downgrade() -> None:
    op.drop_table("layer_mount_layers")
    op.drop_table("layer_mounts")
    op.drop_table("layer_version_bases")
    op.drop_table("layer_versions")
    op.drop_table("layers")
