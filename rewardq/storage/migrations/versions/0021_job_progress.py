"""a job's progress counted in a few rows per job (job_progress), not in its one row: no hot row for writers

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-08 01:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_progress",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("stripe", sa.Integer(), nullable=False),
        sa.Column("n_done", sa.Integer(), nullable=False),
        sa.Column("n_failed", sa.Integer(), nullable=False),
        sa.Column("cache_hits", sa.Integer(), nullable=False),
        sa.Column("cache_misses", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "stripe"),
    )


def downgrade() -> None:
    # What the rows counted goes back into the jobs' own rows first: nothing counted is lost.
    sums = {c: f"(SELECT coalesce(sum(p.{c}), 0) FROM job_progress p WHERE p.job_id = jobs.id)"
            for c in ("n_done", "n_failed", "cache_hits", "cache_misses")}  # fmt: skip
    assignments = ", ".join(f"{c} = {c} + {q}" for c, q in sums.items())
    op.execute(f"UPDATE jobs SET {assignments} WHERE id IN (SELECT job_id FROM job_progress)")
    # A job complete but not closed yet (its last write's closing step had not run) is closed here: the code before
    # this revision closes a job only in the write that completes it.
    op.execute(
        "UPDATE jobs SET status = CASE WHEN n_done > 0 THEN 'succeeded' ELSE 'failed' END,"
        " finished_at = CURRENT_TIMESTAMP, started_at = coalesce(started_at, CURRENT_TIMESTAMP)"
        " WHERE status IN ('queued', 'running') AND n_done + n_failed >= n_items"
    )
    op.drop_table("job_progress")
