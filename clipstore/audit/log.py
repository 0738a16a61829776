"""Durable audit appends: one sequencer thread, group commit, periodic checkpoints.

Callers block in `append` until their entry is committed (many callers share
one transaction and one fsync). Across processes the `audit_head` row lock
serialises writers, so replicas on one PostgreSQL keep a single chain.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from auditlog.checkpoint import Checkpoint, sign_checkpoint
from auditlog.entry import make_entry
from auditlog.merkle import leaf_hash, node_hash, root_hash
from auditlog.note import NoteSigner
from clipstore.audit.reader import AuditReader
from clipstore.clock import Clock, rfc3339
from clipstore.errors import Unavailable
from clipstore.logs import get_logger
from clipstore.store import Database, schema
from clipstore.store.schema import node_key

MAX_BATCH_ENTRIES = 4096  # bounds one transaction's size and memory
APPEND_TIMEOUT_S = 30.0
GROUP_COMMIT_WAIT_S = 0.0003  # short against an fsync; lets concurrent appenders share it
log = get_logger("clipstore.audit")


class AuditUnavailable(Unavailable):
    reason = "AUDIT_UNAVAILABLE"


@dataclass(frozen=True, kw_only=True)
class AuditRecord:
    """One security-relevant action. Never account ids, names, serials, keys or codes."""

    actor_id: str
    actor_role: str
    action: str
    outcome: str = "ok"
    reason: str = ""
    clip_id: str = ""
    account_ref: str = ""
    principal_id: str = ""  # the principal acted upon (enrolment, disabling)
    request_id: str = ""


@dataclass(frozen=True, kw_only=True)
class Actor:
    """Who acts: a principal (id and role) within one request."""

    id: str
    role: str
    request_id: str = ""

    def record(self, action: str, **fields: str) -> AuditRecord:
        return AuditRecord(actor_id=self.id, actor_role=self.role, action=action, request_id=self.request_id,
                           **fields)


SYSTEM = Actor(id="system", role="retention")
OPERATOR = Actor(id="cli", role="operator")


@dataclass
class _Pending:
    record: AuditRecord
    done: Future[int]


class AuditLog:
    def __init__(self, db: Database, signer: NoteSigner, clock: Clock, *, checkpoint_every_entries: int,
                 checkpoint_every_s: float, max_batch_entries: int = MAX_BATCH_ENTRIES) -> None:
        self._db = db
        self.signer = signer
        self.reader = AuditReader(db)
        self._clock = clock
        self._every_entries = checkpoint_every_entries
        self._every_s = checkpoint_every_s
        self._max_batch = max_batch_entries
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._frontier: tuple[int, dict[int, bytes]] | None = None  # (size, level -> hash)
        self._raw: Any = None  # the sequencer thread's own DBAPI connection
        self._last_checkpoint = (-1, 0.0)  # (size, time)
        self.batches = 0  # for metrics and the benchmark
        self.on_record: Callable[[AuditRecord], None] = lambda record: None
        self.on_batch: Callable[[int, float], None] = lambda entries, seconds: None
        self._last_batch_size = 0

    # -- appending ---------------------------------------------------------
    def append(self, record: AuditRecord) -> int:
        """Append and wait until durable; returns the entry's index."""
        return self.append_async(record).result(timeout=APPEND_TIMEOUT_S)

    def append_async(self, record: AuditRecord) -> Future[int]:
        self._ensure_started()
        pending = _Pending(record, Future())
        self._queue.put(pending)
        return pending.done

    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-sequencer", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Flush pending appends, write a final checkpoint, stop the sequencer."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=self._every_s)
            except queue.Empty:
                self._maybe_checkpoint(force_time=True)
                continue
            if self._last_batch_size > 1:
                # Concurrent callers are about: let them enqueue so one fsync serves them all.
                time.sleep(GROUP_COMMIT_WAIT_S)
            batch: list[_Pending] = []
            item: _Pending | None = first
            while True:
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
                if stopping or len(batch) >= self._max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._commit(batch)
            self._last_batch_size = len(batch)
            self._maybe_checkpoint(force_time=stopping)

    def _commit(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            first_seq = self._write(batch)
        except Exception as exc:
            self._frontier = None
            log.error("audit.append_failed", entries=len(batch), exc_type=type(exc).__name__)
            for p in batch:
                p.done.set_exception(AuditUnavailable(
                    "the audit log could not record this action, so it was not performed; retry later"))
            return
        self.batches += 1
        self.on_batch(len(batch), time.perf_counter() - started)
        for offset, p in enumerate(batch):
            self.on_record(p.record)
            p.done.set_result(first_seq + offset)

    def _sql(self, statement: str) -> str:
        return statement if self._db.is_sqlite else statement.replace("?", "%s")

    def _write(self, batch: list[_Pending]) -> int:
        # The hot path uses one DBAPI connection owned by the sequencer thread:
        # four statements per batch, however many entries it holds.
        with self._db.write_lock():
            return self._write_locked(batch)

    def _write_locked(self, batch: list[_Pending]) -> int:
        if self._raw is None:
            self._raw = self._db.engine.raw_connection()
        raw = self._raw
        try:
            cur = raw.cursor()
            # Lock the head row first: the one place writers of all replicas serialise.
            cur.execute(self._sql("UPDATE audit_head SET size = size WHERE id = 1 RETURNING size, last_hash"))
            size, prev = cur.fetchone()
            frontier = self._load_frontier(cur, size)
            first, now = size, rfc3339(self._clock.now())
            entry_rows: list[tuple[int, bytes]] = []
            node_rows: list[tuple[int, bytes]] = []
            for p in batch:
                r = p.record
                data = make_entry(seq=size, prev=prev, time=now, actor={"id": r.actor_id, "role": r.actor_role},
                                  action=r.action, target={"clip_id": r.clip_id, "account_ref": r.account_ref,
                                                           "principal_id": r.principal_id},
                                  outcome={"result": r.outcome, "reason": r.reason}, request_id=r.request_id)
                leaf = leaf_hash(data)
                entry_rows.append((size, data))
                node_rows.append((node_key(0, size), leaf))
                h, idx, level = leaf, size, 0
                while idx & 1:  # a right child: fold in the left sibling from the frontier
                    h = node_hash(frontier.pop(level), h)
                    idx, level = idx >> 1, level + 1
                    node_rows.append((node_key(level, idx), h))
                frontier[level] = h
                prev, size = leaf.hex(), size + 1
            cur.executemany(self._sql("INSERT INTO audit_entries (seq, entry) VALUES (?, ?)"), entry_rows)
            cur.executemany(self._sql("INSERT INTO audit_nodes (node_key, hash) VALUES (?, ?)"), node_rows)
            cur.execute(self._sql("UPDATE audit_head SET size = ?, last_hash = ? WHERE id = 1"), (size, prev))
            raw.commit()
        except BaseException:
            self._raw = None
            with contextlib.suppress(Exception):
                raw.rollback()
            with contextlib.suppress(Exception):
                raw.close()
            raise
        self._frontier = (size, frontier)
        return first

    def _load_frontier(self, cur: Any, size: int) -> dict[int, bytes]:
        if self._frontier is not None and self._frontier[0] == size:
            return dict(self._frontier[1])
        levels = {node_key(level, (size >> level) - 1): level
                  for level in range(size.bit_length()) if size >> level & 1}
        if not levels:
            return {}
        marks = ", ".join("?" * len(levels))
        cur.execute(self._sql(f"SELECT node_key, hash FROM audit_nodes WHERE node_key IN ({marks})"),  # noqa: S608
                    tuple(levels))
        frontier = {levels[k]: bytes(h) for k, h in cur.fetchall()}
        if len(frontier) != len(levels):
            raise LookupError("audit tree frontier is incomplete")
        return frontier

    # -- checkpoints -------------------------------------------------------
    def _maybe_checkpoint(self, *, force_time: bool) -> None:
        size = self._frontier[0] if self._frontier else None
        last_size, last_time = self._last_checkpoint
        if size is None or size == last_size:
            return
        due = size - max(last_size, 0) >= self._every_entries or \
            self._clock.now() - last_time >= self._every_s or force_time
        if due:
            try:
                self.checkpoint()
            except Exception as exc:  # the next batch or tick retries
                log.error("audit.checkpoint_failed", exc_type=type(exc).__name__)

    def checkpoint(self) -> tuple[int, str]:
        """Sign and store a checkpoint for the log as it is now; returns (size, note)."""
        t = schema.audit_checkpoints
        size = self.reader.size()
        existing = self.reader.latest_checkpoint()
        if existing is not None and existing[0] == size:
            return existing
        root = self.reader.root(size) if size else root_hash([])
        note = sign_checkpoint(Checkpoint(origin=self.signer.name, size=size, root=root), self.signer)
        now = self._clock.now()
        try:
            with self._db.transaction() as conn:
                conn.execute(t.insert().values(size=size, root=root, note=note, created_at=now))
        except sa.exc.IntegrityError:  # another replica signed this size first: serve its note
            stored = self.reader.latest_checkpoint()
            assert stored is not None
            size, note = stored
        self._last_checkpoint = (size, now)
        return size, note

