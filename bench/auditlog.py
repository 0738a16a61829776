"""Audit log benchmark (not a test): prints a table, last line the speedup.

  python bench/auditlog.py [--entries 1000000] [--seconds 5]

Measured in one run on SQLite (synchronous=FULL, so every commit is durable):
  1. durable appends/s, 16 concurrent appenders, group-commit sequencer
  2. the same through a sequencer that commits one entry per transaction (baseline)
  3. `auditlog` verify rate over an export of --entries entries, and from C2SP tiles
     (all of it; then 1,000 new entries with --state)
  4. inclusion-proof time from stored subtree hashes at --entries entries
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from auditlog.checkpoint import Checkpoint, sign_checkpoint  # noqa: E402
from auditlog.entry import GENESIS_PREV, entry_hash, make_entry  # noqa: E402
from auditlog.merkle import leaf_hash, root_hash, verify_inclusion  # noqa: E402
from auditlog.note import NoteSigner  # noqa: E402
from auditlog.sources import open_source  # noqa: E402
from auditlog.tiles import TileWriter, tree_root  # noqa: E402
from auditlog.verify import TileState, verify_log, verify_tiles  # noqa: E402
from clipstore.audit import AuditLog, AuditRecord  # noqa: E402
from clipstore.audit.signing import load_or_create_signer  # noqa: E402
from clipstore.clock import SystemClock  # noqa: E402
from clipstore.store import Database  # noqa: E402
from kms import LocalKms  # noqa: E402

APPENDERS = 16
RECORD = AuditRecord(actor_id="p_0123456789abcdef", actor_role="reviewer", action="clip.fetch",
                     clip_id="c_0123456789abcdef0123", account_ref="acct_0123456789abcdef", request_id="r" * 32)


def _audit_log(directory: Path, max_batch: int) -> AuditLog:
    db = Database(f"sqlite:///{directory / 'bench.db'}")
    root = LocalKms.from_file(directory / "root.key")
    signer = load_or_create_signer(db, root)
    return AuditLog(db, signer, SystemClock(), checkpoint_every_entries=10**9, checkpoint_every_s=3600,
                    max_batch_entries=max_batch)


def _drive(log: AuditLog, seconds: float, burst: int) -> float:
    """16 appender threads, each waiting for `burst` appends at a time, for `seconds`; appends/s."""
    log.append(RECORD)  # warm up: thread, connection, schema
    stop = time.monotonic() + seconds
    counts = [0] * APPENDERS

    def appender(i: int) -> None:
        while time.monotonic() < stop:
            for future in [log.append_async(RECORD) for _ in range(burst)]:
                future.result()
            counts[i] += burst

    start = time.monotonic()
    threads = [threading.Thread(target=appender, args=(i,)) for i in range(APPENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - start)


def appends_per_s(max_batch: int, seconds: float) -> tuple[float, float]:
    """Blocking appenders (one append in flight each); also the mean entries per commit."""
    with tempfile.TemporaryDirectory() as tmp:
        log = _audit_log(Path(tmp), max_batch)
        rate = _drive(log, seconds, burst=1)
        per_commit = log.reader.size() / max(log.batches, 1)
        log.close()
        return rate, per_commit


def pipelined_appends_per_s(seconds: float, in_flight: int = 32) -> float:
    """16 appenders that each keep `in_flight` appends outstanding (as a busy server's RPC threads do)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = _audit_log(Path(tmp), 4096)
        rate = _drive(log, seconds, burst=in_flight)
        log.close()
        return rate


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
        state = TileState(origin=signer.name, size=full.size, root=full.root, last_leaf=full.last_leaf, note=full.note)
        _publish(directory, writer, entries, signer)
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            result = verify_tiles(read, signer.verifier, state=state)
            samples.append((time.perf_counter() - start) * 1000)
        assert result.size == len(entries) and result.old_size == len(entries) - new
        return rate, statistics.median(samples)


def proof_ms(n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        log = _audit_log(Path(tmp), 4096)
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
        return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    grouped, per_batch = appends_per_s(4096, args.seconds)
    single, _ = appends_per_s(1, args.seconds)
    pipelined = pipelined_appends_per_s(args.seconds)
    entries = _entries(args.entries)
    verify = verify_rate(args.entries, entries)
    tiles_rate, incremental_ms = tiles_rates(entries)
    del entries
    proof = proof_ms(args.entries)
    print(f"{'measure':<52} {'value':>14}")
    print(f"{'durable appends/s, 16 appenders, group commit':<52} {grouped:>14,.0f}")
    print(f"{'  mean entries per commit':<52} {per_batch:>14.1f}")
    print(f"{'durable appends/s, 16 appenders, 1 entry per commit':<52} {single:>14,.0f}")
    print(f"{'durable appends/s, 16 appenders x 32 in flight':<52} {pipelined:>14,.0f}")
    print(f"{f'verify rate, {args.entries:,}-entry export (entries/s)':<52} {verify:>14,.0f}")
    print(f"{f'inclusion proof at {args.entries:,} entries (median ms)':<52} {proof:>14.3f}")
    print(f"verify_tiles_entries_per_s={tiles_rate:.0f}")
    print(f"incremental_verify_ms={incremental_ms:.1f}  (1,000 new entries on a {args.entries:,}-entry log)")
    print(f"audit_group_commit_speedup={grouped / single:.1f}")


if __name__ == "__main__":
    main()
