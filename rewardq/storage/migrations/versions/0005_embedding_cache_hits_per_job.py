"""embedding cache hits per job

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 22:13:02.767849
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cache_hits", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("cache_misses", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("cache_misses")
        batch_op.drop_column("cache_hits")
