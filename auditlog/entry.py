"""Audit entries: canonical JSON and the hash chain.

An entry is canonical JSON (sorted keys, no spaces, UTF-8) with the fields in
`FIELDS`. `prev` is the hex leaf hash (RFC 9162, SHA-256(0x00 ‖ entry)) of the
previous entry, or 64 zeros for entry 0, so the chain and the Merkle tree hash
the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from auditlog.errors import EntryError
from auditlog.merkle import leaf_hash

GENESIS_PREV = "0" * 64
FIELDS = frozenset({"seq", "time", "actor", "action", "target", "outcome", "request_id", "prev"})
MAX_ENTRY_BYTES = 16 << 10  # entries are small; bounds memory on hostile exports

__all__ = ["FIELDS", "GENESIS_PREV", "canonical_json", "entry_hash", "make_entry", "parse_entry"]


def canonical_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def entry_hash(entry: bytes) -> str:
    """The value the next entry's `prev` must hold."""
    return leaf_hash(entry).hex()


def make_entry(*, seq: int, prev: str, time: str, actor: Mapping[str, str], action: str,
               target: Mapping[str, str], outcome: Mapping[str, str], request_id: str) -> bytes:
    return canonical_json({"seq": seq, "time": time, "actor": dict(actor), "action": action,
                           "target": dict(target), "outcome": dict(outcome),
                           "request_id": request_id, "prev": prev})


def parse_entry(data: bytes, index: int) -> dict[str, Any]:
    """Parse and check one entry's form; `EntryError(index, "malformed: …")` on any defect.

    Hostile input must end in an `EntryError`, never in another exception: json
    raises ValueError for over-long integers, RecursionError for deep nesting,
    and a lone surrogate (valid JSON escape, invalid Unicode) only fails when
    re-encoded.
    """
    if len(data) > MAX_ENTRY_BYTES:
        raise EntryError(index, f"malformed: entry is {len(data)} bytes; at most {MAX_ENTRY_BYTES} allowed")
    try:
        text = data.decode("utf-8")  # json.loads would guess UTF-16 or -32 from the bytes, or say "not JSON"
    except UnicodeDecodeError:
        raise EntryError(index, "malformed: not UTF-8") from None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise EntryError(index, f"malformed: not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(value, dict) or set(value) != FIELDS:
        raise EntryError(index, f"malformed: fields must be exactly {sorted(FIELDS)}")
    try:
        canonical = canonical_json(value)
    except (ValueError, RecursionError):  # UnicodeEncodeError: a lone surrogate
        raise EntryError(index, "malformed: not encodable as UTF-8 (lone surrogate)") from None
    if canonical != data:
        raise EntryError(index, "malformed: not in canonical form (sorted keys, no spaces, UTF-8)")
    if not isinstance(value["seq"], int) or isinstance(value["seq"], bool):
        raise EntryError(index, "malformed: seq is not an integer")
    if not isinstance(value["prev"], str) or len(value["prev"]) != 64:
        raise EntryError(index, "malformed: prev is not a 64-character hex hash")
    return value


def chain_link(data: bytes) -> tuple[int, bytes]:
    """seq and prev of an entry the log itself encoded (canonical: each key occurs once)."""
    i = data.find(b'"prev":"')
    j = data.find(b'"seq":', i)
    k = data.find(b",", j)
    if i < 0 or j < 0 or k < 0 or not data[j + 6:k].isdigit() or k - j - 6 > 19:
        return -1, b""  # not what the log writes: the slow path names the defect
    return int(data[j + 6:k]), data[i + 8:i + 72]
