"""indexes for the review workflow's per-call lookups

Completing an assignment deleted its queue entry by assignment_id, counting and voiding an
assignment's grants searched grants by assignment_id, and handing out the next assignment
sorted the whole queue by enqueued_at: each a full scan, growing with the queue and the
grants table, inside the writer's transaction.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

from alembic import op

revision = "0014"
down_revision = "0013"

INDEXES = (
    ("ix_review_queue_assignment_id", "review_queue", ["assignment_id"]),
    ("ix_review_queue_enqueued_at", "review_queue", ["enqueued_at"]),
    ("ix_grants_assignment_id", "grants", ["assignment_id"]),
)


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)
