"""Audit log benchmark (not a test): prints a table, then `name=value` figures.

  python bench/auditlog.py [--entries 200000] [--seconds 2] [--rounds 3]

Measured in one run on SQLite (synchronous=FULL, so every commit is durable), with
the heap frozen after start-up as `clipstore serve` freezes it:
  1. durable appends/s in flight: 16 threads each keeping 32 `append_async` outstanding
     (as a busy server's RPC threads do); goal ≥ 40,000/s on this 2-core machine
  2. durable appends/s blocking: 16 threads calling `append` (one in flight each);
     goal ≥ 12,000/s; and the same through a writer that commits one entry per
     transaction (the baseline of the group-commit speedup). No commit beats an fsync,
     so blocking appenders get at most 16 entries per fsync: the fsync time, measured
     in the same rounds, gives that ceiling (`audit_blocking_vs_fsync_ceiling`, ≤ 1).
     Rounds of 1 and 2 alternate, each on a fresh log; figures are medians.
  3. `auditlog` verify rate over an export of --entries entries, and from C2SP tiles
     (all of it; then 1,000 new entries with --state)
  4. inclusion-proof time from the stored tiles (audit_tiles) at --entries entries
  5. the signer's own checks on that stored log: start-up (every entry read back and hashed once),
     and one checkpoint over 1,000 new entries (read back, hashed, consistency proof, signed)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from auditlog.checkpoint import Checkpoint, sign_checkpoint  # noqa: E402
from auditlog.entry import GENESIS_PREV, entry_hash, make_entry  # noqa: E402
from auditlog.merkle import leaf_hash, root_hash, verify_inclusion  # noqa: E402
from auditlog.note import NoteSigner  # noqa: E402
from auditlog.sources import open_source  # noqa: E402
from auditlog.tiles import TileWriter, tree_root  # noqa: E402
from auditlog.verify import TileState, verify_log, verify_tiles  # noqa: E402
from clipstore.audit import AuditLog
from clipstore.audit.log import MAX_BATCH_ENTRIES  # noqa: E402
from clipstore.audit.signing import load_or_create_signer  # noqa: E402
from clipstore.clock import SystemClock  # noqa: E402
from clipstore.config import default  # noqa: E402
from clipstore.server import freeze_heap  # noqa: E402
from clipstore.store import Database  # noqa: E402
from clipstore.unit import AuditRecord
from kms import LocalKms  # noqa: E402

APPENDERS = 16
PIPELINED_IN_FLIGHT = 32
RECORD = AuditRecord(actor_id="p_0123456789abcdef", actor_role="reviewer", action="clip.fetch",
                     clip_id="c_0123456789abcdef0123", account_ref="acct_0123456789abcdef", request_id="r" * 32)


def _audit_log(directory: Path, max_batch: int, *, signing: bool = True) -> AuditLog:
    """With `signing`, the service's own checkpoint cadence: the writer reads back, checks and signs every
    1,000 entries as it appends (part of the append rates measured); without, only when asked to."""
    db = Database(f"sqlite:///{directory / 'bench.db'}")
    root = LocalKms.from_file(directory / "root.key")
    signer = load_or_create_signer(db, root)
    every = default("audit.checkpoint_every_entries") if signing else 10**9
    return AuditLog(db, signer, SystemClock(), checkpoint_every_entries=every,
                    checkpoint_every_s=default("audit.checkpoint_every_s"), max_batch_entries=max_batch)


def _drive(log: AuditLog, seconds: float, append: Callable[[], None]) -> float:
    """16 appender threads calling `append` for `seconds`; appends/s."""
    log.append(RECORD)  # warm up: thread, connection, schema
    freeze_heap()
    stop = time.monotonic() + seconds
    counts = [0] * APPENDERS

    def appender(i: int) -> None:
        while time.monotonic() < stop:
            append()
            counts[i] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=appender, args=(i,)) for i in range(APPENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - start)


def appends_per_s(seconds: float, *, in_flight: int = 1, max_batch: int = MAX_BATCH_ENTRIES) -> tuple[float, float]:
    """Appends/s of 16 threads each with `in_flight` appends outstanding (1: blocking `append`);
    also the mean entries per commit."""
    with tempfile.TemporaryDirectory() as tmp:
        log = _audit_log(Path(tmp), max_batch)

        def pipelined() -> None:
            for future in [log.append_async(RECORD) for _ in range(in_flight)]:
                future.result()

        rate = _drive(log, seconds, (lambda: log.append(RECORD)) if in_flight == 1 else pipelined)
        rate *= in_flight
        per_commit = log.reader.size() / max(log.batches, 1)
        log.close()
        return rate, per_commit


def fsync_s(samples: int = 50) -> float:
    """Median time of one fsync of a small commit's worth of WAL (24 KiB) in the benchmark's temp dir:
    no durable commit is faster, so 16 blocking appenders cannot exceed 16 entries per fsync."""
    times = []
    with tempfile.TemporaryFile() as fh:
        for _ in range(samples):
            fh.write(b"\0" * 24576)
            fh.flush()
            start = time.perf_counter()
            os.fsync(fh.fileno())
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _entries(n: int) -> list[bytes]:
    entries, prev = [], GENESIS_PREV
    for i in range(n):
        data = make_entry(seq=i, prev=prev, time="2026-11-26T05:00:00.000Z",
                          actor={"id": "p_0123456789abcdef", "role": "reviewer"}, action="clip.fetch",
                          target={"clip_id": f"c_{i:020d}", "account_ref": "acct_0123456789abcdef",
                                  "principal_id": ""},
                          outcome={"result": "ok", "reason": ""}, request_id="r" * 32)
        entries.append(data)
        prev = entry_hash(data)
    return entries


def verify_rate(n: int, entries: list[bytes]) -> float:
    signer = NoteSigner.generate("clipstore-audit/bench")
    note = sign_checkpoint(Checkpoint(origin=signer.name, size=n, root=root_hash([leaf_hash(e) for e in entries])),
                           signer)
    start = time.perf_counter()
    result = verify_log(lambda: entries, note, signer.verifier)
    elapsed = time.perf_counter() - start
    assert result.size == n
    return n / elapsed


def _publish(directory: Path, writer: TileWriter, entries: list[bytes], signer: NoteSigner) -> None:
    for path, data in writer.append(entries[writer.size:]) + writer.flush():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_bytes(data)
    root = root_hash([leaf_hash(e) for e in entries]) if len(entries) < 2 else None
    tree = root if root is not None else tree_root(lambda p: (directory / p).read_bytes(), len(entries))
    note = sign_checkpoint(Checkpoint(origin=signer.name, size=len(entries), root=tree), signer)
    (directory / "checkpoint").write_text(note)


def tiles_rates(entries: list[bytes], new: int = 1000) -> tuple[float, float]:
    """Entries/s verifying all of a tiled log from scratch; ms to verify `new` more with --state."""
    signer = NoteSigner.generate("clipstore-audit/bench")
    with tempfile.TemporaryDirectory() as tmp:
        directory, writer = Path(tmp), TileWriter()
        _publish(directory, writer, entries[:-new], signer)
        read = open_source(tmp)
        start = time.perf_counter()
        full = verify_tiles(read, signer.verifier)
        rate = full.size / (time.perf_counter() - start)
        state = TileState(origin=signer.name, size=full.size, root=full.root, last_leaf=full.last_leaf, note=full.note,
                          chains=full.chains)
        _publish(directory, writer, entries, signer)
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            result = verify_tiles(read, signer.verifier, state=state)
            samples.append((time.perf_counter() - start) * 1000)
        assert result.size == len(entries) and result.old_size == len(entries) - new
        return rate, statistics.median(samples)


def proof_and_signer_costs(n: int, new: int = 1000) -> tuple[float, float, float]:
    """Median inclusion-proof ms; start-up verification entries/s; median ms of a checkpoint over `new`
    entries."""
    with tempfile.TemporaryDirectory() as tmp:
        log = _audit_log(Path(tmp), MAX_BATCH_ENTRIES, signing=False)
        futures = [log.append_async(RECORD) for _ in range(n)]
        futures[-1].result(timeout=3600)
        reader = log.reader
        root = reader.root(n)
        samples = []
        for index in range(0, n, max(n // 200, 1)):
            start = time.perf_counter()
            proof = reader.inclusion_proof(index, n)
            leaf = reader.leaf_hash(index)
            samples.append((time.perf_counter() - start) * 1000)
            verify_inclusion(leaf, index, n, proof, root)
        log.close()
        log = _audit_log(Path(tmp), MAX_BATCH_ENTRIES, signing=False)
        start = time.perf_counter()
        log.open()
        startup = n / (time.perf_counter() - start)
        assert log.halted is None
        log.checkpoint()
        checkpoint = []
        for _ in range(5):
            futures = [log.append_async(RECORD) for _ in range(new)]
            futures[-1].result(timeout=600)
            start = time.perf_counter()
            log.checkpoint()
            checkpoint.append((time.perf_counter() - start) * 1000)
        log.close()
        return statistics.median(samples), startup, statistics.median(checkpoint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=2.0, help="per round and mode")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {"pipelined": [], "blocking": [], "single": []}
    fsyncs = []
    for _ in range(args.rounds):
        runs["pipelined"].append(appends_per_s(args.seconds, in_flight=PIPELINED_IN_FLIGHT))
        fsyncs.append(fsync_s())
        runs["blocking"].append(appends_per_s(args.seconds))
        runs["single"].append(appends_per_s(args.seconds, max_batch=1))
    rate = {mode: statistics.median(r for r, _ in v) for mode, v in runs.items()}
    fsync = statistics.median(fsyncs)
    per_commit = {mode: statistics.median(c for _, c in v) for mode, v in runs.items()}
    entries = _entries(args.entries)
    verify = verify_rate(args.entries, entries)
    tiles_rate, incremental_ms = tiles_rates(entries)
    del entries
    proof, startup, checkpoint_ms = proof_and_signer_costs(args.entries)
    print(f"{'measure':<56} {'value':>12}")
    print(f"{f'durable appends/s, 16 threads x {PIPELINED_IN_FLIGHT} in flight':<56} {rate['pipelined']:>12,.0f}")
    print(f"{'  mean entries per commit':<56} {per_commit['pipelined']:>12.1f}")
    print(f"{'durable appends/s, 16 threads blocking in append()':<56} {rate['blocking']:>12,.0f}")
    print(f"{'  mean entries per commit':<56} {per_commit['blocking']:>12.1f}")
    print(f"{'durable appends/s, the same, 1 entry per commit':<56} {rate['single']:>12,.0f}")
    print(f"{'fsync of 24 KiB in the same directory (median ms)':<56} {fsync * 1000:>12.2f}")
    print(f"{f'  ceiling for blocking: {APPENDERS} entries per fsync (appends/s)':<56} {APPENDERS / fsync:>12,.0f}")
    print(f"{f'verify rate, {args.entries:,}-entry export (entries/s)':<56} {verify:>12,.0f}")
    print(f"{f'inclusion proof at {args.entries:,} entries (median ms)':<56} {proof:>12.3f}")
    print("goals: ≥ 40,000 appends/s in flight, ≥ 12,000/s blocking")
    print(f"audit_appends_per_s_pipelined={rate['pipelined']:.0f}")
    print(f"audit_appends_per_s_blocking={rate['blocking']:.0f}")
    print(f"audit_blocking_vs_fsync_ceiling={rate['blocking'] / (APPENDERS / fsync):.2f}")
    print(f"audit_group_commit_speedup={rate['blocking'] / rate['single']:.1f}")
    print(f"verify_tiles_entries_per_s={tiles_rate:.0f}")
    print(f"incremental_verify_ms={incremental_ms:.1f}  (1,000 new entries on a {args.entries:,}-entry log)")
    print(f"signer_startup_verify_entries_per_s={startup:.0f}")
    print(f"signer_checkpoint_ms={checkpoint_ms:.1f}  (1,000 new entries read back, hashed, proved and signed)")


if __name__ == "__main__":
    main()
