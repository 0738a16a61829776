"""Access-report benchmark (not a test): `name=value` lines, multiproof against a proof per entry.

  python bench/access_report.py [--log-entries 10000000] [--accesses 1000] [--rounds 5]

Goal (issue 17): for an account with 1,000 accesses on a 10,000,000-entry log, a report is built in
< 1 s and verified in < 200 ms. Appending 10 million entries through the service is not what is
measured, so the log is synthetic and stored sparsely: a SQLite database (the service's schema, via
`Database`) holding the account's 1,000 chained entries (spread at random over the log, the last one
its request entry), their account-chain index rows, and the tiles a proof reads: the leaf tile of
each 256 entries holding one of the account's (the others' leaves stand for other entries), the
entries of the unfinished last 256, and every tile above, with stand-in hashes for the 256-entry
subtrees holding none of the account's entries (a proof cannot tell them from real ones). The tree's
root is computed from those, and a checkpoint signed over it.

Measured in the same run (medians of --rounds):
  build: `assemble_report` (index query, entries, multiproof nodes in one query per 10,000, the
    self-check, pseudonyms, binding signature, JSON) — the service's path after the request entry
    is appended and a checkpoint signed; baseline: the same nodes for one RFC 9162 proof per entry;
  verify: `verify_report` on the file's bytes (every step: signatures, 1,000 entries, multiproof,
    chain); and the proof check alone, multiproof vs 1,000 `verify_inclusion` calls;
  size: proof hashes and report bytes, multiproof vs a proof per entry.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from auditlog.checkpoint import Checkpoint, sign_checkpoint  # noqa: E402
from auditlog.entry import make_entry  # noqa: E402
from auditlog.merkle import leaf_hash, node_hash, subtree_levels, verify_inclusion  # noqa: E402
from auditlog.multiproof import verify_multiproof  # noqa: E402
from auditlog.note import NoteSigner  # noqa: E402
from auditlog.report import verify_report  # noqa: E402
from auditlog.tiles import TILE_WIDTH  # noqa: E402
from auditlog.tree import inclusion_ranges, perfect_subtrees  # noqa: E402
from clipstore.access_reports import assemble_report  # noqa: E402
from clipstore.audit.reader import AuditReader  # noqa: E402
from clipstore.clock import rfc3339  # noqa: E402
from clipstore.store import Database, schema  # noqa: E402

REF, ACCOUNT_ID = "acct_0123456789abcdef01234567", "amzn1.account.BENCH"
REVIEWERS = [f"p_{i:016x}" for i in range(20)]
START_S = 1_800_000_000.0
TILE_LEVEL = 8  # tree levels per tile level


class SyntheticTree:
    """Subtree hashes of a `size`-leaf tree whose only known leaves are `leaves` (index -> leaf hash);
    every other leaf i stands for the entry b"other %d" % i, and a 256-leaf subtree (a leaf tile's)
    holding no known leaf gets a stand-in hash (what a level-1 tile would hold)."""

    def __init__(self, size: int, leaves: dict[int, bytes]) -> None:
        self.size, self.leaves, self._known = size, leaves, sorted(leaves)
        self._memo: dict[tuple[int, int], bytes] = {}

    def _holds_known(self, lo: int, hi: int) -> bool:
        import bisect
        i = bisect.bisect_left(self._known, lo)
        return i < len(self._known) and self._known[i] < hi

    def node(self, level: int, index: int) -> bytes:
        key = (level, index)
        if key not in self._memo:
            lo = index << level
            if level == 0:
                value = self.leaves.get(lo) or leaf_hash(b"other %d" % lo)
            elif level == TILE_LEVEL and not self._holds_known(lo, lo + (1 << level)):
                value = hashlib.sha256(b"stand-in %d %d" % key).digest()
            else:
                value = node_hash(self.node(level - 1, 2 * index), self.node(level - 1, 2 * index + 1))
            self._memo[key] = value
        return self._memo[key]

    def root(self) -> bytes:
        hashes = [self.node(level, index) for level, index in perfect_subtrees(0, self.size)]
        root = hashes[-1]
        for left in reversed(hashes[:-1]):
            root = node_hash(left, root)
        return root


def _entries(size: int, accesses: int, rng: random.Random) -> dict[int, bytes]:
    """The account's chained entries at random indices, the last its request entry at size - 1."""
    indices = sorted(rng.sample(range(size - 1), accesses - 1)) + [size - 1]
    out, prev = {}, "0" * 64
    for seq, index in enumerate(indices, start=1):
        last = seq == len(indices)
        data = make_entry(
            seq=index, prev=hashlib.sha256(b"%d" % index).hexdigest(), time=rfc3339(START_S + index / 100),
            actor={"id": "p_backend" if last else rng.choice(REVIEWERS), "role": "ingest" if last else "reviewer"},
            action="account.access_report" if last else rng.choice(["grant.issue", "clip.fetch"]),
            target={"account_ref": REF, "account_seq": seq, "account_prev": prev,  # type: ignore[dict-item]
                    "clip_id": "" if last else f"c_{rng.randrange(accesses // 2):020x}", "principal_id": ""},
            outcome={"result": "ok", "reason": "nonce=bench" if last else ""}, request_id="r_bench" if last else "")
        out[index] = data
        prev = leaf_hash(data).hex()
    return out


def _tile(level: int, idx: int, hashes: bytes) -> dict[str, object]:
    """An audit_tiles row as the service writes it: the hashes and the 7 levels of nodes above them."""
    return {"level": level, "idx": idx, "hashes": hashes,
            "nodes": b"".join(subtree_levels(hashes, TILE_LEVEL)[1:TILE_LEVEL])}


def _store(db: Database, tree: SyntheticTree, entries: dict[int, bytes]) -> None:
    """Entries and index rows of the account, and the tiles a proof reads (see the module's docstring)."""
    size, tail = tree.size, tree.size // TILE_WIDTH * TILE_WIDTH
    blocks = sorted({i // TILE_WIDTH for i in entries if i < tail})
    tiles = [_tile(0, b, b"".join(tree.node(0, i) for i in range(b * TILE_WIDTH, (b + 1) * TILE_WIDTH)))
             for b in blocks]
    tile_level = 1
    while count := size >> (TILE_LEVEL * tile_level):
        level = TILE_LEVEL * tile_level
        tiles += [_tile(tile_level, t, b"".join(tree.node(level, j) for j in range(t * TILE_WIDTH,
                                                                                   min(count, (t + 1) * TILE_WIDTH))))
                  for t in range(-(-count // TILE_WIDTH))]
        tile_level += 1
    with db.transaction() as conn:
        conn.execute(schema.audit_entries.insert(), [{"seq": i, "entry": e} for i, e in entries.items()] + [
            {"seq": i, "entry": b"other %d" % i} for i in range(tail, size) if i not in entries])
        conn.execute(schema.audit_tiles.insert(), tiles)
        conn.execute(schema.audit_account_entries.insert(), [
            {"account_ref": REF, "account_seq": json.loads(e)["target"]["account_seq"], "seq": i,
             "time": json.loads(e)["time"], "leaf": leaf_hash(e)} for i, e in entries.items()])
        conn.execute(sa.update(schema.audit_head).values(size=tree.size))


def _median(fn: Callable[[], object], rounds: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-entries", type=int, default=10_000_000)
    parser.add_argument("--accesses", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    size, rng = args.log_entries, random.Random(17)
    entries = _entries(size, args.accesses, rng)
    indices = sorted(entries)
    tree = SyntheticTree(size, {i: leaf_hash(e) for i, e in entries.items()})
    signer = NoteSigner.generate("bench.example/log")
    note = sign_checkpoint(Checkpoint(origin=signer.name, size=size, root=tree.root()), signer)
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'bench.db'}")
        _store(db, tree, entries)
        reader = AuditReader(db)
        key = b"k" * 32

        def build() -> bytes:
            return assemble_report(reader, signer, note=note, account_id=ACCOUNT_ID, account_ref=REF,
                                   head=size - 1, since=None, until=None, pseudonym_key=key,
                                   captured_at=lambda clips: {c: START_S for c in clips}).report

        def build_baseline() -> list[list[bytes]]:
            rows = reader.account_entries(REF, through=size - 1, before=None)
            reader.entries_at([i for _, i in rows])
            per_entry = [inclusion_ranges(i, size) for _, i in rows]
            flat = reader.range_roots([r for ranges in per_entry for r in ranges])
            out, at = [], 0
            for ranges in per_entry:
                out.append(flat[at:at + len(ranges)])
                at += len(ranges)
            return out

        build_s, report = _median(build, args.rounds)
        baseline_build_s, proofs = _median(build_baseline, args.rounds)
        db.close()
    assert isinstance(report, bytes) and isinstance(proofs, list)
    verify_s, verified = _median(lambda: verify_report(report, signer.verifier, account_id=ACCOUNT_ID,
                                                       nonce="bench"), args.rounds)
    parsed = json.loads(report)
    multiproof = [base64.b64decode(p) for p in parsed["proof"]]
    leaves = [(i, leaf_hash(entries[i])) for i in indices]
    root = tree.root()
    multi_check_s, _ = _median(lambda: verify_multiproof(leaves, size, multiproof, root), args.rounds)
    per_entry_check_s, _ = _median(lambda: [verify_inclusion(h, i, size, p, root)
                                            for (i, h), p in zip(leaves, proofs, strict=True)], args.rounds)
    per_entry_hashes = sum(len(p) for p in proofs)
    per_entry_bytes = len(report) + (per_entry_hashes - len(multiproof)) * 47  # a quoted base64 hash and a comma
    print(f"log_entries={size}")
    print(f"accesses={len(indices)}")
    print(f"report_entries_verified={len(verified.accesses)}")  # type: ignore[attr-defined]
    print(f"build_ms={build_s * 1000:.1f}")
    print(f"build_baseline_proof_per_entry_nodes_ms={baseline_build_s * 1000:.1f}")
    print(f"verify_ms={verify_s * 1000:.1f}")
    print(f"proof_check_multiproof_ms={multi_check_s * 1000:.1f}")
    print(f"proof_check_per_entry_ms={per_entry_check_s * 1000:.1f}")
    print(f"proof_check_speedup={per_entry_check_s / multi_check_s:.2f}")
    print(f"proof_hashes_multiproof={len(multiproof)}")
    print(f"proof_hashes_per_entry={per_entry_hashes}")
    print(f"proof_hashes_ratio={per_entry_hashes / len(multiproof):.2f}")
    print(f"report_bytes={len(report)}")
    print(f"report_bytes_per_entry_proofs={per_entry_bytes}")
    print(f"build_goal_met={build_s < 1.0}")
    print(f"verify_goal_met={verify_s < 0.2}")


if __name__ == "__main__":
    main()
