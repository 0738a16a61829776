"""audit_tiles: the stored tree as C2SP tlog-tiles (a row per 256 hashes), not audit_nodes (a row per node)

Tile (level, idx) holds the hashes of tree level 8 * level, nodes idx * 256 onwards: level 0 the
leaf hashes (the unfinished tile too, as far as it goes, without nodes; they were not stored
before, so they are hashed here from the entries), the levels above the nodes audit_nodes held
under their post-order keys (revision 0009), as far as the log goes. A node audit_nodes lacks is
written as 32 zero bytes, so a proof through it fails to verify rather than every hash after it
shifting. On SQLite each tile also gets the nodes
above its hashes within it (`nodes`); on PostgreSQL they stay NULL and are hashed when read.
audit_nodes is dropped.

On SQLite, audit_entries is rebuilt with an INTEGER primary key (the rowid: one b-tree, not a table
and an index) and audit_account_entries WITHOUT ROWID (its primary key's b-tree holds the rows).

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"

TILE_HASHES = 256
LEVELS = 8  # 256**8 = 2**64 entries
MISSING = bytes(32)
READ_BATCH = 65_536


def upgrade() -> None:
    op.create_table(
        "audit_tiles",
        sa.Column("level", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("hashes", sa.LargeBinary, nullable=False),
        sa.Column("nodes", sa.LargeBinary, nullable=True),
    )
    if op.get_context().dialect.name == "postgresql":
        _tiles_postgresql()
    else:
        _tiles_sqlite()
        _rebuild_sqlite()
    op.drop_table("audit_nodes")


def _node_key(level: int, idx: int) -> int:
    """Revision 0009's post-order key of the node (level, idx)."""
    first = idx << level
    return 2 * first - first.bit_count() + (2 << level) - 2


def _tiles_postgresql() -> None:
    """In SQL, so that the offline script a DBA applies does the same."""
    size = "(SELECT COALESCE(max(size), 0) FROM audit_head WHERE id = 1)"
    op.execute("INSERT INTO audit_tiles (level, idx, hashes) "  # noqa: S608
               "SELECT 0, seq / 256, string_agg(sha256(decode('00', 'hex') || entry), ''::bytea ORDER BY seq) "
               f"FROM audit_entries WHERE seq < {size} GROUP BY seq / 256")
    for tile_level in range(1, LEVELS):
        level = 8 * tile_level
        key = f"2 * (j << {level}) - bit_count(CAST((j << {level}) AS bit(64))) + (CAST(2 AS BIGINT) << {level}) - 2"
        op.execute("INSERT INTO audit_tiles (level, idx, hashes) "  # noqa: S608
                   f"SELECT {tile_level}, j / 256, string_agg(COALESCE(n.hash, decode(repeat('00', 32), 'hex')), "
                   "''::bytea ORDER BY j) "
                   f"FROM generate_series(CAST(0 AS BIGINT), ({size} >> {level}) - 1) AS j "
                   f"LEFT JOIN audit_nodes n ON n.node_key = {key} GROUP BY j / 256")


def _tiles_sqlite() -> None:
    conn = op.get_bind()
    size = int(conn.scalar(sa.text("SELECT COALESCE(max(size), 0) FROM audit_head WHERE id = 1")) or 0)
    tiles = sa.table("audit_tiles", sa.column("level", sa.Integer), sa.column("idx", sa.BigInteger),
                     sa.column("hashes", sa.LargeBinary), sa.column("nodes", sa.LargeBinary))
    full = size // TILE_HASHES * TILE_HASHES
    for start in range(0, full, READ_BATCH):
        rows = conn.execute(sa.text("SELECT entry FROM audit_entries WHERE seq >= :a AND seq < :b ORDER BY seq"),
                            {"a": start, "b": min(start + READ_BATCH, full)}).all()
        leaves = [hashlib.sha256(b"\x00" + bytes(e)).digest() for (e,) in rows]
        conn.execute(tiles.insert(), [_tile(0, (start + i) // TILE_HASHES, b"".join(leaves[i:i + TILE_HASHES]))
                                      for i in range(0, len(leaves), TILE_HASHES)])
    if full < size:  # the unfinished leaf tile: its hashes only, as the audit writer stores it
        rows = conn.execute(sa.text("SELECT entry FROM audit_entries WHERE seq >= :a AND seq < :b ORDER BY seq"),
                            {"a": full, "b": size}).all()
        hashes = b"".join(hashlib.sha256(b"\x00" + bytes(e)).digest() for (e,) in rows)
        conn.execute(tiles.insert(), [{"level": 0, "idx": full // TILE_HASHES, "hashes": hashes, "nodes": None}])
    for tile_level in range(1, LEVELS):
        level = 8 * tile_level
        count = size >> level
        for start in range(0, count, READ_BATCH):
            keys = {_node_key(level, j): j for j in range(start, min(start + READ_BATCH, count))}
            found: dict[int, bytes] = {}
            for k in range(0, len(keys), 10_000):
                chunk = list(keys)[k:k + 10_000]
                found.update((keys[key], bytes(h)) for key, h in conn.execute(
                    sa.text("SELECT node_key, hash FROM audit_nodes WHERE node_key IN :keys")
                    .bindparams(sa.bindparam("keys", expanding=True)), {"keys": chunk}))
            nodes = [found.get(j, MISSING) for j in sorted(keys.values())]
            conn.execute(tiles.insert(), [_tile(tile_level, (start + i) // TILE_HASHES,
                                                b"".join(nodes[i:i + TILE_HASHES]))
                                          for i in range(0, len(nodes), TILE_HASHES)])


def _tile(level: int, idx: int, hashes: bytes) -> dict[str, object]:
    """The row: the hashes, and the 7 levels of nodes above them within the tile (complete pairs only)."""
    levels, below = [], hashes
    for _ in range(7):
        below = b"".join([hashlib.sha256(b"\x01" + below[i:i + 64]).digest() for i in range(0, len(below) - 63, 64)])
        levels.append(below)
    return {"level": level, "idx": idx, "hashes": hashes, "nodes": b"".join(levels)}


def _rebuild_sqlite() -> None:
    op.create_table(
        "audit_entries_0017",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("entry", sa.LargeBinary, nullable=False),
    )
    op.execute("INSERT INTO audit_entries_0017 (seq, entry) SELECT seq, entry FROM audit_entries")
    op.drop_table("audit_entries")
    op.rename_table("audit_entries_0017", "audit_entries")
    op.create_table(
        "audit_account_entries_0017",
        sa.Column("account_ref", sa.String(40), primary_key=True),
        sa.Column("account_seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False, unique=True),
        sa.Column("time", sa.String(32), nullable=False),
        sa.Column("leaf", sa.LargeBinary(32), nullable=False),
        sqlite_with_rowid=False,
    )
    op.execute("INSERT INTO audit_account_entries_0017 (account_ref, account_seq, seq, time, leaf) "
               "SELECT account_ref, account_seq, seq, time, leaf FROM audit_account_entries")
    op.drop_table("audit_account_entries")
    op.rename_table("audit_account_entries_0017", "audit_account_entries")
