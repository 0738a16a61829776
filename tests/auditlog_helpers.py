"""Build small audit logs and exports for verifier tests (auditlog only)."""

from __future__ import annotations

from pathlib import Path

from auditlog.checkpoint import Checkpoint, sign_checkpoint
from auditlog.entry import GENESIS_PREV, entry_hash, make_entry
from auditlog.merkle import leaf_hash, node_hash, root_hash
from auditlog.note import NoteSigner


def build_entries(n: int, *, start_prev: str = GENESIS_PREV, first_seq: int = 0) -> list[bytes]:
    entries: list[bytes] = []
    prev = start_prev
    for i in range(first_seq, first_seq + n):
        data = make_entry(seq=i, prev=prev, time=f"2026-11-26T00:00:{i % 60:02d}.000Z",
                          actor={"id": "p_test", "role": "ingest"}, action="clip.ingest",
                          target={"clip_id": f"c_{i:04d}", "account_ref": "acct_x"},
                          outcome={"result": "ok", "reason": ""}, request_id=f"r{i}")
        entries.append(data)
        prev = entry_hash(data)
    return entries


def post_order_key(level: int, idx: int) -> int:
    """Where audit_nodes kept the node (level, idx), revisions 0009 to 0016: its post-order position."""
    first = idx << level
    return 2 * first - first.bit_count() + (2 << level) - 2


def stored_tiles(leaves: list[bytes]) -> list[tuple[int, int, bytes, bytes | None]]:
    """(level, idx, hashes, nodes) rows of schema.audit_tiles for a log of these leaf hashes, computed from
    scratch: every tile as far as it goes (tlog-tiles: level L + 1 holds the Merkle tree hash of each full
    level-L tile); `nodes` the 7 levels above a tile's hashes, complete pairs (None for the unfinished
    leaf tile, whose nodes are hashed when read)."""
    rows: list[tuple[int, int, bytes, bytes | None]] = []
    level, hashes = 0, list(leaves)
    while hashes:
        for i in range(0, len(hashes), 256):
            if not level and len(hashes) - i < 256:
                rows.append((0, i // 256, b"".join(hashes[i:]), None))
            else:
                tile, nodes = hashes[i:i + 256], b""
                for _ in range(7):
                    tile = [node_hash(tile[j], tile[j + 1]) for j in range(0, len(tile) - 1, 2)]
                    nodes += b"".join(tile)
                rows.append((level, i // 256, b"".join(hashes[i:i + 256]), nodes))
        hashes = [root_hash(hashes[i:i + 256]) for i in range(0, len(hashes) - 255, 256)]
        level += 1
    return rows


def build_chained_entries(links: list[tuple[int, str | None]]) -> list[bytes]:
    """clip.fetch entries of one account's access chain: (account_seq, account_prev, None for the real link)."""
    entries: list[bytes] = []
    prev = GENESIS_PREV
    for i, (seq, given) in enumerate(links):
        data = make_entry(seq=i, prev=prev, time=f"2026-11-26T00:00:{i % 60:02d}.000Z",
                          actor={"id": "p_rev", "role": "reviewer"}, action="clip.fetch",
                          target={"clip_id": "c_1", "account_ref": "acct_x", "account_seq": seq,  # type: ignore[dict-item]
                                  "account_prev": given or prev},
                          outcome={"result": "ok", "reason": ""}, request_id=f"r{i}")
        entries.append(data)
        prev = entry_hash(data)  # every entry is the account's: its hash is both links
    return entries


def checkpoint_for(entries: list[bytes], signer: NoteSigner) -> str:
    cp = Checkpoint(origin=signer.name, size=len(entries), root=root_hash([leaf_hash(e) for e in entries]))
    return sign_checkpoint(cp, signer)


def write_export(directory: Path, entries: list[bytes], checkpoint: str, signer: NoteSigner) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "entries.jsonl").write_bytes(b"".join(e + b"\n" for e in entries))
    (directory / "checkpoint").write_text(checkpoint)
    (directory / "verifier.key").write_text(signer.verifier.key_string() + "\n")
    return directory


def publish_tiles(directory: Path, entries: list[bytes], signer: NoteSigner, *, sizes: list[int] | None = None,
                  extra_signatures: str = "") -> Path:
    """Publish `entries` as tiles, one checkpoint per size in `sizes` (the last one stays)."""
    from auditlog.tiles import TileWriter
    writer = TileWriter()
    for size in sizes or [len(entries)]:
        for path, data in writer.append(entries[writer.size:size]) + writer.flush():
            (directory / path).parent.mkdir(parents=True, exist_ok=True)
            (directory / path).write_bytes(data)
        (directory / "checkpoint").write_text(checkpoint_for(entries[:size], signer) + extra_signatures)
    return directory
