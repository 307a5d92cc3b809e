"""new devices: MACs that asked for a network boot and are no machine yet

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "new_devices",
        sa.Column("mac", sa.String(17), primary_key=True),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("address", sa.String(45), nullable=True),
        sa.Column("platform", sa.String(16), nullable=True),
        sa.Column("arch", sa.String(16), nullable=True),
        sa.Column("manufacturer", sa.String(64), nullable=True),
        sa.Column("product", sa.String(64), nullable=True),
        sa.Column("serial", sa.String(64), nullable=True),
        sa.Column("uuid", sa.String(36), nullable=True),
    )
    # a machine is found by its MAC at every network boot
    op.create_index("ix_machines_mac", "machines", ["mac"])


def downgrade() -> None:
    op.drop_index("ix_machines_mac", "machines")
    op.drop_table("new_devices")
