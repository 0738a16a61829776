"""Checks on what AuditService returns, before the client hands it to the caller.

Nothing here trusts the server: a checkpoint counts only if the caller's
verifier key signed it; entries count only if, with the sibling hashes of two
inclusion proofs, they hash to that checkpoint's root (RFC 9162 tree).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from auditlog.checkpoint import open_checkpoint
from auditlog.entry import GENESIS_PREV, parse_entry
from auditlog.errors import CheckpointError, EntryError, ProofError
from auditlog.merkle import HASH_BYTES, leaf_hash, node_hash, root_hash, verify_consistency, verify_inclusion
from auditlog.note import NoteVerifier
from auditlog.tree import Range, inclusion_ranges, split_point
from clipstore.v1 import audit_pb2


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint signed by the caller's key. Keep `note` and pass the checkpoint back as
    `trusted` later: the client then proves the log only grew (no rollback, no fork)."""

    size: int
    root: bytes
    note: str
    verifier: NoteVerifier = field(repr=False)

    @classmethod
    def open(cls, note: str, verifier_key: str | NoteVerifier) -> VerifiedCheckpoint:
        """A saved note, checked again; `NoteError`/`CheckpointError` if the key did not sign it."""
        verifier = verifier_key if isinstance(verifier_key, NoteVerifier) \
            else NoteVerifier.from_key_string(verifier_key)
        checkpoint = open_checkpoint(note, verifier)
        return cls(size=checkpoint.size, root=checkpoint.root, note=note, verifier=verifier)


@dataclass(frozen=True)
class AuditEntry:
    """One log entry at `index`, proven to be in a verified checkpoint's tree."""

    index: int
    data: bytes  # canonical JSON, exactly as hashed
    fields: dict[str, Any]
    leaf_hash: bytes  # SHA-256(0x00 ‖ data): the next entry's `prev`, and this entry's leaf in the tree


@dataclass(frozen=True)
class InclusionProof:
    index: int
    tree_size: int
    leaf_hash: bytes
    proof: tuple[bytes, ...]


def checkpoint_from(response: audit_pb2.GetCheckpointResponse, verifier_key: str | NoteVerifier
                    ) -> VerifiedCheckpoint:
    """Open the signed note; the unsigned size and root beside it must say the same."""
    checkpoint = VerifiedCheckpoint.open(response.signed_note, verifier_key)
    if (response.tree_size, response.root_hash) != (checkpoint.size, checkpoint.root):
        raise CheckpointError(f"the response's tree_size {response.tree_size} and root_hash disagree with "
                              f"its signed note (size {checkpoint.size})")
    return checkpoint


def check_grew(trusted: VerifiedCheckpoint, new: VerifiedCheckpoint, proof: Sequence[bytes]) -> None:
    """`new` extends `trusted`: not smaller (rollback), and a consistency proof links the roots (no fork)."""
    if new.size < trusted.size:
        raise ProofError(f"rolled back: the server's checkpoint covers {new.size} entries, "
                         f"the trusted one {trusted.size}")
    if trusted.size == 0:
        return  # every log extends the empty one
    verify_consistency(trusted.size, new.size, trusted.root, new.root, proof)


def check_inclusion(checkpoint: VerifiedCheckpoint, index: int, response: audit_pb2.GetInclusionProofResponse,
                    entry: bytes | None) -> InclusionProof:
    if entry is not None and leaf_hash(entry) != response.leaf_hash:
        raise ProofError(f"the server's leaf hash for index {index} is not the hash of the given entry")
    verify_inclusion(response.leaf_hash, index, checkpoint.size, response.proof, checkpoint.root)
    return InclusionProof(index=index, tree_size=checkpoint.size, leaf_hash=response.leaf_hash,
                          proof=tuple(response.proof))


def check_page(checkpoint: VerifiedCheckpoint, start: int, entries: Sequence[bytes], prev: str | None,
               first_proof: Sequence[bytes], last_proof: Sequence[bytes]) -> list[AuditEntry]:
    """Entries [start, start + len(entries)) of `checkpoint`'s tree, or the first error.

    Steps: (1) bounds; (2) each entry's form, `seq` and `prev` link (to `prev`, the
    hex hash of entry start-1 when the caller holds it); (3) the entries, with
    the outer sibling hashes of the inclusion proofs of the first and last
    entry, hash to the signed root.
    """
    # (1)
    end = start + len(entries)
    if not entries or end > checkpoint.size:
        raise EntryError(start, f"the server returned entries {start}..{end - 1}, outside the checkpoint's "
                                f"{checkpoint.size} entries")
    # (2)
    if start == 0:
        prev = GENESIS_PREV
    out, leaves = [], []
    for index, data in enumerate(entries, start):
        fields = parse_entry(data, index)
        if fields["seq"] != index:
            raise EntryError(index, f"seq is {fields['seq']}, expected {index}")
        if prev is not None and fields["prev"] != prev:
            raise EntryError(index, "prev is not the hash of the entry before it")
        leaf = leaf_hash(data)
        prev = leaf.hex()
        leaves.append(leaf)
        out.append(AuditEntry(index=index, data=data, fields=fields, leaf_hash=leaf))
    # (3)
    if range_root(checkpoint.size, start, leaves, first_proof, last_proof) != checkpoint.root:
        raise EntryError(start, f"entries {start}..{end - 1} do not hash to the checkpoint root: "
                                "an entry was edited, inserted or removed")
    return out


def range_root(size: int, start: int, leaves: Sequence[bytes], first_proof: Sequence[bytes],
               last_proof: Sequence[bytes]) -> bytes:
    """The root of a tree of `size` leaves from the leaf hashes of [start, end) and the inclusion
    proofs of leaves start and end - 1, whose siblings outside the range cover the rest of the tree."""
    end = start + len(leaves)
    if not 0 <= start < end <= size:
        raise ProofError(f"range {start}..{end - 1} is not inside a tree of size {size}")
    outside: dict[Range, bytes] = {}
    for index, proof in ((start, first_proof), (end - 1, last_proof)):
        ranges = inclusion_ranges(index, size)
        if len(proof) != len(ranges):
            raise ProofError(f"the inclusion proof of {index} has {len(proof)} hashes; a tree of {size} "
                             f"needs {len(ranges)}")
        for (lo, hi), node in zip(ranges, proof, strict=True):
            if len(node) != HASH_BYTES:
                raise ProofError(f"a proof hash is {len(node)} bytes, want {HASH_BYTES}")
            # A sibling that overlaps the range is recomputed from the entries, never taken from the server.
            if (hi <= start or lo >= end) and outside.setdefault((lo, hi), node) != node:
                raise ProofError(f"the two proofs disagree on the subtree over {lo}..{hi - 1}")

    def subtree(lo: int, hi: int) -> bytes:
        if start <= lo and hi <= end:
            return root_hash(leaves[lo - start:hi - start])
        if (lo, hi) in outside:
            return outside[(lo, hi)]
        if hi - lo == 1:
            raise ProofError(f"the proofs do not cover leaf {lo}")
        k = split_point(hi - lo)
        return node_hash(subtree(lo, lo + k), subtree(lo + k, hi))

    return subtree(0, size)
