"""Units of work and durable audit appends: one writer thread, group commit, periodic checkpoints.

A state-changing request is one *unit of work*: a function that runs its
checks, its state change and its audit entries against one transaction
(`Tx`). `AuditLog.run(unit)` hands it to the writer thread, which runs the
units that are waiting one after another inside ONE database transaction and
commits them together: many requests share one fsync, and a limit checked
inside a unit cannot be raced, because no other write interleaves. Across
processes the `audit_head` row lock, taken first, serialises writers, so
replicas on one PostgreSQL keep a single chain and see each other's commits.

A crash leaves a unit's effect and its entries both committed or both absent.
A unit that refuses (`raise tx.deny(...)`) keeps what it wrote (the denial's
entry, a failure counter); a unit that fails any other way is rolled back and
the others are committed without it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _json_str  # what json.dumps writes for a str
from typing import Any, Generic, TypeVar

import sqlalchemy as sa

from auditlog.checkpoint import Checkpoint, sign_checkpoint
from auditlog.merkle import leaf_hash, node_hash, root_hash
from auditlog.note import NoteSigner
from clipstore.audit.reader import AuditReader
from clipstore.clock import Clock, rfc3339
from clipstore.errors import ClipstoreError, Unavailable
from clipstore.logs import get_logger
from clipstore.store import Database, schema
from clipstore.store.schema import node_key

MAX_BATCH_ENTRIES = 4096  # bounds one transaction's size and memory
APPEND_TIMEOUT_S = 30.0
GROUP_COMMIT_WAIT_S = 0.0003  # short against an fsync; lets concurrent appenders share it
GROUP_COMMIT_POLL_S = 0.00005
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


T = TypeVar("T")


class Tx:
    """What a unit of work sees: the batch's connection, the batch's clock reading, and its audit trail."""

    def __init__(self, conn: sa.Connection, now: float) -> None:
        self.conn = conn
        self.now = now
        self.records: list[AuditRecord] = []
        self._denials: list[ClipstoreError] = []

    def audit(self, record: AuditRecord) -> None:
        """Record an action; it commits together with the unit's state change."""
        self.records.append(record)

    def deny(self, actor: Actor, action: str, error: ClipstoreError, **target: str) -> ClipstoreError:
        """Record a refusal and return the error to raise; what the unit wrote so far still commits."""
        self.audit(actor.record(action, outcome="denied", reason=error.reason, **target))
        self._denials.append(error)
        return error

    def refuse(self, error: ClipstoreError) -> ClipstoreError:
        """An expected outcome that is not worth an entry (an empty queue): keep the unit's writes."""
        self._denials.append(error)
        return error

    def is_denial(self, exc: BaseException) -> bool:
        return any(exc is d for d in self._denials)


Unit = Callable[[Tx], T]


@dataclass
class _Pending(Generic[T]):
    unit: Unit[T]
    done: Future[T] = field(default_factory=Future)
    first_seq: int = -1


def entry_bytes(r: AuditRecord, *, seq: int, prev: str, time: str) -> bytes:
    """`auditlog.entry.make_entry` for one record, written straight in canonical form: keys in sorted
    order, each string as `json.dumps(ensure_ascii=False)` writes it. Dumping a dict with sort_keys
    cost 9x more and was the writer's largest cost per entry; a property test holds the two equal."""
    return (f'{{"action":{_json_str(r.action)},"actor":{{"id":{_json_str(r.actor_id)},'
            f'"role":{_json_str(r.actor_role)}}},"outcome":{{"reason":{_json_str(str(r.reason))},'
            f'"result":{_json_str(r.outcome)}}},"prev":{_json_str(prev)},"request_id":{_json_str(r.request_id)},'
            f'"seq":{int(seq)},"target":{{"account_ref":{_json_str(r.account_ref)},'
            f'"clip_id":{_json_str(r.clip_id)},"principal_id":{_json_str(r.principal_id)}}},'
            f'"time":{_json_str(time)}}}').encode()


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
        self._queue: queue.SimpleQueue[_Pending[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._frontier: tuple[int, dict[int, bytes]] | None = None  # (size, level -> hash)
        self._conn: sa.Connection | None = None  # the writer thread's own connection
        self._last_checkpoint = (-1, 0.0)  # (size, time)
        self.batches = 0  # for metrics and the benchmark
        self.on_record: Callable[[AuditRecord], None] = lambda record: None
        self.on_batch: Callable[[int, float], None] = lambda entries, seconds: None
        self._last_batch_size = 0

    # -- units of work and appends -----------------------------------------
    def run(self, unit: Unit[T], *, timeout_s: float = APPEND_TIMEOUT_S) -> T:
        """Run a unit of work in the writer's next transaction and wait until it is durable."""
        return self._wait(self.submit(unit), timeout_s)

    def submit(self, unit: Unit[T]) -> _Pending[T]:
        self._ensure_started()
        pending: _Pending[T] = _Pending(unit)
        self._queue.put(pending)
        return pending

    @staticmethod
    def _wait(pending: _Pending[T], timeout_s: float) -> T:
        """The outcome is never ambiguous: if the wait times out before the writer took the unit, the
        unit is withdrawn and never runs; once the writer has it, wait for its commit or rollback."""
        try:
            return pending.done.result(timeout=timeout_s)
        except FutureTimeout:
            if pending.done.cancel():
                raise AuditUnavailable("the audit log is too busy to record this action, so it was not "
                                       "performed; retry later") from None
            return pending.done.result()
        except CancelledError:
            raise AuditUnavailable("the audit log stopped before recording this action; retry") from None

    def append(self, record: AuditRecord, *, timeout_s: float = APPEND_TIMEOUT_S) -> int:
        """Append one entry on its own and wait until durable; returns the entry's index."""
        pending = self.submit(lambda tx: tx.audit(record))
        self._wait(pending, timeout_s)
        return pending.first_seq

    def append_async(self, record: AuditRecord) -> Future[None]:
        """Queue one entry without waiting (benchmarks and bulk writers); the future ends when durable."""
        return self.submit(lambda tx: tx.audit(record)).done

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
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=self._every_s)
            except queue.Empty:
                self._maybe_checkpoint(force_time=True)
                continue
            if self._last_batch_size > 1:
                # Concurrent callers are about: give as many as the last batch held the time to enqueue
                # (at most GROUP_COMMIT_WAIT_S), so one fsync serves them all. A fixed sleep cost each
                # 16-caller batch more than half an fsync.
                deadline = time.monotonic() + GROUP_COMMIT_WAIT_S
                while self._queue.qsize() + 1 < self._last_batch_size and time.monotonic() < deadline:
                    time.sleep(GROUP_COMMIT_POLL_S)
            batch: list[_Pending[Any]] = []
            item: _Pending[Any] | None = first
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

    def _commit(self, batch: list[_Pending[Any]]) -> None:
        started = time.perf_counter()
        live = [p for p in batch if p.done.set_running_or_notify_cancel()]  # skip units withdrawn on timeout
        outcomes: list[tuple[_Pending[Any], Tx, Any, BaseException | None]] = []
        while live:
            try:
                outcomes, failed = self._write(live)
            except Exception as exc:
                self._frontier = None
                log.error("audit.commit_failed", units=len(live), exc_type=type(exc).__name__)
                for p in live:
                    p.done.set_exception(AuditUnavailable(
                        "the audit log could not record this action, so it was not performed; retry later"))
                return
            if failed is None:
                break
            # One unit failed (a bug or a lost connection): everything was rolled back; the others
            # are run again without it, so its partial writes never commit.
            bad, exc = failed
            log.warning("unit.failed", exc_type=type(exc).__name__)
            bad.done.set_exception(exc)
            live.remove(bad)
        self.batches += 1
        self.on_batch(sum(len(tx.records) for _, tx, _, _ in outcomes), time.perf_counter() - started)
        for p, tx, value, error in outcomes:
            for record in tx.records:
                self.on_record(record)
            if error is None:
                p.done.set_result(value)
            else:
                p.done.set_exception(error)

    def _sql(self, statement: str) -> str:
        return statement if self._db.is_sqlite else statement.replace("?", "%s")

    def _connection(self) -> sa.Connection:
        if self._conn is None:
            self._conn = self._db.engine.connect()
        return self._conn

    def _write(self, live: list[_Pending[Any]]
               ) -> tuple[list[tuple[_Pending[Any], Tx, Any, BaseException | None]],
                          tuple[_Pending[Any], BaseException] | None]:
        """Run the units and chain their entries in one transaction; returns their outcomes, or the
        unit that failed (then nothing was committed)."""
        with self._db.write_lock():
            conn = self._connection()
            try:
                with conn.begin() as trans:
                    # The writer's own statements go to the DBAPI cursor: through SQLAlchemy each cost
                    # 30-50 us more, as much as a small batch's entries.
                    cursor = conn.connection.cursor()
                    # Lock the head row first: the one place writers of all replicas serialise.
                    cursor.execute("UPDATE audit_head SET size = size WHERE id = 1 RETURNING size, last_hash")
                    size, prev = cursor.fetchone()
                    frontier = self._load_frontier(cursor, size)
                    now = self._clock.now()
                    outcomes: list[tuple[_Pending[Any], Tx, Any, BaseException | None]] = []
                    for p in live:
                        tx = Tx(conn, now)
                        try:
                            outcomes.append((p, tx, p.unit(tx), None))
                        except BaseException as exc:
                            if not tx.is_denial(exc):
                                trans.rollback()
                                return [], (p, exc)
                            outcomes.append((p, tx, None, exc))
                    size = self._chain(cursor, outcomes, size, prev, rfc3339(now), frontier)
                    cursor.close()
                self._db.count_commit()
            except BaseException:
                self._conn = None
                with contextlib.suppress(Exception):
                    conn.invalidate()
                raise
        self._frontier = (size, frontier)
        return outcomes, None

    def _chain(self, cursor: Any, outcomes: list[tuple[_Pending[Any], Tx, Any, BaseException | None]],
               size: int, prev: str, now: str, frontier: dict[int, bytes]) -> int:
        """Number, hash and store the batch's entries and the subtree hashes they complete; returns the
        new size."""
        entry_rows: list[tuple[int, bytes]] = []
        node_rows: list[tuple[int, bytes]] = []
        for p, tx, _, _ in outcomes:
            p.first_seq = size
            for r in tx.records:
                data = entry_bytes(r, seq=size, prev=prev, time=now)
                leaf = leaf_hash(data)
                entry_rows.append((size, data))
                h, idx, level = leaf, size, 0
                while idx & 1:  # a right child: fold in the left sibling from the frontier
                    h = node_hash(frontier.pop(level), h)
                    idx, level = idx >> 1, level + 1
                    node_rows.append((node_key(level, idx), h))
                frontier[level] = h
                prev, size = leaf.hex(), size + 1
        if entry_rows:
            cursor.executemany(self._sql("INSERT INTO audit_entries (seq, entry) VALUES (?, ?)"), entry_rows)
            cursor.executemany(self._sql("INSERT INTO audit_nodes (node_key, hash) VALUES (?, ?)"), node_rows)
            cursor.execute(self._sql("UPDATE audit_head SET size = ?, last_hash = ? WHERE id = 1"), (size, prev))
        return size

    def _load_frontier(self, cursor: Any, size: int) -> dict[int, bytes]:
        if self._frontier is not None and self._frontier[0] == size:
            return dict(self._frontier[1])
        levels = {node_key(level, (size >> level) - 1): level
                  for level in range(1, size.bit_length()) if size >> level & 1}
        frontier: dict[int, bytes] = {}
        if levels:
            marks = ", ".join("?" * len(levels))
            cursor.execute(self._sql(f"SELECT node_key, hash FROM audit_nodes WHERE node_key IN ({marks})"),  # noqa: S608
                           tuple(levels))
            frontier = {levels[k]: bytes(h) for k, h in cursor.fetchall()}
        if size & 1:  # a lone last leaf: its hash is its entry's
            cursor.execute(self._sql("SELECT entry FROM audit_entries WHERE seq = ?"), (size - 1,))
            row = cursor.fetchone()
            if row is not None:
                frontier[0] = leaf_hash(bytes(row[0]))
        if len(frontier) != len(levels) + (size & 1):
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

