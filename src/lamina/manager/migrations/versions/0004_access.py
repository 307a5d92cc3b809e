"""users, groups, memberships, entitlements, writable layers, sessions, changes

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _when() -> sa.Column[object]:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    # Agents authenticate with every request: their token's hash must be an index lookup.
    op.create_index("ix_machines_token_hash", "machines", ["token_hash"])
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        _when(),
    )
    op.create_table(
        "groups",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        _when(),
    )
    op.create_table(
        "memberships",
        sa.Column(
            "user_id",
            sa.Integer,
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "group_id",
            sa.Integer,
            sa.ForeignKey("groups.id", ondelete="CASCADE"),
            primary_key=True,
        ),
    )
    op.create_index("ix_memberships_group_id", "memberships", ["group_id"])
    op.create_table(
        "entitlements",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "layer_id", sa.Integer, sa.ForeignKey("layers.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("version", sa.Integer, nullable=True),
        sa.Column(
            "user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True
        ),
        sa.Column(
            "group_id", sa.Integer, sa.ForeignKey("groups.id", ondelete="CASCADE"), nullable=True
        ),
        sa.Column(
            "machine_id",
            sa.Integer,
            sa.ForeignKey("machines.id", ondelete="CASCADE"),
            nullable=True,
        ),
        sa.Column("target", sa.String(40), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        _when(),
        sa.UniqueConstraint("layer_id", "target"),
        sa.CheckConstraint(
            "(CASE WHEN user_id IS NULL THEN 0 ELSE 1 END"
            " + CASE WHEN group_id IS NULL THEN 0 ELSE 1 END"
            " + CASE WHEN machine_id IS NULL THEN 0 ELSE 1 END) = 1",
            name="ck_entitlements_one_target",
        ),
    )
    for column in ("layer_id", "user_id", "group_id", "machine_id"):
        op.create_index(f"ix_entitlements_{column}", "entitlements", [column])
    op.create_table(
        "writable_layers",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "user_id",
            sa.Integer,
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            nullable=False,
            unique=True,
        ),
        sa.Column(
            "layer_id",
            sa.Integer,
            sa.ForeignKey("layers.id", ondelete="CASCADE"),
            nullable=False,
            unique=True,
        ),
        sa.Column("policy", sa.String(20), nullable=False),
        _when(),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "machine_id",
            sa.Integer,
            sa.ForeignKey("machines.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "writable_id",
            sa.Integer,
            sa.ForeignKey("writable_layers.id", ondelete="CASCADE"),
            nullable=True,
            unique=True,
        ),
        sa.Column("base_version", sa.Integer, nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("user_id", "machine_id"),
    )
    op.create_index("ix_sessions_machine_id", "sessions", ["machine_id"])
    op.create_table(
        "changes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("machine_id", sa.Integer, nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    for table in (
        "changes",
        "sessions",
        "writable_layers",
        "entitlements",
        "memberships",
        "groups",
        "users",
    ):
        op.drop_table(table)
    op.drop_index("ix_machines_token_hash", "machines")
