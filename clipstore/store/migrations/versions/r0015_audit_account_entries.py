"""audit_account_entries: each account's access chain, indexed for access reports

Entries appended before this revision carry no account chain (docs/access-report.md says how
reports treat them), so the table starts empty.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from clipstore.store.migrations._shape import has_table

revision = "0015"
down_revision = "0014"


def upgrade() -> None:
    if has_table("audit_account_entries", offline=False):
        return
    op.create_table(
        "audit_account_entries",
        sa.Column("account_ref", sa.String(40), primary_key=True),
        sa.Column("account_seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False, unique=True),
        sa.Column("time", sa.String(32), nullable=False),
        sa.Column("leaf", sa.LargeBinary(32), nullable=False),
    )
