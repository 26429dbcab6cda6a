"""ensembles: each result's member scores beside their weighted sum, and which versions an ensemble names

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07 03:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("components", sa.JSON(), nullable=True))
    op.create_table(
        "ensemble_members",
        sa.Column("ensemble", sa.String(length=64), nullable=False),
        sa.Column("member", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["ensemble"], ["model_versions.version"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["member"], ["model_versions.version"]),
        sa.PrimaryKeyConstraint("ensemble", "member"),
    )
    op.create_index("ix_ensemble_members_member", "ensemble_members", ["member"])


def downgrade() -> None:
    op.drop_index("ix_ensemble_members_member", table_name="ensemble_members")
    op.drop_table("ensemble_members")
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("components")
