"""Removed roots: the manifests of removed image and layer versions, which gc may collect

Revision ID: 0008
Revises: 0007
Create Date: 2027-01-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "removed_roots",
        sa.Column("manifest_id", sa.String(64), primary_key=True),
        sa.Column("ref", sa.String(220), nullable=False),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("removed_roots")
