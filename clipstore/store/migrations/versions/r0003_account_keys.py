"""account keys (legacy migration 3, commit 6792521)

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "account_keys",
        sa.Column("account_ref", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("wrapped_kek", sa.LargeBinary, nullable=False),
        sa.Column("retired", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "account_key_tombstones",
        sa.Column("account_ref", sa.String(64), primary_key=True),
        sa.Column("destroyed_at", sa.Float, nullable=False),
    )
