"""version counters: NAME@N is never handed out twice

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "version_counters",
        sa.Column("kind", sa.String(10), primary_key=True),
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("last", sa.Integer, nullable=False),
    )
    op.execute(
        "INSERT INTO version_counters (kind, name, last) "
        "SELECT 'image', images.name, max(image_versions.version) FROM images "
        "JOIN image_versions ON image_versions.image_id = images.id GROUP BY images.name"
    )
    op.execute(
        "INSERT INTO version_counters (kind, name, last) "
        "SELECT 'layer', layers.name, max(layer_versions.version) FROM layers "
        "JOIN layer_versions ON layer_versions.layer_id = layers.id GROUP BY layers.name"
    )


def downgrade() -> None:
    op.drop_table("version_counters")
