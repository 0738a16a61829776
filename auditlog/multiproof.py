"""Batched inclusion proofs: many leaves of one RFC 9162 tree proved by one set of shared nodes.

A proof per leaf repeats the nodes near the root for every leaf (k leaves of an n-leaf tree cost
k * log2(n) hashes). A multiproof sends each needed node once. The tree of n leaves is the fold
of its perfect subtrees (`auditlog.tree.perfect_subtrees(0, n)`, largest first):
MTH = H(P1, H(P2, … H(Pm-1, Pm))). The proof lists, in this order:

  for each perfect subtree P, left to right, up to the last one holding a proved leaf:
    - P holds no proved leaf: P's root;
    - else, level by level from the leaves up, left to right: the sibling of every node whose
      sibling is neither proved nor computed (the nodes computed so far, paired where both are);
  then, if perfect subtrees follow the last one holding a proved leaf: the root of all of them
  together (one hash, as RFC 9162 proofs carry it).

The verifier repeats the same walk, so the shape is fixed by (indices, size) alone, and every hash
is used exactly once. It runs as loops over levels, not recursion: about 1 µs per node here.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from auditlog.errors import ProofError
from auditlog.merkle import HASH_BYTES, node_hash
from auditlog.tree import Range, perfect_subtrees

MAX_TREE_DEPTH = 64  # tree sizes are below 2**63

__all__ = ["multiproof_ranges", "verify_multiproof"]


def _check_indices(indices: Sequence[int], size: int) -> None:
    for i, index in enumerate(indices):
        if not 0 <= index < size:
            raise ProofError(f"index {index} is outside a tree of size {size}")
        if i and index <= indices[i - 1]:
            raise ProofError(f"indices must be strictly increasing; {index} follows {indices[i - 1]}")


def _subtrees(indices: Sequence[int], size: int) -> list[tuple[int, int, int, int]]:
    """(lo, level, i, j) for each perfect subtree up to the last holding a proved leaf: it covers
    [lo, lo + 2**level) and holds indices[i:j]; then (lo, -1, j, j) for the rest of the tree, if any."""
    out: list[tuple[int, int, int, int]] = []
    i = 0
    for level, idx in perfect_subtrees(0, size):
        lo = idx << level
        if i == len(indices):
            out.append((lo, -1, i, i))
            break
        j = bisect_left(indices, lo + (1 << level), i)
        out.append((lo, level, i, j))
        i = j
    return out


def multiproof_ranges(indices: Sequence[int], size: int) -> list[Range]:
    """Leaf ranges whose roots, in this order, make the multiproof of `indices` in D[size]."""
    if not indices:
        raise ValueError("a multiproof needs at least one index")
    _check_indices(indices, size)
    out: list[Range] = []
    for lo, level, i, j in _subtrees(indices, size):
        if level < 0:
            out.append((lo, size))
            continue
        if i == j:
            out.append((lo, lo + (1 << level)))
            continue
        known = [x - lo for x in indices[i:j]]
        for lev in range(level):
            parents: list[int] = []
            n = 0
            while n < len(known):
                x = known[n]
                if not x & 1 and n + 1 < len(known) and known[n + 1] == x + 1:
                    n += 2
                else:
                    sibling = x ^ 1
                    out.append((lo + (sibling << lev), lo + ((sibling + 1) << lev)))
                    n += 1
                parents.append(x >> 1)
            known = parents
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

    def take() -> bytes:
        nonlocal used
        if used == len(proof):
            raise ProofError(f"proof is too short: it ran out at {used} hashes")
        used += 1
        return proof[used - 1]

    roots: list[bytes] = []
    for lo, level, i, j in _subtrees(indices, size):
        if level < 0 or i == j:
            roots.append(take())
            continue
        nodes = [(x - lo, h) for x, h in leaves[i:j]]
        for _ in range(level):
            parents: list[tuple[int, bytes]] = []
            n = 0
            while n < len(nodes):
                x, h = nodes[n]
                if not x & 1 and n + 1 < len(nodes) and nodes[n + 1][0] == x + 1:
                    parents.append((x >> 1, node_hash(h, nodes[n + 1][1])))
                    n += 2
                else:
                    parents.append((x >> 1, node_hash(take(), h) if x & 1 else node_hash(h, take())))
                    n += 1
            nodes = parents
        roots.append(nodes[0][1])
    computed = roots[-1]
    for left in reversed(roots[:-1]):
        computed = node_hash(left, computed)
    if used != len(proof):
        raise ProofError(f"proof is too long: {len(proof) - used} of its {len(proof)} hashes are not used")
    if computed != root:
        raise ProofError("computed root does not match the checkpoint root")
