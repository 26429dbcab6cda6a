"""model kinds, owners and an active version per tenant; token counts on results; admin keys

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 10:40:00
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
        "active_versions",
        sa.Column("scope", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["version"], ["model_versions.version"]),
        sa.PrimaryKeyConstraint("scope"),
    )
    # The one version marked active so far becomes the operator's default for every tenant.
    op.execute(
        "INSERT INTO active_versions (scope, version, updated_at) "
        "SELECT '*', version, created_at FROM model_versions WHERE active = true"
    )
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), server_default="sim_exp", nullable=False))
        batch_op.add_column(sa.Column("name", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("owner", sa.String(length=128), nullable=True))
        batch_op.create_index("ix_model_versions_owner", ["owner"], unique=False)
        batch_op.drop_index("ix_model_versions_active")
        batch_op.drop_column("active")
    # Fine-tuned versions so far were trained on one tenant's feedback: they belong to that tenant.
    op.execute(
        "UPDATE model_versions SET owner = (SELECT tenant FROM training_runs WHERE training_runs.id = "
        "model_versions.run_id) WHERE run_id IS NOT NULL"
    )
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("n_tokens", sa.Integer(), nullable=True))
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("admin", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("admin")
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("n_tokens")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("active", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.create_index("ix_model_versions_active", ["active"], unique=False)
        batch_op.drop_index("ix_model_versions_owner")
        batch_op.drop_column("owner")
        batch_op.drop_column("name")
        batch_op.drop_column("kind")
    op.execute(
        "UPDATE model_versions SET active = true "
        "WHERE version = (SELECT version FROM active_versions WHERE scope = '*')"
    )
    op.drop_table("active_versions")
