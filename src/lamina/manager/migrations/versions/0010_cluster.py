"""cluster: block servers with heartbeats, the machine's assigned server, store leases and
condemned packs

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "block_servers",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column("nbd_address", sa.String(300), nullable=False),
        sa.Column("heartbeat_seconds", sa.Float, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
    )
    # A plain column (no constraint): SQLite cannot add a foreign key to a table in place,
    # and a server's row outlives its machines' assignments anyway.
    op.add_column("machines", sa.Column("server_id", sa.Integer, nullable=True))
    op.create_index("ix_machines_server_id", "machines", ["server_id"])
    op.create_table(
        "store_leases",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "condemned_packs",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("condemned_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("condemned_packs")
    op.drop_table("store_leases")
    op.drop_index("ix_machines_server_id", "machines")
    with op.batch_alter_table("machines") as batch:
        batch.drop_column("server_id")
    op.drop_table("block_servers")
