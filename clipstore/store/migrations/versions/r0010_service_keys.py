"""service_keys (commit ccae1d0 changed migration 2 in place)

Databases whose audit log was created before ccae1d0 have `audit_signing_key`
instead; its seed is re-wrapped into this table by a data step that needs the
KMS (clipstore.store.legacy), and revision 0013 drops the old table.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from clipstore.store.migrations._shape import has_table

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    if has_table("service_keys", offline=False):
        return
    op.create_table(
        "service_keys",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("wrapped", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
