"""a version's name is unique per owner (shared versions are one owner), so a name can stand for the version: vLLM's
``model``, ``model_version`` and the protocol routes accept either

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06 22:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Names given before they had to be unique: every copy but the oldest gets its version id's start appended.
    conn = op.get_bind()
    rows = conn.execute(
        sa.text("SELECT version, owner, name FROM model_versions WHERE name IS NOT NULL ORDER BY created_at, version")
    ).fetchall()
    seen: set[tuple[str, str]] = set()
    for version, owner, name in rows:
        key = (owner or "*", name)
        if key in seen:
            new = f"{name[:240]}-{version[:12]}"
            conn.execute(sa.text("UPDATE model_versions SET name = :n WHERE version = :v"), {"n": new, "v": version})
            key = (owner or "*", new)
        seen.add(key)
    op.create_index(
        "ux_model_versions_owner_name",
        "model_versions",
        [sa.text("coalesce(owner, '*')"), "name"],
        unique=True,
        sqlite_where=sa.text("name IS NOT NULL"),
        postgresql_where=sa.text("name IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ux_model_versions_owner_name", table_name="model_versions")
