"""Reads of the stored log: entries, subtree hashes, proofs, checkpoints."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import sqlalchemy as sa

from auditlog.merkle import HASH_BYTES, leaf_hash, node_hash, perfect_root
from auditlog.tiles import TILE_WIDTH
from auditlog.tree import Range, consistency_ranges, inclusion_ranges, perfect_subtrees
from clipstore.store import Database, schema
from clipstore.store.plain import fetch_all

MAX_PAGE_ENTRIES = 1000
EXPORT_BATCH_ENTRIES = 10_000
MAX_QUERY_KEYS = 10_000  # bound parameters per IN query (SQLite allows 32766)
TILE_LEVELS = 8  # tree levels per tile level: a tile holds 256 = 2**8 hashes


_TILES = sa.select(schema.audit_tiles.c.idx, schema.audit_tiles.c.hashes).where(
    schema.audit_tiles.c.level == sa.bindparam("level"),
    schema.audit_tiles.c.idx.in_(sa.bindparam("idx", expanding=True)))
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
        """Subtree hashes by (level, index), from the stored tiles (schema.audit_tiles): the node's hashes
        at the tile level below it, hashed up; leaves of the unfinished level-0 tile from their entries."""
        wanted = set(keys)
        spans = {}  # (level, idx) -> (tile level, tile idx, first hash in the tile, hashes)
        for level, idx in wanted:
            tile_level, rest = divmod(level, TILE_LEVELS)
            first = idx << rest
            spans[(level, idx)] = (tile_level, first // TILE_WIDTH, first % TILE_WIDTH, 1 << rest)
        tiles: dict[tuple[int, int], bytes] = {}
        by_level: dict[int, set[int]] = {}
        for tile_level, tile, _, _ in spans.values():
            by_level.setdefault(tile_level, set()).add(tile)
        with self._db.read() as conn:
            for tile_level, wanted_tiles in sorted(by_level.items()):
                ordered = sorted(wanted_tiles)
                for start in range(0, len(ordered), MAX_QUERY_KEYS):
                    tiles.update(((tile_level, int(i)), bytes(h)) for i, h in conn.execute(
                        _TILES, {"level": tile_level, "idx": ordered[start:start + MAX_QUERY_KEYS]}))
            # The unfinished level-0 tile is not stored: its leaves are their entries' hashes.
            seqs = sorted({tile * TILE_WIDTH + offset + k for tile_level, tile, offset, n in spans.values()
                           if not tile_level and (0, tile) not in tiles for k in range(n)})
            leaves: dict[int, bytes] = {}
            for start in range(0, len(seqs), MAX_QUERY_KEYS):
                leaves.update((int(seq), leaf_hash(bytes(e))) for seq, e in
                              conn.execute(_ENTRIES_BY_SEQ, {"seqs": seqs[start:start + MAX_QUERY_KEYS]}))
        found: dict[tuple[int, int], bytes] = {}
        for key, (tile_level, tile, offset, n) in spans.items():
            if (tile_level, tile) in tiles:
                raw = tiles[tile_level, tile][offset * HASH_BYTES:(offset + n) * HASH_BYTES]
            else:
                first = tile * TILE_WIDTH + offset
                raw = b"".join(leaves.get(seq, b"") for seq in range(first, first + n)) if not tile_level else b""
            if len(raw) == n * HASH_BYTES:
                found[key] = perfect_root(raw)
        if len(found) != len(wanted):
            raise LookupError(f"audit tree is missing {len(wanted) - len(found)} subtree hashes")
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

