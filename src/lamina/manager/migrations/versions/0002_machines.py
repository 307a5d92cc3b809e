"""machines

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "machines",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column(
            "image_version_id", sa.Integer, sa.ForeignKey("image_versions.id"), nullable=False
        ),
        sa.Column("mode", sa.String(20), nullable=False),
        sa.Column("hostname", sa.String(63), nullable=False),
        sa.Column("domain", sa.String(253), nullable=True),
        sa.Column("machine_id", sa.String(32), nullable=False),
        sa.Column("mac", sa.String(17), nullable=False),
        sa.Column("ssh_host_keys", sa.Text, nullable=False),
        sa.Column("network", sa.Text, nullable=True),
        sa.Column("extra_config", sa.Text, nullable=True),
        sa.Column("identity_rev", sa.Integer, nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_boot_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_machines_image_version_id", "machines", ["image_version_id"])


def downgrade() -> None:
    op.drop_table("machines")
