"""a training run's lease token (fencing: a worker that lost the run writes nothing) and its worker deaths

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("deaths", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_column("deaths")
        batch_op.drop_column("lease")
