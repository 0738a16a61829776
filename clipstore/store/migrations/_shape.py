"""What a revision may ask about the database it runs on.

Legacy databases (before Alembic) can hold a newer shape than their migration
number says, because old commits edited migrations in place; the repair
revisions ask before they convert. Offline SQL has no database to ask, so the
caller states what a database at the previous revision has.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op


def has_table(table: str, *, offline: bool) -> bool:
    if context.is_offline_mode():
        return offline
    return sa.inspect(op.get_bind()).has_table(table)


def has_column(table: str, column: str, *, offline: bool) -> bool:
    if context.is_offline_mode():
        return offline
    return column in {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}
