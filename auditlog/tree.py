"""Which subtrees make up a proof, independent of where hashes are stored.

A proof is a list of subtree roots, each over a leaf range [lo, hi). A server
that stores perfect (aligned, power-of-two) subtree hashes answers any range
from `perfect_subtrees(lo, hi)`: O(log n) stored hashes, no re-hashing of the
log. `auditlog.merkle` computes the same ranges from the leaves themselves.
"""

from __future__ import annotations

Range = tuple[int, int]

__all__ = ["Range", "consistency_ranges", "inclusion_ranges", "perfect_subtrees", "split_point"]


def split_point(n: int) -> int:
    """The largest power of two strictly smaller than n (n ≥ 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """Leaf ranges whose roots form PATH(index, D[size]) (RFC 9162 §2.1.3.1), leaf to root."""
    if not 0 <= index < size:
        raise ValueError(f"index must be in [0, {size}), got {index}")
    out: list[Range] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = split_point(hi - lo)
        if index < lo + k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo = lo + k
    out.reverse()
    return out


def consistency_ranges(old_size: int, size: int) -> list[Range]:
    """Leaf ranges whose roots form PROOF(old_size, D[size]) (RFC 9162 §2.1.4.1)."""
    if not 0 <= old_size <= size:
        raise ValueError(f"old_size must be in [0, {size}], got {old_size}")
    if old_size in (0, size):
        return []
    out: list[Range] = []
    lo, hi, m, complete = 0, size, old_size, True
    while True:
        n = hi - lo
        if m == n:
            if not complete:
                out.append((lo, hi))
            break
        k = split_point(n)
        if m <= k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo, m, complete = lo + k, m - k, False
    out.reverse()
    return out


def perfect_subtrees(lo: int, hi: int) -> list[tuple[int, int]]:
    """(level, index) of the perfect subtrees that compose [lo, hi), left to right.

    Valid for the ranges RFC 9162 proofs use: `lo` is a multiple of the
    largest power of two not exceeding hi - lo.
    """
    out: list[tuple[int, int]] = []
    while lo < hi:
        level = (hi - lo).bit_length() - 1
        while lo % (1 << level):
            level -= 1
        out.append((level, lo >> level))
        lo += 1 << level
    return out

