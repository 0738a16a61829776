"""review (legacy migration 5 as first released, commit 5fa6877)

Escalation notes were plaintext here; revisions 0011 and 0013 carry them forward.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "reviewers",
        sa.Column("principal_id", sa.String(40), primary_key=True),
        sa.Column("locales", sa.String(400), nullable=False),
        sa.Column("wrapped_totp_secret", sa.LargeBinary, nullable=False),
        sa.Column("last_totp_step", sa.BigInteger, nullable=False),
        sa.Column("failed_attempts", sa.Integer, nullable=False),
        sa.Column("locked_until", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "review_sessions",
        sa.Column("session_id", sa.String(40), primary_key=True),
        sa.Column("token_hash", sa.LargeBinary(32), nullable=False, unique=True),
        sa.Column("reviewer_id", sa.String(40), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("last_seen_at", sa.Float, nullable=False),
        sa.Column("ended", sa.Boolean, nullable=False),
    )
    op.create_index("ix_review_sessions_reviewer_id", "review_sessions", ["reviewer_id"])
    op.create_table(
        "review_queue",
        sa.Column("clip_id", sa.String(64), primary_key=True),
        sa.Column("review_clip_id", sa.String(40), nullable=False, unique=True),
        sa.Column("account_ref", sa.String(64), nullable=False),
        sa.Column("locale", sa.String(35), nullable=False),
        sa.Column("enqueued_at", sa.Float, nullable=False),
        sa.Column("assignment_id", sa.String(40), nullable=True),
        sa.Column("assignment_expires_at", sa.Float, nullable=True),
    )
    op.create_index("ix_review_queue_account_ref", "review_queue", ["account_ref"])
    op.create_table(
        "assignments",
        sa.Column("assignment_id", sa.String(40), primary_key=True),
        sa.Column("clip_id", sa.String(64), nullable=False),
        sa.Column("review_clip_id", sa.String(40), nullable=False),
        sa.Column("reviewer_id", sa.String(40), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("completed_at", sa.Float, nullable=True),
        sa.Column("label", sa.String(64), nullable=True),
    )
    op.create_index("ix_assignments_reviewer_created", "assignments", ["reviewer_id", "created_at"])
    op.create_table(
        "grants",
        sa.Column("grant_id", sa.String(40), primary_key=True),
        sa.Column("reviewer_id", sa.String(40), nullable=False),
        sa.Column("session_id", sa.String(40), nullable=False),
        sa.Column("assignment_id", sa.String(40), nullable=False),
        sa.Column("clip_id", sa.String(64), nullable=False),
        sa.Column("account_ref", sa.String(64), nullable=False),
        sa.Column("issued_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("redeemed_at", sa.Float, nullable=True),
        sa.Column("voided", sa.Boolean, nullable=False),
    )
    for column in ("reviewer_id", "session_id", "clip_id", "account_ref"):
        op.create_index(f"ix_grants_{column}", "grants", [column])
    op.create_table(
        "escalations",
        sa.Column("escalation_id", sa.String(40), primary_key=True),
        sa.Column("review_clip_id", sa.String(40), nullable=False),
        sa.Column("clip_id", sa.String(64), nullable=False),
        sa.Column("category", sa.Integer, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("created_by", sa.String(40), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("resolved_at", sa.Float, nullable=True),
        sa.Column("resolution", sa.Text, nullable=True),
    )
