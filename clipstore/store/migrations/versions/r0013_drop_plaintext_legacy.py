"""drop the legacy signing-key table and the plaintext escalation note

Runs only once the KMS-bound data steps (clipstore.store.legacy) are done:
every note sealed into note_ct, the signing seed moved to service_keys.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from clipstore.store.migrations._shape import has_column, has_table

revision = "0013"
down_revision = "0012"

UNSEALED_NOTES = "SELECT count(*) FROM escalations WHERE note_ct IS NULL"
UNMOVED_SEED = ("SELECT count(*) FROM audit_signing_key WHERE NOT EXISTS "
                "(SELECT 1 FROM service_keys WHERE name = 'audit-checkpoint-signing')")
ADVICE = "run `clipstore db upgrade` (it needs the KMS) and retry"


def _require_data_steps_done() -> None:
    if context.is_offline_mode():  # the DBA's script stops here rather than drop what is not yet sealed
        op.execute(f"DO $$ BEGIN IF ({UNSEALED_NOTES}) > 0 OR ({UNMOVED_SEED}) > 0 THEN "
                   f"RAISE EXCEPTION 'plaintext escalation notes or the legacy signing seed remain: {ADVICE}'; "
                   "END IF; END $$")
        return
    conn = op.get_bind()
    notes = conn.scalar(sa.text(UNSEALED_NOTES))
    seed = conn.scalar(sa.text(UNMOVED_SEED)) if has_table("audit_signing_key", offline=True) else 0
    if notes or seed:
        raise RuntimeError(f"{notes} plaintext escalation notes and {seed} legacy signing seeds remain: {ADVICE}")


def upgrade() -> None:
    _require_data_steps_done()
    if has_table("audit_signing_key", offline=True):
        op.drop_table("audit_signing_key")
    if has_column("escalations", "note", offline=True):
        with op.batch_alter_table("escalations") as batch:
            batch.drop_column("note")
            batch.alter_column("note_ct", existing_type=sa.LargeBinary, nullable=False)
