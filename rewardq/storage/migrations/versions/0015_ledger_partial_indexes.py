"""partial indexes on the batch ledger: unqueued and in-flight batches (the feeder's and sweeper's queries cost the
same whatever the job's size)

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 07:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

# As in rewardq.storage.models (UNQUEUED_BATCH, IN_FLIGHT_BATCH): a migration keeps its own copy.
UNQUEUED = {"sqlite": "enqueued_at IS NULL AND done IS 0", "postgresql": "enqueued_at IS NULL AND done IS false"}
IN_FLIGHT = {
    "sqlite": "enqueued_at IS NOT NULL AND done IS 0",
    "postgresql": "enqueued_at IS NOT NULL AND done IS false",
}


def upgrade() -> None:
    for name, where in (("ix_batches_unqueued", UNQUEUED), ("ix_batches_in_flight", IN_FLIGHT)):
        op.create_index(
            name,
            "batches",
            ["job_id", "batch_no"],
            sqlite_where=sa.text(where["sqlite"]),
            postgresql_where=sa.text(where["postgresql"]),
        )


def downgrade() -> None:
    op.drop_index("ix_batches_in_flight", table_name="batches")
    op.drop_index("ix_batches_unqueued", table_name="batches")
