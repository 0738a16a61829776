"""accounts and clips (legacy migration 4, commit ccae1d0)

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("account_ref", sa.String(64), primary_key=True),
        sa.Column("lookup_hmac", sa.LargeBinary(32), nullable=False, unique=True),
        sa.Column("allow_review", sa.Boolean, nullable=False),
        sa.Column("retention_days", sa.Integer, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "clips",
        sa.Column("clip_id", sa.String(64), primary_key=True),
        sa.Column("account_ref", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("sealed_bytes", sa.BigInteger, nullable=False),
        sa.Column("content_type", sa.String(64), nullable=False),
        sa.Column("locale", sa.String(35), nullable=False),
        sa.Column("device_type", sa.String(64), nullable=False),
        sa.Column("duration_ms", sa.Integer, nullable=False),
        sa.Column("captured_at", sa.Float, nullable=True),
        sa.Column("wake_word", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("wrapped_dek", sa.LargeBinary, nullable=False),
        sa.Column("identity_ct", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_clips_account_ref", "clips", ["account_ref"])
    op.create_index("ix_clips_expires_at", "clips", ["expires_at"])
    op.create_table(
        "ingest_idempotency",
        sa.Column("principal_id", sa.String(40), primary_key=True),
        sa.Column("key_hash", sa.LargeBinary(32), primary_key=True),
        sa.Column("clip_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
