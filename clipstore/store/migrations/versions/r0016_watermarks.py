"""watermarks: the forensic watermark id of each watermarked fetch, and the fetch it names

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"


def upgrade() -> None:
    op.create_table(
        "watermarks",
        sa.Column("watermark_id", sa.String(16), primary_key=True),
        sa.Column("grant_id", sa.String(40), nullable=False, unique=True),
        sa.Column("reviewer_id", sa.String(40), nullable=False),
        sa.Column("clip_id", sa.String(64), nullable=False),
        sa.Column("review_clip_id", sa.String(40), nullable=False),
        sa.Column("fetched_at", sa.Float, nullable=False),
    )
