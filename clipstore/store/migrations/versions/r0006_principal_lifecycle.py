"""principal lifecycle: keys in principal_keys, expiry, SPIFFE ids (legacy migration 6, commit 488ec04)

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.create_table(
        "principal_keys",
        sa.Column("key_hash", sa.LargeBinary(32), primary_key=True),
        sa.Column("principal_id", sa.String(40), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("retires_at", sa.Float, nullable=True),
    )
    op.create_index("ix_principal_keys_principal_id", "principal_keys", ["principal_id"])
    op.execute("INSERT INTO principal_keys (key_hash, principal_id, created_at) "
               "SELECT key_hash, id, created_at FROM principals")
    if op.get_context().dialect.name == "postgresql":
        op.drop_column("principals", "key_hash")  # and its unique constraint
        op.add_column("principals", sa.Column("expires_at", sa.Float, nullable=True))
        op.add_column("principals", sa.Column("spiffe_id", sa.String(255), nullable=True, unique=True))
        return
    # SQLite cannot drop a UNIQUE column in place: copy into a fresh table.
    op.create_table(
        "principals_0006",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("spiffe_id", sa.String(255), nullable=True, unique=True),
    )
    op.execute("INSERT INTO principals_0006 (id, name, role, created_at, disabled) "
               "SELECT id, name, role, created_at, disabled FROM principals")
    op.drop_table("principals")
    op.rename_table("principals_0006", "principals")
