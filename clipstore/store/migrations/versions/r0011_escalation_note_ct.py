"""escalations.note_ct, beside the plaintext note (commit d9e6d48 renamed the column without a migration)

Nullable until the data step (clipstore.store.legacy) has sealed every
plaintext note under its clip's key; revision 0013 then drops `note`.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from clipstore.store.migrations._shape import has_column

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    if has_column("escalations", "note_ct", offline=False):
        return
    op.add_column("escalations", sa.Column("note_ct", sa.LargeBinary, nullable=True))
