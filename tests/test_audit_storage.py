"""How the audit tree is stored: subtree hashes in post-order, leaves hashed from their entries."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from auditlog.entry import entry_hash
from auditlog.merkle import leaf_hash, node_hash, root_hash, verify_consistency, verify_inclusion
from clipstore.audit import AuditLog
from clipstore.audit.signing import load_or_create_signer
from clipstore.clock import SystemClock
from clipstore.store import Database, schema
from clipstore.unit import AuditRecord
from kms import LocalKms
from tests.auditlog_helpers import build_entries
from tests.legacy import c1e0a265

OLD_SIZE = 37  # odd, so the writer's frontier starts at a lone leaf


def _database(tmp_path: Path, database_url: str | None, *, upgrade: bool = True) -> Database:
    return Database(database_url or f"sqlite:///{tmp_path / 'm.db'}", upgrade=upgrade)


def _level_major_nodes(entries: list[bytes]) -> list[tuple[int, bytes]]:
    """Every perfect subtree hash, leaves included, under the keys used up to migration 8."""
    rows, level, hashes = [], 0, [leaf_hash(e) for e in entries]
    while hashes:
        rows += [(level << 56 | i, h) for i, h in enumerate(hashes)]
        hashes = [node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes) - 1, 2)]
        level += 1
    return rows


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

    db = _database(tmp_path, database_url)  # migration 9 runs
    audit = AuditLog(db, load_or_create_signer(db, LocalKms.from_file(tmp_path / "root.key")), SystemClock(),
                     checkpoint_every_entries=10**9, checkpoint_every_s=3600)
    leaves = [leaf_hash(e) for e in entries]
    for size in range(1, OLD_SIZE + 1):
        assert audit.reader.root(size) == root_hash(leaves[:size])
        for index in range(size):
            verify_inclusion(leaves[index], index, size, audit.reader.inclusion_proof(index, size),
                             root_hash(leaves[:size]))
    with db.read() as conn:
        keys = set(conn.scalars(sa.select(schema.audit_nodes.c.node_key)))
    assert len(keys) == OLD_SIZE - OLD_SIZE.bit_count()  # the interior nodes only

    for i in range(20):  # the writer carries on from the migrated frontier
        audit.append(AuditRecord(actor_id="p_test", actor_role="admin", action="probe", request_id=f"r{i}"))
    grown = [leaf_hash(e) for e in audit.reader.entries(0, 1000)]
    assert len(grown) == OLD_SIZE + 20 and grown[:OLD_SIZE] == leaves
    assert audit.reader.root(len(grown)) == root_hash(grown)
    verify_consistency(OLD_SIZE, len(grown), root_hash(leaves), root_hash(grown),
                       audit.reader.consistency_proof(OLD_SIZE, len(grown)))
    audit.close()
    db.close()


def test_a_commit_writes_its_subtree_hashes_side_by_side(tmp_path: Path) -> None:
    # Post-order keys: the nodes one batch completes are consecutive apart from the leaves' gaps,
    # so the batch touches a page or two of audit_nodes, not one per tree level.
    db = _database(tmp_path, None)
    audit = AuditLog(db, load_or_create_signer(db, LocalKms.from_file(tmp_path / "root.key")), SystemClock(),
                     checkpoint_every_entries=10**9, checkpoint_every_s=3600)
    record = AuditRecord(actor_id="p_test", actor_role="admin", action="probe")
    for future in [audit.append_async(record) for _ in range(1000)]:
        future.result(10)
    with db.read() as conn:
        before = set(conn.scalars(sa.select(schema.audit_nodes.c.node_key)))
    for future in [audit.append_async(record) for _ in range(16)]:
        future.result(10)
    with db.read() as conn:
        new = sorted(set(conn.scalars(sa.select(schema.audit_nodes.c.node_key))) - before)
    assert new[-1] - new[0] < 2 * 16 + 16  # 16 leaves' gaps, ~15 nodes, and the ones they complete
    audit.close()
    db.close()
