"""How the audit tree is stored: C2SP tiles (a row per 256 hashes), the unfinished leaf tile hashed from its
entries; logs stored under earlier revisions keep their roots and proofs."""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from auditlog.entry import entry_hash
from auditlog.merkle import (
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)
from clipstore.audit import AuditLog
from clipstore.audit.history import RecomputedTree
from clipstore.audit.signing import load_or_create_signer
from clipstore.clock import SystemClock
from clipstore.store import Database, migrations, schema
from clipstore.unit import AuditRecord
from kms import LocalKms
from tests.auditlog_helpers import build_entries, post_order_key, stored_tiles
from tests.legacy import c1e0a265

OLD_SIZE = 37  # odd, so the writer's frontier starts at a lone leaf
RECORD = AuditRecord(actor_id="p_test", actor_role="admin", action="probe")


def _database(tmp_path: Path, database_url: str | None, *, upgrade: bool = True) -> Database:
    return Database(database_url or f"sqlite:///{tmp_path / 'm.db'}", upgrade=upgrade)


def _audit(db: Database, tmp_path: Path) -> AuditLog:
    return AuditLog(db, load_or_create_signer(db, LocalKms.from_file(tmp_path / "root.key")), SystemClock(),
                    checkpoint_every_entries=10**9, checkpoint_every_s=3600)


def _tiles(db: Database) -> list[tuple[int, int, bytes, bytes | None]]:
    t = schema.audit_tiles
    with db.read() as conn:
        return [(int(level), int(idx), bytes(h), None if n is None else bytes(n)) for level, idx, h, n in
                conn.execute(sa.select(t.c.level, t.c.idx, t.c.hashes, t.c.nodes).order_by(t.c.level, t.c.idx))]


def _level_major_nodes(entries: list[bytes]) -> list[tuple[int, bytes]]:
    """Every perfect subtree hash, leaves included, under the keys used up to migration 8."""
    rows, level, hashes = [], 0, [leaf_hash(e) for e in entries]
    while hashes:
        rows += [(level << 56 | i, h) for i, h in enumerate(hashes)]
        hashes = [node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes) - 1, 2)]
        level += 1
    return rows


def _post_order_nodes(entries: list[bytes]) -> list[tuple[int, bytes]]:
    """The interior nodes as revisions 0009 to 0016 stored them."""
    return [(post_order_key(k >> 56, k & (1 << 56) - 1), h) for k, h in _level_major_nodes(entries) if k >> 56]


def _check_proofs(audit: AuditLog, leaves: list[bytes], sizes: list[int]) -> None:
    """Roots, inclusion and consistency proofs served from storage equal those computed from the leaves."""
    for size in sizes:
        root = root_hash(leaves[:size])
        assert audit.reader.root(size) == root
        for index in {0, size // 3, size // 2, size - 1, min(255, size - 1), min(256, size - 1)}:
            proof = audit.reader.inclusion_proof(index, size)
            assert proof == inclusion_proof(leaves[:size], index)
            verify_inclusion(audit.reader.leaf_hash(index), index, size, proof, root)
        for old in {1, size // 2, min(256, size), size - 1} - {0}:
            assert audit.reader.consistency_proof(old, size) == consistency_proof(leaves[:size], old)


def test_a_log_stored_before_revision_0009_keeps_its_root_and_proofs_and_grows(
        tmp_path: Path, database_url: str | None) -> None:
    old = _database(tmp_path, database_url, upgrade=False)
    c1e0a265.migrate(old.engine)  # a database as clipstore left it at schema version 8
    entries = build_entries(OLD_SIZE)
    with old.transaction() as conn:
        conn.execute(schema.audit_entries.insert(), [{"seq": i, "entry": e} for i, e in enumerate(entries)])
        conn.execute(sa.text("INSERT INTO audit_nodes (node_key, hash) VALUES (:k, :h)"),
                     [{"k": k, "h": h} for k, h in _level_major_nodes(entries)])
        conn.execute(schema.audit_head.update().values(size=OLD_SIZE, last_hash=entry_hash(entries[-1])))
    old.close()

    db = _database(tmp_path, database_url)  # migrations 9 to head run
    audit = _audit(db, tmp_path)
    leaves = [leaf_hash(e) for e in entries]
    for size in range(1, OLD_SIZE + 1):
        assert audit.reader.root(size) == root_hash(leaves[:size])
        for index in range(size):
            verify_inclusion(leaves[index], index, size, audit.reader.inclusion_proof(index, size),
                             root_hash(leaves[:size]))
    assert _tiles(db) == [(0, 0, b"".join(leaves), None)]  # no tile is full: the unfinished one, hashes only

    for i in range(20):  # the writer carries on
        audit.append(AuditRecord(actor_id="p_test", actor_role="admin", action="probe", request_id=f"r{i}"))
    grown = [leaf_hash(e) for e in audit.reader.entries(0, 1000)]
    assert len(grown) == OLD_SIZE + 20 and grown[:OLD_SIZE] == leaves
    assert audit.reader.root(len(grown)) == root_hash(grown)
    verify_consistency(OLD_SIZE, len(grown), root_hash(leaves), root_hash(grown),
                       audit.reader.consistency_proof(OLD_SIZE, len(grown)))
    audit.close()
    db.close()


def test_revision_0017_turns_stored_nodes_into_tiles_and_the_log_keeps_its_proofs_and_grows(
        tmp_path: Path, database_url: str | None) -> None:
    old = _database(tmp_path, database_url, upgrade=False)
    with old.migration_lock() as conn:
        migrations.run(conn, "0016")
    size = 3 * 256 + 41  # three full leaf tiles and a partial one; a level-1 tile of three hashes
    entries = build_entries(size)
    with old.transaction() as conn:
        conn.execute(sa.text("INSERT INTO audit_entries (seq, entry) VALUES (:s, :e)"),
                     [{"s": i, "e": e} for i, e in enumerate(entries)])
        conn.execute(sa.text("INSERT INTO audit_nodes (node_key, hash) VALUES (:k, :h)"),
                     [{"k": k, "h": h} for k, h in _post_order_nodes(entries)])
        conn.execute(sa.text("UPDATE audit_head SET size = :n, last_hash = :h WHERE id = 1"),
                     {"n": size, "h": entry_hash(entries[-1])})
    old.close()

    db = _database(tmp_path, database_url)
    leaves = [leaf_hash(e) for e in entries]
    migrated, expected = _tiles(db), stored_tiles(leaves)
    assert [t[:3] for t in migrated] == [t[:3] for t in expected]
    # the nodes within each tile: computed on SQLite; hashed when read on PostgreSQL (the offline SQL)
    assert [t[3] for t in migrated] == ([t[3] for t in expected] if database_url is None else [None] * len(expected))
    with db.read() as conn:
        assert not sa.inspect(conn).has_table("audit_nodes")
    audit = _audit(db, tmp_path)
    _check_proofs(audit, leaves, [1, 2, 255, 256, 257, 512, 700, size])
    futures = [audit.append_async(RECORD) for _ in range(300)]
    futures[-1].result(30)
    grown = [leaf_hash(e) for e in audit.reader.entries(0, 10_000)]
    assert grown[:size] == leaves and len(grown) == size + 300
    tiles, expected = _tiles(db), stored_tiles(grown)
    assert [t[:3] for t in tiles] == [t[:3] for t in expected]
    assert all(t[3] in (None, e[3]) for t, e in zip(tiles, expected, strict=True))
    _check_proofs(audit, grown, [size, 1024, len(grown)])
    audit.close()
    db.close()


def test_a_commit_writes_a_row_per_tile_it_touches_not_per_node(tmp_path: Path) -> None:
    db = _database(tmp_path, None)
    audit = _audit(db, tmp_path)
    for future in [audit.append_async(RECORD) for _ in range(250)]:
        future.result(10)
    leaves = [leaf_hash(e) for e in audit.reader.entries(0, 1000)]
    assert _tiles(db) == [(0, 0, b"".join(leaves), None)]  # the unfinished leaf tile: its hashes as written
    for future in [audit.append_async(RECORD) for _ in range(16)]:  # fills tile 0 in one batch or two
        future.result(10)
    leaves = [leaf_hash(e) for e in audit.reader.entries(0, 1000)]
    assert [(level, idx) for level, idx, _, _ in _tiles(db)] == [(0, 0), (0, 1), (1, 0)]
    assert _tiles(db) == stored_tiles(leaves)
    _check_proofs(audit, leaves, [255, 256, 266])
    audit.close()
    db.close()


def test_proofs_across_tile_levels_equal_those_recomputed_from_the_leaves(tmp_path: Path) -> None:
    # Past 65,536 entries a level-2 tile holds the Merkle tree hash of each full level-1 tile.
    db = _database(tmp_path, None)
    audit = _audit(db, tmp_path)
    size = 65_536 + 3 * 256 + 7
    futures = [audit.append_async(RECORD) for _ in range(size)]
    futures[-1].result(300)
    leaves = [leaf_hash(e) for e in audit.reader.entries(0, size)]
    tiles = _tiles(db)
    assert tiles == stored_tiles(leaves)
    assert [(level, idx, len(h) // 32) for level, idx, h, _ in tiles if level] == [(1, 0, 256), (1, 1, 3), (2, 0, 1)]
    root = root_hash(leaves)
    for index in (0, 255, 256, 65_535, 65_536, size - 8, size - 1):
        verify_inclusion(leaves[index], index, size, audit.reader.inclusion_proof(index, size), root)
    for old in (1, 256, 65_535, 65_536, 65_537, size - 1):
        verify_consistency(old, size, root_hash(leaves[:old]), root,
                           audit.reader.consistency_proof(old, size))
    audit.close()
    db.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 700), min_size=1, max_size=12), st.integers(0, 300))
def test_the_tiles_a_batch_writes_are_those_of_the_tree_it_makes(batches: list[int], start: int) -> None:
    """Whatever the batches, the tiles written (each row's last write wins) are the log's tiles."""
    leaves = [os.urandom(32) for _ in range(start + sum(batches))]
    tree = RecomputedTree(lambda first, n: [])
    tree.append(leaves[:start])
    written = {(level, idx): (h, n) for level, idx, h, n in stored_tiles(leaves[:start])}
    at = start
    for n in batches:
        for level, idx, h, nodes in tree.tiles(leaves[at:at + n]):
            assert level or len(h) == 256 * 32 or nodes is None  # a leaf tile: full, or unfinished (hashes only)
            written[level, idx] = (h, nodes)
        tree.append(leaves[at:at + n])
        at += n
        assert sorted((level, idx, *row) for (level, idx), row in written.items()) == stored_tiles(leaves[:at])


def test_tiles_above_level_one_are_grown_too() -> None:
    leaves = [os.urandom(32) for _ in range(65_536 + 300)]
    tree = RecomputedTree(lambda first, n: [])
    tree.append(leaves[:65_000])
    written = {(level, idx): (h, n) for level, idx, h, n in stored_tiles(leaves[:65_000])}
    written.update(((level, idx), (h, n)) for level, idx, h, n in tree.tiles(leaves[65_000:]))
    assert sorted((level, idx, *row) for (level, idx), row in written.items()) == stored_tiles(leaves)
