"""self-enrolment: enrolment codes; reviewers without a TOTP secret until they redeem one
(legacy migration 8, commit 1e0a265)

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    with op.batch_alter_table("reviewers") as batch:  # SQLite rebuilds the table to drop NOT NULL
        batch.alter_column("wrapped_totp_secret", existing_type=sa.LargeBinary, nullable=True)
    op.create_table(
        "enrolment_codes",
        sa.Column("code_hash", sa.LargeBinary(32), primary_key=True),
        sa.Column("principal_id", sa.String(40), nullable=False),
        sa.Column("purpose", sa.String(20), nullable=False),
        sa.Column("created_by", sa.String(40), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("redeemed_at", sa.Float, nullable=True),
    )
    op.create_index("ix_enrolment_codes_principal_id", "enrolment_codes", ["principal_id"])
