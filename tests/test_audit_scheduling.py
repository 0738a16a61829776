"""Where the audit log's background work runs: SQLite's WAL is checkpointed off every commit, and stays short."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from clipstore.audit import AuditLog
from clipstore.audit.signing import load_or_create_signer
from clipstore.clock import SystemClock
from clipstore.store import Database
from clipstore.store import db as db_module
from clipstore.unit import AuditRecord
from kms import LocalKms


def _record(i: int) -> AuditRecord:
    return AuditRecord(actor_id="p_test", actor_role="admin", action="probe", request_id=f"r{i}")


def _log(db: Database, tmp_path: Path, **kw: Any) -> AuditLog:
    return AuditLog(db, load_or_create_signer(db, LocalKms.from_file(tmp_path / "root.key")), SystemClock(),
                    **{"checkpoint_every_entries": 5, "checkpoint_every_s": 3600, **kw})


def test_the_wal_is_checkpointed_off_the_writer_and_stays_short(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db_module, "WAL_CHECKPOINT_EVERY_S", 0.02)
    monkeypatch.setattr(db_module, "WAL_RESTART_FRAMES", 200)
    db = Database(f"sqlite:///{tmp_path / 'w.db'}")
    audit = _log(db, tmp_path, checkpoint_every_entries=10**9)
    wal = tmp_path / "w.db-wal"
    try:
        with db.read() as conn:  # SQLite's own checkpoint, inside a commit, is only a distant bound
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == db_module.WAL_AUTOCHECKPOINT_PAGES
        largest = 0
        for i in range(1500):  # ~3 pages each: 18 MB of WAL if it never restarted
            audit.append(_record(i))
            largest = max(largest, wal.stat().st_size)
        checkpointer = db.wal_checkpointer
        assert checkpointer is not None and checkpointer.checkpoints > 0
        assert largest < 4 * 1024 * 1024, f"the WAL grew to {largest} bytes"
    finally:
        audit.close()
        db.close()
    assert checkpointer._thread.is_alive() is False  # noqa: SLF001 (close stops it)
