"""Verify an exported log: every entry, the chain, the tree, the checkpoint.

Plan (each step raises on its first failure, naming the entry index):
  1. open the checkpoint note with the verifier key (signature, origin);
  2. for each entry i: canonical form, seq == i, prev == hash of entry i-1;
  3. the export holds at least checkpoint.size entries (else: truncated);
  4. the RFC 9162 root of the first checkpoint.size entries equals the
     signed root (else: the last entry was edited or the chain rewritten);
  5. against a trusted checkpoint saved earlier: not smaller (rollback) and
     a prefix of this log (else: fork).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from auditlog.checkpoint import Checkpoint, open_checkpoint
from auditlog.entry import GENESIS_PREV, entry_hash, parse_entry
from auditlog.errors import CheckpointError, EntryError, ProofError
from auditlog.merkle import consistency_proof, leaf_hash, root_hash, verify_consistency
from auditlog.note import NoteVerifier


@dataclass(frozen=True)
class VerifiedLog:
    size: int
    root: bytes
    checkpoint: Checkpoint


def check_chain(entries: Iterable[bytes]) -> list[bytes]:
    """Steps 2: check each entry and link; return the leaf hashes."""
    leaves: list[bytes] = []
    prevs: list[str] = []  # hex hash of each entry, to explain insertions
    for index, data in enumerate(entries):
        entry = parse_entry(data, index)
        expected_prev = prevs[-1] if prevs else GENESIS_PREV
        seq = entry["seq"]
        if seq != index:
            if seq > index:
                raise EntryError(index, f"seq is {seq}, expected {index}: "
                                        f"{seq - index} entr{'y' if seq - index == 1 else 'ies'} "
                                        "deleted or entries reordered")
            if 0 <= seq <= index and entry["prev"] == (prevs[seq - 1] if seq else GENESIS_PREV):
                raise EntryError(seq, f"inserted: entry {index} carries seq {seq} and links to "
                                      f"entry {seq - 1}, so entries {seq}..{index - 1} are not original")
            raise EntryError(index, f"seq is {seq}, expected {index}: entries duplicated or reordered")
        if entry["prev"] != expected_prev:
            raise EntryError(index - 1, f"edited: its hash no longer matches entry {index}'s prev")
        leaf = leaf_hash(data)
        leaves.append(leaf)
        prevs.append(leaf.hex())
    return leaves


def verify_log(entries: Iterable[bytes], checkpoint_note: str | bytes, verifier: NoteVerifier,
               trusted_note: str | bytes | None = None) -> VerifiedLog:
    """Run the plan in the module docstring; return size and root on success."""
    # 1
    checkpoint = open_checkpoint(checkpoint_note, verifier)
    # 2
    leaves = check_chain(entries)
    # 3
    if len(leaves) < checkpoint.size:
        raise EntryError(len(leaves), f"missing: the checkpoint covers {checkpoint.size} entries but the "
                                      f"export ends after {len(leaves)} (truncated)")
    signed = leaves[:checkpoint.size]
    # 4
    root = root_hash(signed)
    if root != checkpoint.root:
        raise EntryError(max(checkpoint.size - 1, 0),
                         "the entries do not hash to the signed checkpoint root "
                         "(this entry was edited, or the chain was rewritten up to here)")
    # 5
    if trusted_note is not None:
        trusted = open_checkpoint(trusted_note, verifier)
        if trusted.size > checkpoint.size:
            raise EntryError(checkpoint.size, f"rolled back: the trusted checkpoint covers {trusted.size} "
                                              f"entries, this log only {checkpoint.size}")
        if trusted.size:
            try:
                verify_consistency(trusted.size, checkpoint.size, trusted.root, root,
                                   consistency_proof(signed, trusted.size))
            except ProofError:
                raise EntryError(trusted.size - 1, "forked: the first "
                                 f"{trusted.size} entries differ from the trusted checkpoint") from None
    return VerifiedLog(size=checkpoint.size, root=root, checkpoint=checkpoint)


__all__ = ["CheckpointError", "VerifiedLog", "check_chain", "entry_hash", "verify_log"]
