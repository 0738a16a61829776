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
the others are committed without it. Each refusal such a unit recorded passes
`admit_denial` first: past a principal's budget it is counted into a denial
summary (clipstore.denials) instead of appended; the rest of the unit commits.

Nothing else runs on the writer thread: checkpoints are proven and signed on
a thread of their own (`audit-signer`), and the signed row rides in the
writer's next transaction.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring as _json_str  # what json.dumps writes for a str
from typing import Any, Generic, TypeVar

import sqlalchemy as sa

from auditlog.access import ACCESS_ACTIONS
from auditlog.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from auditlog.compact import CompactRange
from auditlog.entry import GENESIS_PREV
from auditlog.errors import ProofError, VerificationError
from auditlog.merkle import HASH_BYTES, leaf_hash, root_hash, verify_consistency
from auditlog.note import NoteSigner
from auditlog.tiles import TILE_WIDTH, entries_path, parse_bundle, verify_range
from clipstore.audit.history import HistoryRewritten, RecomputedTree, recompute
from clipstore.audit.reader import AuditReader
from clipstore.clock import Clock, rfc3339
from clipstore.errors import Reason, Unavailable
from clipstore.logs import get_logger
from clipstore.store import Database
from clipstore.store.db import connection
from clipstore.store.plain import dialect_sql
from clipstore.unit import DENIED, AuditRecord, Tx, Unit

MAX_BATCH_ENTRIES = 4096  # bounds one transaction's size and memory
HEAD_QUERY_REFS = 500  # account refs per access-chain head query: inside every driver's parameter limit
MAX_CACHED_HEADS = 65_536  # access-chain heads the writer remembers between batches (then it reads them again)
_ACCOUNT_HEADS_SQL = ("SELECT e.account_ref, e.account_seq, e.leaf FROM audit_account_entries e JOIN "
                      "(SELECT account_ref, max(account_seq) AS head FROM audit_account_entries WHERE account_ref "
                      "IN ({marks}) GROUP BY account_ref) m "
                      "ON e.account_ref = m.account_ref AND e.account_seq = m.head")
READ_BATCH_ENTRIES = 10_000  # bounds memory while reading the stored log back
PUBLISHED_CHECKPOINT = "checkpoint"  # in the tiles location (C2SP tlog-tiles)
APPEND_TIMEOUT_S = 30.0
GROUP_COMMIT_WAIT_S = 0.0003  # short against an fsync; lets concurrent appenders share it
CHECKPOINT_RIDE_S = 0.1  # how long a signed checkpoint waits to ride in a batch of units before it commits alone
log = get_logger("clipstore.audit")


class AuditUnavailable(Unavailable):
    reason = Reason.AUDIT_UNAVAILABLE
    # The unit's COMMIT was sent but never answered: the database may have committed it, and may make it
    # visible only later (a slow link or fsync, a synchronous standby), so "not found now" proves nothing.
    unconfirmed = False


class _IdleConnectionLost(Exception):
    """The writer's connection died while it was idle: its batch's first statement failed, so nothing of the
    batch can have committed."""


class _CommitUnconfirmed(Exception):
    """The batch's COMMIT was sent but its answer never came (the connection dropped): the database may
    have committed it."""


HALTED_MESSAGE = ("the audit log's stored history failed verification, so this action cannot be recorded "
                  "truthfully and was not performed; operators: see the audit.history_rewritten alert")


T = TypeVar("T")


_CLAIMS = threading.Lock()  # the writer taking a batch, against a waiter withdrawing its unit on timeout
_QUEUED, _TAKEN, _WITHDRAWN = 0, 1, 2


class Pending(Generic[T]):
    """A unit of work (or only `records`: `unit` None) queued for the writer; `result()` waits until it is
    durable. The writer settles it by releasing one lock, which the waiter holds blocked: a Future's
    condition, waiter list and notify_all cost the writer a tenth of its time per entry."""

    __slots__ = ("_done", "_error", "_state", "_value", "first_seq", "records", "unit")

    def __init__(self, unit: Unit[T] | None, records: tuple[AuditRecord, ...] = ()) -> None:
        self.unit, self.records = unit, records
        self.first_seq = -1  # the index of its first entry, once written
        self._state = _QUEUED
        self._value: Any = None
        self._error: BaseException | None = None
        self._done = threading.Lock()
        self._done.acquire()  # released by `_settle`

    def result(self, timeout: float | None = None) -> T:
        """The unit's return value once committed (or its exception). The outcome is never ambiguous: if
        `timeout` passes before the writer took the unit, the unit is withdrawn and never runs; once
        the writer has it, this waits for its commit or rollback."""
        if not self._done.acquire(timeout=-1 if timeout is None else timeout):
            with _CLAIMS:
                if self._state == _QUEUED:
                    self._state = _WITHDRAWN
                    raise AuditUnavailable("the audit log is too busy to record this action, so it was not "
                                           "performed; retry later")
            self._done.acquire()
        self._done.release()  # a later call returns at once
        if self._error is None:
            value: T = self._value
            return value
        try:
            raise self._error
        finally:
            # The raise puts this frame, and with it `self` and `self._error`, on the error's own traceback:
            # a cycle only the collector frees, holding every caller frame above, the gRPC call among
            # them, whose HTTP/2 stream counts against max_concurrent_streams until it does (a burst of
            # refused review calls filled the connection's 100 streams: every later call was refused).
            # concurrent.futures.Future.result breaks the same cycle the same way.
            del self

    def wait(self, timeout: float) -> bool:
        """Whether the unit was settled within `timeout`; unlike `result`, never withdraws it."""
        if not self._done.acquire(timeout=timeout):
            return False
        self._done.release()
        return True

    def _settle(self, value: Any, error: BaseException | None) -> None:
        self._value, self._error = value, error
        self._done.release()


def _take(batch: list[Pending[Any]]) -> list[Pending[Any]]:
    """The units of `batch` not withdrawn on timeout, now the writer's: none can be withdrawn any more."""
    with _CLAIMS:
        live = [p for p in batch if p._state == _QUEUED]
        for p in live:
            p._state = _TAKEN
    return live


# A unit's outcome in a batch: the unit, the records it audits, its return value, the denial it raised
_Outcome = tuple[Pending[Any], "Sequence[AuditRecord]", Any, BaseException | None]


def entry_bytes(r: AuditRecord, *, seq: int, prev: str, time: str, account: tuple[int, str] | None = None) -> bytes:
    """`auditlog.entry.make_entry` for one record, written straight in canonical form: keys in sorted
    order, each string as `json.dumps(ensure_ascii=False)` writes it. Dumping a dict with sort_keys
    cost 9x more and was the writer's largest cost per entry; a property test holds the two equal.
    `account`: (account_seq, account_prev) of an entry in its account's access chain (auditlog.access)."""
    if account is None:
        ref = f'"account_ref":{_json_str(r.account_ref)}'
    else:
        ref = (f'"account_prev":{_json_str(account[1])},"account_ref":{_json_str(r.account_ref)},'
               f'"account_seq":{int(account[0])}')
    disguise = f'"disguise":{_json_str(r.disguise)},' if r.disguise is not None else ""
    watermark = f',"watermark":{_json_str(r.watermark)}' if r.watermark is not None else ""
    return (f'{{"action":{_json_str(r.action)},"actor":{{"id":{_json_str(r.actor_id)},'
            f'"role":{_json_str(r.actor_role)}}},"outcome":{{{disguise}"reason":{_json_str(str(r.reason))},'
            f'"result":{_json_str(r.outcome)}{watermark}}},"prev":{_json_str(prev)},'
            f'"request_id":{_json_str(r.request_id)},'
            f'"seq":{int(seq)},"target":{{{ref},'
            f'"clip_id":{_json_str(r.clip_id)},"principal_id":{_json_str(r.principal_id)}}},'
            f'"time":{_json_str(time)}}}').encode()


@dataclass(frozen=True)
class _Signed:
    """The last checkpoint this process signed or, after a start, the newest it verified the stored
    log against; `subtrees` is the compact range of its tree, to extend without re-reading it."""

    size: int
    root: bytes
    note: str  # empty: nothing was signed yet and no checkpoint was there to check against
    last_leaf: bytes
    subtrees: tuple[bytes, ...]


_NOTHING_SIGNED = _Signed(size=0, root=root_hash([]), note="", last_leaf=b"", subtrees=())


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
        self._queue: queue.SimpleQueue[Pending[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Checkpoints are proven and signed on a thread of their own (`_sign_loop`), never on the writer's:
        # signing one took 9-15 ms, and every unit queued meanwhile waited for it.
        self._signer_thread: threading.Thread | None = None
        self._sign_due = threading.Event()
        self._signer_stopping = False
        self._rider: Pending[Any] | None = None  # a checkpoint's row, for the writer's next transaction
        self._rider_lock = threading.Lock()
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        # Starting and stopping the threads, one at a time: an append racing close() restarted them while
        # close() still stopped the old ones (the old signer then never saw its stop, and close() waited
        # for it for ever; two writers took units from one queue, on PostgreSQL over one connection).
        self._lifecycle_lock = threading.Lock()
        self._opened = False
        self._tree = RecomputedTree(self.reader.entries)
        self._heads: tuple[int, dict[str, tuple[int, str]]] | None = None  # access-chain heads at (size)
        self._signed = _NOTHING_SIGNED
        self._sign_lock = threading.Lock()
        self._conn: sa.Connection | None = None  # the writer thread's own connection
        self._last_checkpoint = (-1, 0.0)  # (size, time)
        self.halted: HistoryRewritten | None = None  # set once; nothing is recorded or signed after it
        self.deleted_accounts: set[str] = set()  # account refs with an `account.delete` entry (found by open())
        self.batches = 0  # for metrics and the benchmark
        self.on_record: Callable[[AuditRecord], None] = lambda record: None
        self.on_batch: Callable[[int, float], None] = lambda entries, seconds: None
        self.on_halt: Callable[[HistoryRewritten], None] = lambda exc: None
        # Asked, on this thread and one at a time, for each refusal (outcome DENIED) a refused unit recorded:
        # append its entry (True), or leave it counted into a denial summary (False; clipstore.denials
        # binds it; the caller's answer is the same either way). A port, so this module knows no ledger.
        self.admit_denial: Callable[[AuditRecord], bool] = lambda record: True
        self._batch_entries = 0  # entries the last committed batch appended (refusals counted are not)
        self._last_batch_size = 0
        self._gather = 0  # while the writer gathers a batch: the queue length at which to wake it
        self._gathered = threading.Event()

    # -- units of work and appends -----------------------------------------
    def run(self, unit: Unit[T], *, timeout_s: float = APPEND_TIMEOUT_S) -> T:
        """Run a unit of work in the writer's next transaction and wait until it is durable."""
        return self.submit(unit).result(timeout_s)

    def submit(self, unit: Unit[T]) -> Pending[T]:
        return self._queued(Pending(unit))

    def _queued(self, pending: Pending[T]) -> Pending[T]:
        while True:
            if self._thread is None:
                self._ensure_started()
            if self.halted is not None:
                raise AuditUnavailable(HALTED_MESSAGE)
            if self._enqueue(pending):
                break
        if self._gather and self._queue.qsize() >= self._gather:
            self._gathered.set()
        return pending

    def _enqueue(self, pending: Pending[Any]) -> bool:
        """Queue a unit for the running writer; False if close() has begun. Under `_lock`, where close()
        takes the writer away, so a unit queued here comes before close()'s end mark, never after it
        (where no writer would take it, and its caller waited APPEND_TIMEOUT_S for nothing). The lock
        is uncontended but for callers queueing at the same instant; it holds only the put."""
        with self._lock:
            if self._thread is None:
                return False
            self._queue.put(pending)
            return True

    def append(self, record: AuditRecord, *, timeout_s: float = APPEND_TIMEOUT_S) -> int:
        """Append one entry on its own and wait until durable; returns the entry's index."""
        pending = self.append_async(record)
        pending.result(timeout_s)
        return pending.first_seq

    def append_async(self, record: AuditRecord) -> Pending[None]:
        """Queue one entry without waiting (benchmarks and bulk writers); `result()` returns once durable."""
        return self._queued(Pending(None, (record,)))

    def _ensure_started(self) -> None:
        self.open()
        if self._thread is not None:  # the common case, without the lifecycle lock
            return
        with self._lifecycle_lock, self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-sequencer", daemon=True)
                self._thread.start()
                self._signer_stopping = False
                self._signer_thread = threading.Thread(target=self._sign_loop, name="audit-signer", daemon=True)
                self._signer_thread.start()

    def close(self) -> None:
        """Stop the signer, flush pending appends, stop the sequencer, write a final checkpoint. An append
        meanwhile waits for it to finish (then starts the threads anew)."""
        with self._lifecycle_lock:
            self._close()

    def _close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            signer, self._signer_thread = self._signer_thread, None
        if signer is not None:  # first: a checkpoint it is storing needs the sequencer
            with self._rider_lock:
                self._signer_stopping = True
                rider, self._rider = self._rider, None
            if rider is not None:  # no batch will come for it to ride in
                self._queue.put(rider)
            self._sign_due.set()
            signer.join()
        if thread is not None:
            self._queue.put(None)
            thread.join()
            self._maybe_checkpoint(force_time=True)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if self._last_batch_size > 1:
                self._gather_batch(self._last_batch_size - 1)
            batch: list[Pending[Any]] = []
            item: Pending[Any] | None = first
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
            self._last_batch_size = len(batch)
            with self._rider_lock:
                rider, self._rider = self._rider, None
            if rider is not None:
                batch.append(rider)
            if batch:
                self._commit(batch)
            if self._checkpoint_due(force_time=False):
                self._sign_due.set()

    def _gather_batch(self, more: int) -> None:
        """Concurrent callers are about: give as many as the last batch held the time to enqueue (at most
        GROUP_COMMIT_WAIT_S), so one fsync serves them all. The caller that completes the count wakes the
        writer (`_queued`): polling with sleeps woke it up to a poll interval late, each time."""
        if self._queue.qsize() >= more:
            return
        self._gather = more
        self._gathered.clear()
        if self._queue.qsize() < more:  # a unit queued before `_gather` was set woke nobody
            self._gathered.wait(GROUP_COMMIT_WAIT_S)
        self._gather = 0

    def _commit(self, batch: list[Pending[Any]]) -> None:
        started = time.perf_counter()
        live = _take(batch)
        outcomes: list[_Outcome] = []
        while live:
            if self.halted is not None:
                for p in live:
                    p._settle(None, AuditUnavailable(HALTED_MESSAGE))
                return
            try:
                outcomes, failed = self._write(live)
            except HistoryRewritten as exc:
                self._halt(exc)
                continue  # every unit fails as halted, above
            except Exception as exc:
                unconfirmed = isinstance(exc, _CommitUnconfirmed)
                log.error("audit.commit_failed", units=len(live), unconfirmed=unconfirmed,
                          exc_type=type(exc.__cause__ if unconfirmed else exc).__name__)
                for p in live:
                    lost = AuditUnavailable(
                        "the database did not confirm the commit: the action may or may not have been performed "
                        "and recorded; read its state, or retry (an idempotent retry is safe)" if unconfirmed else
                        "the audit log could not record this action, so it was not performed; retry later")
                    lost.unconfirmed = unconfirmed
                    p._settle(None, lost)
                return
            if failed is None:
                break
            # One unit failed (a bug or a lost connection): everything was rolled back; the others
            # are run again without it, so its partial writes never commit.
            bad, failure = failed
            log.warning("unit.failed", exc_type=type(failure).__name__)
            bad._settle(None, failure)
            live.remove(bad)
        self.batches += 1
        self.on_batch(self._batch_entries, time.perf_counter() - started)
        for p, records, value, error in outcomes:
            for record in records:  # every record a unit made, a refusal counted rather than appended too
                self.on_record(record)
            p._settle(value, error)

    def _sql(self, statement: str) -> str:
        return dialect_sql(statement, postgresql=not self._db.is_sqlite)

    def _connection(self) -> sa.Connection:
        if self._conn is None:
            self._conn = self._db.engine.connect()
        return self._conn

    def _write(self, live: list[Pending[Any]]
               ) -> tuple[list[_Outcome], tuple[Pending[Any], BaseException] | None]:
        """Run the units and chain their entries in one transaction; returns their outcomes, or the
        unit that failed (then nothing was committed).

        The writer keeps its connection between batches, so a database that restarted, or a network
        that dropped it, while the writer was idle leaves it a dead one: its first statement fails, no
        unit has run and nothing of the batch can have committed. Then the batch runs once more on a new
        connection, rather than failing every unit in it (AUDIT_UNAVAILABLE) after the database is back.
        A connection lost later in a batch is not retried: its commit may or may not have happened."""
        with self._db.write_lock():
            try:
                return self._write_batch(live)
            except _IdleConnectionLost:
                log.info("audit.reconnected")
                return self._write_batch(live, retried=True)

    def _write_batch(self, live: list[Pending[Any]], *, retried: bool = False
                     ) -> tuple[list[_Outcome], tuple[Pending[Any], BaseException] | None]:
        conn = self._connection()
        idle_lost = False  # the batch's first statement found the connection dead: no unit ran, nothing committed
        committing = False  # the COMMIT is on its way: a failure now leaves the outcome unknown
        try:
            with conn.begin() as trans:
                # The writer's own statements go to the DBAPI cursor: through SQLAlchemy each cost
                # 30-50 us more, as much as a small batch's entries.
                cursor = conn.connection.cursor()
                # Lock the head row first: the one place writers of all replicas serialise.
                try:
                    cursor.execute("UPDATE audit_head SET size = size WHERE id = 1 RETURNING size, last_hash")
                except conn.dialect.loaded_dbapi.Error as exc:
                    idle_lost = not retried and conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection,
                                                                           cursor)
                    raise
                head = cursor.fetchone()
                assert head is not None, "audit_head row 1 is missing"
                size, prev = head
                self._follow(cursor, size, prev)
                # The access chains' heads this process moved last; only while no other replica appended.
                heads = self._heads[1] if self._heads and self._heads[0] == size else {}
                self._heads = None  # until this batch commits
                now = self._clock.now()
                outcomes: list[_Outcome] = []
                for p in live:
                    if p.unit is None:  # one record: no unit to run
                        outcomes.append((p, p.records, None, None))
                        continue
                    tx = Tx(conn, now)
                    try:
                        outcomes.append((p, tx.records, p.unit(tx), None))
                    except BaseException as exc:
                        if not tx.is_denial(exc):
                            trans.rollback()
                            return [], (p, exc)
                        # A refusal is an outcome, not a fault: its traceback held this frame, and through
                        # `outcomes` itself, a cycle that kept the caller's gRPC call alive until the collector ran
                        outcomes.append((p, tx.records, None, exc.with_traceback(None)))
                leaves = self._chain(cursor, self._admitted(outcomes), size, prev, rfc3339(now), heads)
                cursor.close()
                committing = True  # leaving the block commits
            self._db.count_commit()
        except BaseException as exc:
            self._conn = None
            with contextlib.suppress(Exception):
                conn.invalidate()
            if idle_lost:
                raise _IdleConnectionLost from None
            if committing and isinstance(exc, Exception) and not isinstance(exc, HistoryRewritten):
                raise _CommitUnconfirmed from exc
            raise
        self._tree.append(leaves)
        self._heads = (size + len(leaves), heads if len(heads) <= MAX_CACHED_HEADS else {})
        self._batch_entries = len(leaves)
        return outcomes, None

    def _admitted(self, outcomes: list[_Outcome]) -> list[_Outcome]:
        """The outcomes with the records to append: of a refused unit, the refusals `admit_denial` turns down
        are left out (counted into a summary); its other records, like its state change, commit as ever.
        Asked only once every unit of the batch ran, so a batch run again without a failed unit asks
        nothing twice."""
        admitted: list[_Outcome] = []
        for p, records, value, error in outcomes:
            if error is not None:  # only a refused unit (`tx.deny`) records a refusal
                records = [r for r in records if r.outcome != DENIED or self.admit_denial(r)]
            admitted.append((p, records, value, error))
        return admitted

    def _follow(self, cursor: Any, size: int, last_hash: str) -> None:
        """The stored head must extend what this process holds: entries other replicas appended since
        are read back and recomputed; fewer entries, or another last entry, is a rewritten history."""
        tree = self._tree
        if size < tree.size:
            raise HistoryRewritten("shrink", f"the stored log has {size} entries; this process has seen {tree.size}")
        while tree.size < size:
            stop = min(size, tree.size + READ_BATCH_ENTRIES)
            cursor.execute(self._sql("SELECT entry FROM audit_entries WHERE seq >= ? AND seq < ? ORDER BY seq"),
                           (tree.size, stop))
            batch = [bytes(e) for (e,) in cursor.fetchall()]
            if len(batch) != stop - tree.size:
                raise HistoryRewritten("mismatch", f"audit_head counts {size} entries; entries below it are missing")
            tree.append(recompute(batch, tree.size, tree.last_leaf))
        if size and tree.last_leaf.hex() != last_hash:
            raise HistoryRewritten("fork", "the stored log's last entry is not the one this process wrote or read")

    def _chain(self, cursor: Any, outcomes: list[_Outcome],
               size: int, prev: str, now: str, heads: dict[str, tuple[int, str]]) -> list[bytes]:
        """Number, hash and store the batch's entries; returns their leaf hashes. `heads`: account_ref ->
        its access chain's head (account_seq, hex hash) as far as known, moved as the batch chains entries;
        the heads of the batch's other accounts are read here."""
        rows: list[tuple[bytes, bytes]] = []
        heads.update(self._account_heads(cursor, {r.account_ref for _, records, _, _ in outcomes for r in records
                                                  if r.account_ref and r.action in ACCESS_ACTIONS
                                                  and r.account_ref not in heads}))
        chained: list[tuple[str, int, int, str, bytes]] = []  # audit_account_entries rows
        for p, records, _, _ in outcomes:
            p.first_seq = size + len(rows)
            for r in records:
                account = None
                if r.account_ref and r.action in ACCESS_ACTIONS:
                    seq, head = heads[r.account_ref]
                    account = (seq + 1, head)
                data = entry_bytes(r, seq=size + len(rows), prev=prev, time=now, account=account)
                leaf = leaf_hash(data)
                rows.append((data, leaf))
                prev = leaf.hex()
                if account is not None:
                    heads[r.account_ref] = (account[0], prev)
                    chained.append((r.account_ref, account[0], size + len(rows) - 1, now, leaf))
        self._store(cursor, size, rows, chained)
        return [leaf for _, leaf in rows]

    def _account_heads(self, cursor: Any, refs: set[str]) -> dict[str, tuple[int, str]]:
        """(account_seq, hex hash) of each account's newest chained entry; (0, zeros) before its first. Read
        under the audit_head lock, so no other writer moves them meanwhile; one query per HEAD_QUERY_REFS."""
        heads = dict.fromkeys(refs, (0, GENESIS_PREV))
        ordered = sorted(refs)
        for start in range(0, len(ordered), HEAD_QUERY_REFS):
            chunk = ordered[start:start + HEAD_QUERY_REFS]
            marks = ", ".join("?" * len(chunk))  # placeholders only: the refs are bound values
            cursor.execute(self._sql(_ACCOUNT_HEADS_SQL.replace("{marks}", marks)), chunk)
            heads.update((ref, (int(seq), bytes(leaf).hex())) for ref, seq, leaf in cursor.fetchall())
        return heads

    def _store(self, cursor: Any, size: int, rows: list[tuple[bytes, bytes]],
               account_rows: list[tuple[str, int, int, str, bytes]] | None = None) -> None:
        """Insert entries [size, size + n) (given with their leaf hashes), the tiles they fill or grow (for
        the proofs served to clients, never for signing), the access-chain index rows (`account_rows`;
        None: read from the entries, as for entries restored from the tiles) and the new head."""
        if not rows:
            return
        entry_rows = list(enumerate([data for data, _ in rows], size))
        if account_rows is None:  # an access chain's entries: index them for access reports
            account_rows = []
            for seq, (data, leaf) in enumerate(rows, size):
                if b'"account_seq":' in data:
                    entry = json.loads(data)
                    account_rows.append((entry["target"]["account_ref"], entry["target"]["account_seq"], seq,
                                         entry["time"], leaf))
        cursor.executemany(self._sql("INSERT INTO audit_entries (seq, entry) VALUES (?, ?)"), entry_rows)
        if tiles := self._tree.tiles([leaf for _, leaf in rows]):
            cursor.executemany(self._sql("INSERT INTO audit_tiles (level, idx, hashes, nodes) VALUES (?, ?, ?, ?) "
                                         "ON CONFLICT (level, idx) DO UPDATE SET hashes = excluded.hashes, "
                                         "nodes = excluded.nodes"), tiles)
        if account_rows:
            cursor.executemany(self._sql("INSERT INTO audit_account_entries (account_ref, account_seq, seq, time, "
                                         "leaf) VALUES (?, ?, ?, ?, ?)"), account_rows)
        cursor.execute(self._sql("UPDATE audit_head SET size = ?, last_hash = ? WHERE id = 1"),
                       (size + len(rows), rows[-1][1].hex()))

    # -- halting -------------------------------------------------------------
    def _halt(self, exc: HistoryRewritten) -> None:
        """Stop signing and recording for good: an action recorded on a rewritten history would be
        recorded in a log nobody can verify. A restart verifies the stored log again."""
        with self._lock:
            if self.halted is not None:
                return
            self.halted = exc
        log.critical("audit.history_rewritten", kind=exc.kind, detail=exc.detail)
        self.on_halt(exc)

    # -- start-up: the stored log against what was published ------------------
    def open(self, published: Callable[[str], bytes] | None = None) -> None:
        """Recompute the whole stored log once, before the first append, and check it against the
        checkpoint last published outside the database (`published` reads the tiles location) and the
        newest one stored. A database restored from a backup lacks what was published after it: those
        entries are copied back from the tiles (verified first), so the log never rolls back.

        A failure halts the log rather than raising: the service starts, reports audit NOT_SERVING and
        refuses every action it would have to record."""
        with self._open_lock:
            if self._opened:
                return
            try:
                self._recover(published)
            except HistoryRewritten as exc:
                self._halt(exc)
            self._opened = True

    def _anchor(self, note: str, where: str) -> tuple[str, Checkpoint, str]:
        try:
            return where, open_checkpoint(note, self.signer.verifier), note
        except VerificationError as exc:
            raise HistoryRewritten("mismatch", f"the {where} checkpoint does not verify under this log's key: "
                                               f"{exc}") from None

    def _recover(self, published: Callable[[str], bytes] | None) -> None:
        anchors = []
        if published is not None:
            with contextlib.suppress(FileNotFoundError):
                anchors.append(self._anchor(published(PUBLISHED_CHECKPOINT).decode(errors="replace"), "published"))
        stored = self.reader.latest_checkpoint()
        if stored is not None:
            anchors.append(self._anchor(stored[1], "stored"))
        size, last_hash = self.reader.head()
        self._extend(self.reader.entries, size, anchors)
        if size and self._tree.last_leaf.hex() != last_hash:
            raise HistoryRewritten("mismatch", "audit_head names a last entry that is not the stored one")
        beyond = max((cp.size for _, cp, _ in anchors), default=0)
        if beyond > size:
            top = next((cp for where, cp, _ in anchors if where == "published"), None)
            if published is None or top is None or top.size < beyond:
                raise HistoryRewritten("shrink", f"the stored log has {size} entries; a signed checkpoint covers "
                                                 f"{beyond}")
            self._restore(published, top, anchors)
        if self._signed.size < self._tree.size and not self._signed.note and not anchors:
            # Nothing signed to check against (a new log, or checkpoints deleted with no tiles
            # configured): what is stored is the base the next checkpoint must extend.
            size, root, last = self._tree.head()
            self._signed = _Signed(size=size, root=root, note="", last_leaf=last,
                                   subtrees=tuple(self._tree.subtrees(size)))

    def _extend(self, read: Callable[[int, int], list[bytes]], target: int,
                anchors: list[tuple[str, Checkpoint, str]], *, store: bool = False) -> None:
        """Recompute entries up to `target` from `read`, in batches; at each anchor's size the root must
        be the one signed. With `store`, the entries are also written to the database (a restore)."""
        tree = self._tree
        stops = sorted({cp.size for _, cp, _ in anchors if tree.size < cp.size < target} | {target})
        for stop in stops:
            while tree.size < stop:
                start = tree.size
                batch = read(start, min(READ_BATCH_ENTRIES, stop - start))
                if not batch:
                    raise HistoryRewritten("shrink", f"the stored log ends at {start} entries; {stop} were expected")
                leaves = recompute(batch, start, tree.last_leaf)
                self._note_deletions(batch)
                if store:
                    self._store_restored(start, list(zip(batch, leaves, strict=True)))
                tree.append(leaves)
            for where, cp, note in anchors:
                if cp.size != stop:
                    continue
                root = tree.root(stop)
                if root != cp.root:
                    raise HistoryRewritten("fork", f"the first {stop} stored entries are not those the {where} "
                                                   "checkpoint signed")
                if stop >= self._signed.size:
                    self._signed = _Signed(size=stop, root=root, note=note, last_leaf=tree.last_leaf,
                                           subtrees=tuple(tree.subtrees(stop)))

    def _restore(self, published: Callable[[str], bytes], top: Checkpoint,
                 anchors: list[tuple[str, Checkpoint, str]]) -> None:
        """Copy the published entries the database lacks back into it, after checking them against the
        published tiles and checkpoint (and that the published tree starts with the stored one)."""
        size = self._tree.size
        try:
            verify_range(published, old_size=size, old_root=self._tree.root(size), old_last_leaf=self._tree.last_leaf,
                         size=top.size, root=top.root)
        except VerificationError as exc:
            raise HistoryRewritten("fork", f"the published log does not extend the stored one: {exc}") from None
        self._extend(_bundle_reader(published, top.size), top.size, anchors, store=True)
        self._heads = None
        log.warning("audit.restored_from_published", entries=top.size - size, size=top.size)

    def _store_restored(self, start: int, rows: list[tuple[bytes, bytes]]) -> None:
        with self._db.write_lock(), self._db.engine.begin() as conn:
            cursor = conn.connection.cursor()
            cursor.execute("UPDATE audit_head SET size = size WHERE id = 1 RETURNING size, last_hash")
            head = cursor.fetchone()
            assert head is not None, "audit_head row 1 is missing"
            size, prev = head
            if size != start or (size and prev != self._tree.last_leaf.hex()):
                raise HistoryRewritten("mismatch", "the stored log changed while published entries were restored")
            self._store(cursor, start, rows)
            cursor.close()
        self._db.count_commit()

    def _note_deletions(self, batch: list[bytes]) -> None:
        """Remember the accounts the log says were deleted: a restored database may still hold their keys."""
        for data in batch:
            if data.startswith(b'{"action":"account.delete","actor":'):
                entry = json.loads(data)
                if entry["outcome"]["result"] == "ok" and entry["target"].get("account_ref"):
                    self.deleted_accounts.add(entry["target"]["account_ref"])

    # -- checkpoints -------------------------------------------------------
    def _sign_loop(self) -> None:
        """The signer thread: a checkpoint when the writer says one is due (`_sign_due`); after
        `checkpoint_every_s` without, a check of the stored head and a checkpoint of what is unsigned."""
        while True:
            idle = not self._sign_due.wait(timeout=self._every_s)
            if self._signer_stopping:
                return
            self._sign_due.clear()
            if idle:
                self._watch()
            self._maybe_checkpoint(force_time=idle)

    def _checkpoint_due(self, *, force_time: bool) -> bool:
        size = self._tree.size
        last_size, last_time = self._last_checkpoint
        if self.halted is not None or size == last_size or size == self._signed.size and self._signed.note:
            return False
        return size - max(last_size, 0) >= self._every_entries or \
            self._clock.now() - last_time >= self._every_s or force_time

    def _maybe_checkpoint(self, *, force_time: bool) -> None:
        if self._checkpoint_due(force_time=force_time):
            try:
                self.checkpoint()
            except Exception as exc:  # the next batch or tick retries
                log.error("audit.checkpoint_failed", exc_type=type(exc).__name__)

    def checkpoint(self) -> tuple[int, str]:
        """Sign and store a checkpoint for the log as this process holds it now; returns (size, note).

        Signs only a tree proven to extend the last checkpoint this process signed (after a start: the
        newest it verified, see `open`): the entries after it are read back from the database and
        hashed again; they must chain onto it and give the root this process computed while writing
        and reading them, and the consistency proof from the old tree to the new one (what witnesses
        are sent) must verify. Anything else halts the log: nothing is signed."""
        self.open()
        with self._sign_lock:
            if self.halted is not None:
                raise AuditUnavailable(HALTED_MESSAGE)
            size, root, last_leaf = self._tree.head()
            signed = self._signed
            try:
                self._check_head(size, last_leaf)
                if size == signed.size and signed.note:
                    return size, signed.note
                subtrees = self._prove(signed, size, root)
            except HistoryRewritten as exc:
                self._halt(exc)
                raise AuditUnavailable(HALTED_MESSAGE) from None
            note = sign_checkpoint(Checkpoint(origin=self.signer.name, size=size, root=root), self.signer)
            now = self._clock.now()
            try:
                self._store_checkpoint(size, root, note, now)
            except HistoryRewritten as exc:
                self._halt(exc)
                raise AuditUnavailable(HALTED_MESSAGE) from None
            self._signed = _Signed(size=size, root=root, note=note, last_leaf=last_leaf, subtrees=tuple(subtrees))
            self._last_checkpoint = (size, now)
            return size, note

    def _store_checkpoint(self, size: int, root: bytes, note: str, now: float) -> None:
        """Store a signed checkpoint: in a transaction of the writer's, when it runs (from the signer thread,
        riding in the writer's next batch of units, so it costs no commit of its own while units flow);
        else in a transaction of its own."""
        def insert(conn: sa.Connection) -> None:
            inserted = conn.exec_driver_sql(self._sql(
                "INSERT INTO audit_checkpoints (size, root, note, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (size) DO NOTHING"), (size, root, note, now)).rowcount
            if not inserted:  # another replica signed this size first: the same tree, or a fork
                stored = conn.exec_driver_sql(self._sql("SELECT root FROM audit_checkpoints WHERE size = ?"),
                                              (size,)).scalar()
                if stored is None or bytes(stored) != root:
                    raise HistoryRewritten("fork", f"a stored checkpoint of size {size} has another root")

        def alone() -> None:
            with self._db.transaction() as conn:
                insert(conn)

        writer = self._thread
        if writer is None or writer is threading.current_thread() or not writer.is_alive():
            return alone()
        pending: Pending[None] = Pending(lambda tx: insert(connection(tx)))
        if threading.current_thread() is self._signer_thread:
            with self._rider_lock:
                if self._signer_stopping:
                    self._queue.put(pending)
                else:
                    self._rider = pending
            if not pending.wait(CHECKPOINT_RIDE_S):
                with self._rider_lock:  # no batch came: commit alone
                    if self._rider is pending:
                        self._rider = None
                        self._queue.put(pending)
        elif not self._enqueue(pending):  # the writer is stopping
            return alone()
        pending.result(APPEND_TIMEOUT_S)

    def _check_head(self, size: int, last_leaf: bytes) -> None:
        """The stored head must still extend the tree of `size` this process holds (read before it)."""
        stored, last_hash = self.reader.head()
        if stored < size:
            raise HistoryRewritten("shrink", f"the stored log has {stored} entries; this process has seen {size}")
        if stored == size and size and last_hash != last_leaf.hex():
            raise HistoryRewritten("fork", "the stored log's last entry is not the one this process wrote or read")

    def _watch(self) -> None:
        """While idle: a rewrite of the stored log halts the log now, not at the next action."""
        if self.halted is not None:
            return
        try:
            self._check_head(self._tree.size, self._tree.last_leaf)
        except HistoryRewritten as exc:
            self._halt(exc)
        except Exception as exc:  # the database is away: the next action finds out and says so
            log.warning("audit.watch_failed", exc_type=type(exc).__name__)

    def _prove(self, signed: _Signed, size: int, root: bytes) -> list[bytes]:
        """Read entries [signed.size, size) back and recompute them: while their leaf hashes are still in
        this process's memory, they must be those; else they must give the signed tree extended to `root`.
        Returns the new tree's compact range. Raises `HistoryRewritten` unless it is the tree this process
        holds, and that tree extends the signed one (the consistency proof witnesses are sent)."""
        held = self._tree.leaves(signed.size, size)
        tree = CompactRange.resume(signed.size, list(signed.subtrees)) if held is None else None
        at, last = signed.size, signed.last_leaf
        while at < size:
            batch = self.reader.entries(at, min(READ_BATCH_ENTRIES, size - at))
            if not batch:
                raise HistoryRewritten("shrink", f"the stored log ends at {at} entries; this process wrote "
                                                 f"or read {size}")
            leaves = recompute(batch, at, last)
            if tree is not None:
                for leaf in leaves:
                    tree.append(leaf)
            elif held is not None and b"".join(leaves) != held[(at - signed.size) * HASH_BYTES:
                                                              (at - signed.size + len(leaves)) * HASH_BYTES]:
                raise HistoryRewritten("fork", f"stored entries {at}..{at + len(leaves) - 1} no longer hash to "
                                               "what this process wrote and read")
            at, last = at + len(leaves), leaves[-1]
        if tree is not None and tree.root() != root:
            raise HistoryRewritten("fork", f"stored entries {signed.size}..{size - 1} no longer hash to what this "
                                           "process wrote and read")
        if 0 < signed.size < size:
            try:
                verify_consistency(signed.size, size, signed.root, root,
                                   self._tree.consistency_proof(signed.size, size))
            except ProofError as exc:
                raise HistoryRewritten("fork", f"no consistency proof from {signed.size} to {size}: {exc}") from None
        return tree.subtrees if tree is not None else self._tree.subtrees(size)

    def consistency_proof(self, old_size: int, size: int) -> list[bytes]:
        """PROOF(old_size, size) from hashes this process recomputed: what witnesses are sent."""
        if size > self._tree.size:
            self.run(lambda tx: None)  # an empty unit reads back what other replicas appended
        try:
            return self._tree.consistency_proof(old_size, size)
        except HistoryRewritten as exc:
            self._halt(exc)
            raise AuditUnavailable(HALTED_MESSAGE) from None


def _bundle_reader(read: Callable[[str], bytes], size: int) -> Callable[[int, int], list[bytes]]:
    """Entries [start, start + n) of a published log of `size` entries, from its entry bundles."""
    def entries(start: int, n: int) -> list[bytes]:
        out: list[bytes] = []
        while n > len(out) and start + len(out) < size:
            pos = start + len(out)
            block, width = pos // TILE_WIDTH, min(TILE_WIDTH, size - pos // TILE_WIDTH * TILE_WIDTH)
            path = entries_path(block, width)
            try:
                data = read(path)
            except FileNotFoundError:  # the spec's fallback: a partial bundle may be gone once the full one exists
                data = read(entries_path(block))
            bundle = parse_bundle(data, path)[:width]
            out.extend(bundle[pos - block * TILE_WIDTH:][:n - len(out)])
        return out
    return entries
