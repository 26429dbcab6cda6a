"""one queued or running training run per tenant (a partial unique index), and older extra open runs failed

Run it with the workers stopped, as every upgrade: a second run still training when it is marked failed here would
go on under its worker, and could still register and promote its version.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29 20:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

OPEN = "status IN ('queued', 'running')"


def upgrade() -> None:
    conn = op.get_bind()
    # Before the index can exist, a tenant keeps one open run: its running one, else its oldest queued one.
    rows = conn.execute(
        sa.text(f"SELECT id, tenant FROM training_runs WHERE {OPEN} ORDER BY tenant, status DESC, created_at, id")
    ).all()
    kept: set[str] = set()
    extra = []
    for run_id, tenant in rows:
        if tenant in kept:
            extra.append(run_id)
        kept.add(tenant)
    for run_id in extra:
        conn.execute(
            sa.text(
                "UPDATE training_runs SET status = 'failed', finished_at = CURRENT_TIMESTAMP, "
                "error = 'a tenant has one queued or running run at a time (upgrade to 0011): start it again' "
                "WHERE id = :id"
            ),
            {"id": run_id},
        )
    op.create_index(
        "ux_runs_one_open_per_tenant",
        "training_runs",
        ["tenant"],
        unique=True,
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    )


def downgrade() -> None:
    op.drop_index("ux_runs_one_open_per_tenant", table_name="training_runs")
