"""Batched inclusion proofs: many leaves of one RFC 9162 tree proved by one set of shared nodes.

A proof per leaf repeats the nodes near the root for every leaf (k leaves of an n-leaf tree cost
k * log2(n) hashes). A multiproof walks the tree once, depth first and left to right, splitting
each range [lo, hi) where RFC 9162 §2.1.1 splits it (the largest power of two below hi - lo): a
range holding none of the proved leaves contributes its root, a range of one proved leaf is that
leaf, any other range is the hash of its two halves. The proof is the list of contributed roots
in walk order; the verifier repeats the same walk, so the shape is fixed by (indices, size) alone
and every node is used exactly once.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from auditlog.errors import ProofError
from auditlog.merkle import HASH_BYTES, node_hash
from auditlog.tree import Range, split_point

MAX_TREE_DEPTH = 64  # tree sizes are below 2**63

__all__ = ["multiproof_ranges", "verify_multiproof"]


def _check_indices(indices: Sequence[int], size: int) -> None:
    for i, index in enumerate(indices):
        if not 0 <= index < size:
            raise ProofError(f"index {index} is outside a tree of size {size}")
        if i and index <= indices[i - 1]:
            raise ProofError(f"indices must be strictly increasing; {index} follows {indices[i - 1]}")


def multiproof_ranges(indices: Sequence[int], size: int) -> list[Range]:
    """Leaf ranges whose roots, in this order, make the multiproof of `indices` in D[size]."""
    if not indices:
        raise ValueError("a multiproof needs at least one index")
    _check_indices(indices, size)
    out: list[Range] = []

    def walk(lo: int, hi: int, i: int, j: int) -> None:  # indices[i:j] lie in [lo, hi)
        if i == j:
            out.append((lo, hi))
        elif hi - lo > 1:
            k = lo + split_point(hi - lo)
            m = bisect_left(indices, k, i, j)
            walk(lo, k, i, m)
            walk(k, hi, m, j)

    walk(0, size, 0, len(indices))
    return out


def verify_multiproof(leaves: Sequence[tuple[int, bytes]], size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Raise `ProofError` unless `proof` puts every (index, leaf hash) in the tree D[size] with `root`."""
    # Bounds and sizes before any hashing.
    if not leaves:
        raise ProofError("a multiproof needs at least one leaf")
    indices = [index for index, _ in leaves]
    _check_indices(indices, size)
    if len(proof) > len(leaves) * MAX_TREE_DEPTH:
        raise ProofError(f"proof has {len(proof)} hashes; at most {len(leaves) * MAX_TREE_DEPTH} are possible")
    for name, value in (("root", root), *((f"leaf {i}", h) for i, h in leaves),
                        *((f"proof[{n}]", h) for n, h in enumerate(proof))):
        if len(value) != HASH_BYTES:
            raise ProofError(f"{name} must be {HASH_BYTES} bytes, got {len(value)}")
    used = 0

    def walk(lo: int, hi: int, i: int, j: int) -> bytes:
        nonlocal used
        if i == j:
            if used == len(proof):
                raise ProofError(f"proof is too short: it ran out at {used} hashes")
            used += 1
            return proof[used - 1]
        if hi - lo == 1:
            return leaves[i][1]
        k = lo + split_point(hi - lo)
        m = bisect_left(indices, k, i, j)
        return node_hash(walk(lo, k, i, m), walk(k, hi, m, j))

    computed = walk(0, size, 0, len(indices))
    if used != len(proof):
        raise ProofError(f"proof is too long: {len(proof) - used} of its {len(proof)} hashes are not used")
    if computed != root:
        raise ProofError("computed root does not match the checkpoint root")
