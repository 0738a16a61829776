"""PostgreSQL constraint names that legacy migrations 6, 8 and 9 left from their staging tables

They rebuilt principals, reviewers and audit_nodes as <table>_m<N> and renamed them;
PostgreSQL kept the staging names on the constraints, which later DDL must be able to name.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0012"
down_revision = "0011"

RENAMES = {
    "principals": {"principals_m6_pkey": "principals_pkey", "principals_m6_spiffe_id_key": "principals_spiffe_id_key"},
    "reviewers": {"reviewers_m8_pkey": "reviewers_pkey"},
    "audit_nodes": {"audit_nodes_m9_pkey": "audit_nodes_pkey"},
}


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql" or context.is_offline_mode():
        return  # SQLite's constraints are unnamed; offline SQL starts from revisions that named them right
    for table, renames in RENAMES.items():
        names = set(op.get_bind().scalars(sa.text(
            "SELECT conname FROM pg_constraint WHERE conrelid = CAST(:t AS regclass)"), {"t": table}))
        for legacy, name in renames.items():
            if legacy in names:
                op.execute(f"ALTER TABLE {table} RENAME CONSTRAINT {legacy} TO {name}")
