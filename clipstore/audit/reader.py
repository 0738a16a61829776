"""Reads of the stored log: entries, subtree hashes, proofs, checkpoints."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import sqlalchemy as sa

from auditlog.merkle import HASH_BYTES, leaf_hash, node_hash, subtree_levels
from auditlog.tiles import TILE_WIDTH
from auditlog.tree import Range, consistency_ranges, inclusion_ranges, perfect_subtrees
from clipstore.store import Database, schema
from clipstore.store.plain import fetch_all

MAX_PAGE_ENTRIES = 1000
EXPORT_BATCH_ENTRIES = 10_000
MAX_QUERY_KEYS = 10_000  # bound parameters per IN query (SQLite allows 32766)
TILE_LEVELS = 8  # tree levels per tile level: a tile holds 256 = 2**8 hashes
_TILES_SQL = "SELECT idx, hashes, nodes FROM audit_tiles WHERE level = ? AND idx IN ({marks})"


_ENTRIES_BY_SEQ = sa.select(schema.audit_entries.c.seq, schema.audit_entries.c.entry).where(
    schema.audit_entries.c.seq.in_(sa.bindparam("seqs", expanding=True)))


class AuditReader:
    def __init__(self, db: Database) -> None:
        self._db = db

    def size(self) -> int:
        return self.head()[0]

    def head(self) -> tuple[int, str]:
        """(size, hex leaf hash of the last entry) as `audit_head` says. Plain SQL: the signer asks at
        every checkpoint, and the idle writer every tick."""
        with self._db.read() as conn:
            (size, last_hash), = fetch_all(conn, "SELECT size, last_hash FROM audit_head WHERE id = 1", ())
        return int(size), str(last_hash)

    def entries(self, start: int, limit: int) -> list[bytes]:
        """Entries [start, start + limit), as stored. Plain SQL: the signer reads back every entry it
        signs (a checkpoint per 1,000 entries), and through SQLAlchemy's result rows that cost as much
        as writing them."""
        with self._db.read() as conn:
            return [bytes(e) for (e,) in fetch_all(
                conn, "SELECT entry FROM audit_entries WHERE seq >= ? ORDER BY seq LIMIT ?", (start, limit))]

    def iter_entries(self, end: int) -> Iterator[bytes]:
        """Entries [0, end) in batches, for exports of any size in bounded memory."""
        start = 0
        while start < end:
            batch = self.entries(start, min(EXPORT_BATCH_ENTRIES, end - start))
            if not batch:
                return
            yield from batch
            start += len(batch)

    def nodes(self, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """Subtree hashes by (level, index), from the stored tiles (schema.audit_tiles): each tile read once
        and hashed up once, as far as its nodes asked for need (the unfinished level-0 tile is stored too,
        with its leaf hashes only). Plain SQL: a proof's two or three reads through SQLAlchemy cost as much
        as its hashing."""
        spans: dict[tuple[int, int], tuple[int, int, int, int]] = {}  # key -> (tile level, tile, rest, offset)
        reach: dict[tuple[int, int], int] = {}  # tile -> the highest level within it asked for
        for level, idx in set(keys):
            tile_level, rest = divmod(level, TILE_LEVELS)
            first = idx << rest
            at = (tile_level, first // TILE_WIDTH)
            spans[(level, idx)] = (*at, rest, first % TILE_WIDTH >> rest)
            reach[at] = max(reach.get(at, 0), rest)
        rows: dict[tuple[int, int], tuple[bytes, bytes | None]] = {}
        with self._db.read() as conn:
            for tile_level in sorted({t for t, _ in reach}):
                wanted = sorted(i for t, i in reach if t == tile_level)
                for start in range(0, len(wanted), MAX_QUERY_KEYS):
                    chunk = wanted[start:start + MAX_QUERY_KEYS]
                    marks = ", ".join("?" * len(chunk))  # placeholders only: the indices are bound values
                    rows.update(((tile_level, int(i)), (bytes(h), None if n is None else bytes(n))) for i, h, n in
                                fetch_all(conn, _TILES_SQL.replace("{marks}", marks), (tile_level, *chunk)))
            for tile_level, tile in reach:
                if not tile_level and (0, tile) not in rows:  # the unfinished leaf tile of a log no append has
                    # written since revision 0017 migrated it: hashed from its entries
                    rows[0, tile] = (b"".join(leaf_hash(bytes(e)) for (e,) in fetch_all(
                        conn, "SELECT entry FROM audit_entries WHERE seq >= ? AND seq < ? ORDER BY seq",
                        (tile * TILE_WIDTH, (tile + 1) * TILE_WIDTH))), None)
        levels = {at: _tile_levels(*rows.get(at, (b"", None)), top) for at, top in reach.items()}
        found: dict[tuple[int, int], bytes] = {}
        for key, (tile_level, tile, rest, offset) in spans.items():
            hashes = levels[tile_level, tile][rest]
            if (offset + 1) * HASH_BYTES <= len(hashes):
                found[key] = hashes[offset * HASH_BYTES:(offset + 1) * HASH_BYTES]
        if len(found) != len(spans):
            raise LookupError(f"audit tree is missing {len(spans) - len(found)} subtree hashes")
        return found

    def entries_at(self, indices: Sequence[int]) -> list[bytes]:
        """The entries at `indices`, in that order; LookupError if one is missing."""
        found: dict[int, bytes] = {}
        with self._db.read() as conn:
            for start in range(0, len(indices), MAX_QUERY_KEYS):
                found.update((int(seq), bytes(e)) for seq, e in
                             conn.execute(_ENTRIES_BY_SEQ, {"seqs": list(indices[start:start + MAX_QUERY_KEYS])}))
        if len(found) != len(set(indices)):
            raise LookupError(f"audit log is missing {len(set(indices)) - len(found)} entries")
        return [found[i] for i in indices]

    def account_entries(self, account_ref: str, *, through: int, before: str | None) -> list[tuple[int, int]]:
        """(account_seq, index) of the account's chained entries up to the one at index `through`,
        starting at its first, or at its last one whose time is before `before` (the report's fence)."""
        t = schema.audit_account_entries
        with self._db.read() as conn:
            head = conn.scalar(sa.select(t.c.account_seq).where(t.c.account_ref == account_ref, t.c.seq == through))
            if head is None:
                raise LookupError(f"entry {through} is not in the account's chain")
            first = 1
            if before is not None:
                fence = conn.scalar(sa.select(sa.func.max(t.c.account_seq)).where(
                    t.c.account_ref == account_ref, t.c.time < before, t.c.account_seq <= head))
                first = int(fence or 1)
            rows = conn.execute(sa.select(t.c.account_seq, t.c.seq).where(
                t.c.account_ref == account_ref, t.c.account_seq >= first, t.c.account_seq <= head
            ).order_by(t.c.account_seq)).all()
        return [(int(a), int(i)) for a, i in rows]

    def range_roots(self, ranges: Sequence[Range]) -> list[bytes]:
        """One query for every stored subtree the ranges need, then O(log n) hashing."""
        parts = [perfect_subtrees(lo, hi) for lo, hi in ranges]
        stored = self.nodes(key for part in parts for key in part)
        roots = []
        for part in parts:
            hashes = [stored[key] for key in part]
            root = hashes[-1]
            for left in reversed(hashes[:-1]):
                root = node_hash(left, root)
            roots.append(root)
        return roots

    def leaf_hash(self, index: int) -> bytes:
        return self.nodes([(0, index)])[(0, index)]

    def root(self, size: int) -> bytes:
        return self.range_roots([(0, size)])[0]

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return self.range_roots(inclusion_ranges(index, size))

    def consistency_proof(self, old_size: int, size: int) -> list[bytes]:
        return self.range_roots(consistency_ranges(old_size, size))

    def checkpoint_root(self, size: int) -> bytes | None:
        t = schema.audit_checkpoints
        with self._db.read() as conn:
            root = conn.scalar(sa.select(t.c.root).where(t.c.size == size))
        return None if root is None else bytes(root)

    def latest_checkpoint(self) -> tuple[int, str] | None:
        t = schema.audit_checkpoints
        with self._db.read() as conn:
            row = conn.execute(sa.select(t.c.size, t.c.note).order_by(t.c.size.desc()).limit(1)).one_or_none()
        return None if row is None else (int(row.size), row.note)


def _tile_levels(hashes: bytes, nodes: bytes | None, top: int) -> list[bytes]:
    """The tile's hashes and the `top` levels of nodes above them (each level its complete pairs only):
    as stored in `nodes`, else hashed."""
    if nodes is None:
        return subtree_levels(hashes, top)
    levels, at, width = [hashes], 0, len(hashes) // HASH_BYTES
    for level in range(1, top + 1):
        n = (width >> level) * HASH_BYTES
        levels.append(nodes[at:at + n])
        at += n
    return levels
