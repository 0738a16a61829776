"""audit subtree hashes in post-order, leaves not stored (legacy migration 9, commit c04bea2)

A node (level ≥ 1, idx) moves to key 2·f − popcount(f) + 2^(level+1) − 2 with f = idx << level;
leaf hashes (level 0) are dropped: each is its entry's hash. The source is either keyed
level << 56 | idx (commit 3ebedb6 and later) or, for audit logs created at b36eb06, by
(level, idx) columns; migration 9 itself could only read the former.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from clipstore.store.migrations._shape import has_column, has_table

revision = "0009"
down_revision = "0008"


def _sqlite_popcount(dbapi_conn: Any) -> None:
    dbapi_conn.create_function("popcount", 1, lambda n: int(n).bit_count(), deterministic=True)


def upgrade() -> None:
    dialect = op.get_context().dialect.name
    if dialect == "postgresql":
        popcount = "bit_count(CAST(idx AS bit(64)))"
    else:
        _sqlite_popcount(op.get_bind().connection.driver_connection)
        popcount = "popcount(idx)"
    if has_column("audit_nodes", "level", offline=True):
        source = "SELECT CAST(level AS INTEGER) AS lvl, idx, hash FROM audit_nodes WHERE level > 0"
    else:
        source = ("SELECT CAST(node_key >> 56 AS INTEGER) AS lvl, node_key & 72057594037927935 AS idx, hash "
                  "FROM audit_nodes "
                  "WHERE node_key > 72057594037927935")  # 2**56 - 1: level 0 (the leaves) is dropped
    op.create_table(
        "audit_nodes_0009",
        sa.Column("node_key", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
    )
    op.execute("INSERT INTO audit_nodes_0009 (node_key, hash) "  # noqa: S608
               f"SELECT 2 * (idx << lvl) - {popcount} + (CAST(2 AS BIGINT) << lvl) - 2, hash FROM ({source}) AS n")
    op.drop_table("audit_nodes")
    op.rename_table("audit_nodes_0009", "audit_nodes")
    if has_table("audit_nodes_m9", offline=False):  # migration 9 failed on a b36eb06 tree; SQLite kept this
        op.drop_table("audit_nodes_m9")
    if dialect == "postgresql":  # the primary key keeps the staging table's name otherwise
        op.execute("ALTER TABLE audit_nodes RENAME CONSTRAINT audit_nodes_0009_pkey TO audit_nodes_pkey")
