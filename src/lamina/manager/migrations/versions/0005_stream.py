"""boot profiles for streaming

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "boot_profiles",
        sa.Column("manifest_id", sa.String(64), primary_key=True),
        sa.Column("chunks", sa.LargeBinary, nullable=False),
        sa.Column("boots", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("boot_profiles")
