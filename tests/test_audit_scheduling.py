"""Where the audit log's background work runs: checkpoints are signed off the writer thread and stored in
its transactions; SQLite's WAL is checkpointed off every commit, and stays short."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from auditlog.checkpoint import open_checkpoint
from clipstore.audit import AuditLog
from clipstore.audit import log as audit_log
from clipstore.audit.signing import load_or_create_signer
from clipstore.clock import SystemClock
from clipstore.errors import Unavailable
from clipstore.store import Database
from clipstore.store import db as db_module
from clipstore.unit import AuditRecord
from kms import LocalKms


def _record(i: int) -> AuditRecord:
    return AuditRecord(actor_id="p_test", actor_role="admin", action="probe", request_id=f"r{i}")


@pytest.fixture
def db(tmp_path: Path, database_url: str | None) -> Iterator[Database]:
    db = Database(database_url or f"sqlite:///{tmp_path / 'a.db'}")
    yield db
    db.close()


def _log(db: Database, tmp_path: Path, **kw: Any) -> AuditLog:
    return AuditLog(db, load_or_create_signer(db, LocalKms.from_file(tmp_path / "root.key")), SystemClock(),
                    **{"checkpoint_every_entries": 5, "checkpoint_every_s": 3600, **kw})


def test_checkpoints_are_signed_off_the_writer_thread_ride_in_its_commits_and_verify(
        db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_log, "CHECKPOINT_RIDE_S", 60.0)  # no checkpoint may commit on its own here
    provers: set[str] = set()
    prove = AuditLog._prove

    def spy(self: AuditLog, *args: Any) -> Any:
        provers.add(threading.current_thread().name)
        return prove(self, *args)

    monkeypatch.setattr(AuditLog, "_prove", spy)
    audit = _log(db, tmp_path)
    try:
        audit.append(_record(0))  # starts the threads; its checkpoint is due at once (none yet)
        before, appends = db.commits, 0
        while (latest := audit.reader.latest_checkpoint()) is None or latest[0] < 20:
            assert appends < 2000, "no checkpoint of 20 entries was stored"
            audit.append(_record(appends + 1))
            appends += 1
        assert db.commits - before == appends  # one commit per append: each checkpoint rode in one
        assert provers == {"audit-signer"}
        cp = open_checkpoint(latest[1], audit.signer.verifier)
        assert cp.size == latest[0] and cp.root == audit.reader.root(cp.size)
    finally:
        audit.close()  # a checkpoint still waiting for a ride commits alone, and the final one is stored
    last = audit.reader.latest_checkpoint()
    assert last is not None and last[0] == audit.reader.size()


def test_a_checkpoint_falls_due_by_time_with_no_appends(db: Database, tmp_path: Path) -> None:
    audit = _log(db, tmp_path, checkpoint_every_entries=10**9, checkpoint_every_s=0.2)
    try:
        audit.append(_record(0))
        audit.append(_record(1))
        for _ in range(100):
            latest = audit.reader.latest_checkpoint()
            if latest is not None and latest[0] == 2:
                break
            threading.Event().wait(0.05)
        assert latest is not None and latest[0] == 2
    finally:
        audit.close()


def test_a_checkpoint_another_replica_stored_first_is_kept_and_one_with_another_root_halts(
        db: Database, tmp_path: Path) -> None:
    one = _log(db, tmp_path, checkpoint_every_entries=10**9)
    two = _log(db, tmp_path, checkpoint_every_entries=10**9)
    try:
        for i in range(3):
            one.append(_record(i))
        two.run(lambda tx: None)  # the second replica reads what the first appended
        assert two.checkpoint() == one.checkpoint()  # the same size and tree: stored once, both fine
        one.append(_record(3))
        size = one.reader.size()
        with db.transaction() as conn:  # a checkpoint of this size with another root is already there
            conn.execute(sa.text("INSERT INTO audit_checkpoints (size, root, note, created_at) "
                                 "VALUES (:s, :r, 'forged', 0)"), {"s": size, "r": b"\x01" * 32})
        with pytest.raises(Unavailable):
            one.checkpoint()
        assert one.halted is not None and one.halted.kind == "fork" and str(size) in one.halted.detail
    finally:
        one.close()
        two.close()


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


# -- a checkpoint riding in the writer's transaction: stored if and only if that transaction commits ----

def _parked(audit: AuditLog) -> None:
    """Wait until the signer has signed a checkpoint and parked its row for the writer's next batch."""
    for _ in range(400):
        if audit._rider is not None:
            return
        threading.Event().wait(0.01)
    raise AssertionError("no checkpoint was parked to ride")


def _consistent(audit: AuditLog) -> tuple[int, int]:
    """What this process believes it signed last is stored, and nothing newer is stored."""
    latest = audit.reader.latest_checkpoint()
    stored = latest[0] if latest is not None else 0
    assert audit._signed.size == stored or not audit._signed.note and stored == 0, (audit._signed.size, stored)
    return stored, audit._signed.size


@pytest.fixture
def riding(db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AuditLog]:
    monkeypatch.setattr(audit_log, "CHECKPOINT_RIDE_S", 60.0)  # a parked checkpoint waits for a batch
    audit = _log(db, tmp_path, checkpoint_every_entries=10**9)
    audit.append(_record(0))  # the first checkpoint is due at once; none other falls due here
    _parked(audit)
    yield audit
    audit.close()


def test_a_unit_failing_in_the_batch_a_checkpoint_rides_in_leaves_it_stored_with_the_others(
        riding: AuditLog) -> None:
    """The batch is rolled back and run again without the failed unit: the checkpoint's row with it."""
    def fails(tx: Any) -> None:
        tx.audit(_record(99))
        raise RuntimeError("a bug in a unit")

    bad, good = riding.submit(fails), riding.submit(lambda tx: tx.audit(_record(1)))
    with pytest.raises(RuntimeError):
        bad.result(10)
    good.result(10)
    for _ in range(200):
        if riding._rider is None and riding._signed.size == 1:
            break
        threading.Event().wait(0.01)
    assert _consistent(riding) == (1, 1)
    assert riding.reader.size() == 2  # the failed unit's entry is not there


def test_a_batch_that_does_not_commit_takes_the_checkpoint_riding_in_it_down_too(
        riding: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """The row is rolled back and the signer does not believe it signed (it signs again later)."""
    chain = AuditLog._chain

    def broken(self: AuditLog, *args: Any) -> Any:
        monkeypatch.setattr(AuditLog, "_chain", chain)  # once
        raise OSError("disk full")

    monkeypatch.setattr(AuditLog, "_chain", broken)
    with pytest.raises(Unavailable):
        riding.append(_record(1))
    for _ in range(200):
        if riding._rider is None and not riding._sign_due.is_set():
            break
        threading.Event().wait(0.01)
    assert _consistent(riding) == (0, 0)
    assert riding.reader.size() == 1
    riding.append(_record(2))
    assert riding.checkpoint()[0] == 2 and _consistent(riding) == (2, 2)


def test_a_rewritten_history_while_a_checkpoint_waits_to_ride_halts_and_stores_nothing(
        riding: AuditLog, db: Database) -> None:
    with db.transaction() as conn:  # the entry goes, and the head with it
        conn.execute(sa.text("DELETE FROM audit_entries WHERE seq = 0"))
        conn.execute(sa.text("UPDATE audit_head SET size = 0 WHERE id = 1"))
    with pytest.raises(Unavailable):
        riding.append(_record(1))
    assert riding.halted is not None
    for _ in range(200):
        if riding._rider is None:
            break
        threading.Event().wait(0.01)
    assert riding.reader.latest_checkpoint() is None and not riding._signed.note


def test_close_stores_a_checkpoint_waiting_to_ride_at_once(riding: AuditLog) -> None:
    started = time.monotonic()
    riding.close()
    assert time.monotonic() - started < 10  # not the 60 s the checkpoint would have waited for a ride
    latest = riding.reader.latest_checkpoint()
    assert latest is not None and latest[0] == 1 and _consistent(riding) == (1, 1)


def test_close_while_appends_go_on_returns_and_leaves_one_writer(db: Database, tmp_path: Path) -> None:
    """An append racing close() restarted the threads while close() was stopping the old ones: the old
    signer missed its stop (close() waited for it for ever) and two writers took units from one queue;
    and one queued just after close()'s end mark waited 30 s for nothing."""
    audit = _log(db, tmp_path, checkpoint_every_entries=2, checkpoint_every_s=0.01)
    stop, before = threading.Event(), set(threading.enumerate())

    slowest = [0.0]

    def appends() -> None:
        i = 0
        while not stop.is_set():
            started = time.monotonic()
            with contextlib.suppress(Unavailable):
                audit.append(_record(i))
            slowest[0] = max(slowest[0], time.monotonic() - started)
            i += 1

    appenders = [threading.Thread(target=appends, daemon=True) for _ in range(3)]
    try:
        audit.append(_record(0))
        for t in appenders:
            t.start()
        for _ in range(8):
            threading.Event().wait(0.03)
            closer = threading.Thread(target=audit.close, daemon=True)
            closer.start()
            closer.join(15)
            assert not closer.is_alive(), "close() never returned"
    finally:
        stop.set()
        for t in appenders:
            t.join(15)
        audit.close()
    left = [t.name for t in threading.enumerate() if t not in before and t.name.startswith("audit-")]
    assert left == [], left  # every writer and signer this log started has stopped
    assert audit.halted is None
    # An append queued behind close()'s end mark waited APPEND_TIMEOUT_S (30 s) for a writer that never came.
    assert slowest[0] < 10, slowest


def test_a_wal_checkpoint_waiting_for_a_pooled_connection_does_not_hold_writers_off(tmp_path: Path) -> None:
    """The checkpoint that holds writers off (the background one's second pass, truncate_wal) took the
    write lock and then waited for a connection: with the pool emptied by readers, every writer waited
    up to the pool's 30 s timeout with it (a deadlock for that long if those readers wait for a write)."""
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    held = [db.engine.connect() for _ in range(16)]  # pool_size + max_overflow: the pool is empty
    truncating = threading.Thread(target=db.truncate_wal, daemon=True)
    try:
        truncating.start()
        threading.Event().wait(0.3)  # it is waiting for a connection now
        assert db._write_lock is not None
        got = db._write_lock.acquire(timeout=3)
        assert got, "a writer waited on the write lock while the checkpoint waited for the pool"
        db._write_lock.release()
    finally:
        for conn in held:
            conn.close()
        truncating.join(35)
        db.close()


def test_an_append_that_found_the_writer_running_but_queues_after_close_is_still_recorded(
        db: Database, tmp_path: Path) -> None:
    """The append is held between finding the writer running and putting its unit in the queue, for as
    long as close() takes (or 1 s, if close() waits for it)."""
    audit = _log(db, tmp_path)
    audit.append(_record(0))
    queue, found_running, go = audit._queue, threading.Event(), threading.Event()

    class Held:
        def put(self, item: Any) -> None:
            if threading.current_thread().name == "appender" and not found_running.is_set():
                found_running.set()
                go.wait(10)
            queue.put(item)

        def __getattr__(self, name: str) -> Any:
            return getattr(queue, name)

    audit._queue = Held()  # type: ignore[assignment]
    outcome: list[object] = []
    appender = threading.Thread(target=lambda: outcome.append(_outcome(audit)), name="appender", daemon=True)
    appender.start()
    assert found_running.wait(10)
    closer = threading.Thread(target=audit.close, daemon=True)
    closer.start()
    closer.join(1)
    go.set()
    closer.join(20)
    appender.join(20)
    try:
        assert outcome == [1]  # recorded before close() stopped the writer, not "too busy" after the wait
    finally:
        audit.close()


def _outcome(audit: AuditLog) -> object:
    try:
        return audit.append(_record(1), timeout_s=5)
    except Unavailable as exc:
        return exc
