"""RFC 9162 Merkle tree hashing, proofs and proof verification.

Leaf hash = SHA-256(0x00 ‖ data); interior node = SHA-256(0x01 ‖ left ‖ right);
the root of the empty tree is SHA-256(""). The verify functions follow
RFC 9162 §2.1.3.2 (inclusion) and §2.1.4.2 (consistency) step by step and
raise `ProofError` on the first failure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from auditlog.errors import ProofError
from auditlog.tree import consistency_ranges, inclusion_ranges

HASH_BYTES = 32
MAX_PROOF_HASHES = 128  # a 2**64-leaf tree needs at most 2*64 hashes; bounds work on hostile input

__all__ = ["consistency_proof", "inclusion_proof", "leaf_hash", "node_hash", "perfect_root", "root_hash",
           "subtree_levels", "verify_consistency", "verify_inclusion"]

_EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 ‖ data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 ‖ left ‖ right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def perfect_root(hashes: bytes) -> bytes:
    """MTH of 2**k hashes given concatenated (a tile, or an aligned slice of one): each pair is one
    64-byte slice, so a level costs one join, not a list of 32-byte objects per node."""
    while len(hashes) > HASH_BYTES:
        hashes = b"".join([hashlib.sha256(b"\x01" + hashes[i:i + 2 * HASH_BYTES]).digest()
                           for i in range(0, len(hashes), 2 * HASH_BYTES)])
    return hashes


def subtree_levels(hashes: bytes, levels: int) -> list[bytes]:
    """`hashes` (concatenated) and the `levels` levels of nodes above them, each level holding the
    nodes over complete pairs only (a tile's, as far as it goes)."""
    out = [hashes]
    for _ in range(levels):
        below = out[-1]
        out.append(b"".join([hashlib.sha256(b"\x01" + below[i:i + 2 * HASH_BYTES]).digest()
                             for i in range(0, len(below) - 2 * HASH_BYTES + 1, 2 * HASH_BYTES)]))
    return out


def root_hash(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over already-hashed leaves; SHA-256("") for the empty tree."""
    if not leaf_hashes:
        return _EMPTY_ROOT
    # Pairing level by level and promoting an odd last node unchanged gives
    # exactly the RFC's left-balanced tree, without recursion.
    level = list(leaf_hashes)
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(index, D[n]) of RFC 9162 §2.1.3.1."""
    return [root_hash(leaf_hashes[lo:hi]) for lo, hi in inclusion_ranges(index, len(leaf_hashes))]


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """PROOF(old_size, D[n]) of RFC 9162 §2.1.4.1 (empty when old_size is 0 or n)."""
    return [root_hash(leaf_hashes[lo:hi]) for lo, hi in consistency_ranges(old_size, len(leaf_hashes))]


def _check_hash(name: str, value: bytes) -> None:
    if len(value) != HASH_BYTES:
        raise ProofError(f"{name} must be {HASH_BYTES} bytes, got {len(value)}")


def verify_inclusion(leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes],
                     root: bytes) -> None:
    """RFC 9162 §2.1.3.2: raise `ProofError` unless `proof` puts the leaf at `index`."""
    # Bounds and sizes before any hashing.
    if not 0 <= index < tree_size:
        raise ProofError(f"index {index} is outside a tree of size {tree_size}")
    if len(proof) > MAX_PROOF_HASHES:
        raise ProofError(f"proof has {len(proof)} hashes; at most {MAX_PROOF_HASHES} are possible")
    _check_hash("leaf hash", leaf_hash)
    _check_hash("root", root)
    for i, p in enumerate(proof):
        _check_hash(f"proof[{i}]", p)
    # Step 1-2: fn = index, sn = tree_size - 1, r = leaf hash.
    fn, sn, r = index, tree_size - 1, leaf_hash
    # Step 3: fold each proof element in from the side fn's bits say.
    for p in proof:
        if sn == 0:
            raise ProofError("proof is longer than the path from the leaf to the root")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    # Step 4: the path must be complete and end at the root.
    if sn != 0:
        raise ProofError("proof is shorter than the path from the leaf to the root")
    if r != root:
        raise ProofError("computed root does not match the expected root")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """RFC 9162 §2.1.4.2: raise `ProofError` unless the old tree is a prefix of the new."""
    # Bounds and sizes before any hashing.
    if not 0 < old_size <= new_size:
        raise ProofError(f"sizes must satisfy 0 < old_size <= new_size, got {old_size} and {new_size}")
    if len(proof) > MAX_PROOF_HASHES:
        raise ProofError(f"proof has {len(proof)} hashes; at most {MAX_PROOF_HASHES} are possible")
    if old_size == new_size:
        if proof:
            raise ProofError("trees of equal size need an empty proof")
        if old_root != new_root:
            raise ProofError("trees of equal size have different roots")
        return
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    for i, p in enumerate(proof):
        _check_hash(f"proof[{i}]", p)
    # Step 1: an empty path proves nothing.
    if not proof:
        raise ProofError("empty consistency proof for trees of different sizes")
    path = list(proof)
    # Step 2: if old_size is a power of two, its root is the first node.
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    # Step 3: fn = old_size - 1, sn = new_size - 1; drop common right-edge bits.
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # Step 4: both running roots start at the first path node.
    fr = sr = path[0]
    # Step 5: fold in the rest.
    for c in path[1:]:
        if sn == 0:
            raise ProofError("proof is longer than needed")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # Step 6: both roots must come out and the path must be complete.
    if sn != 0:
        raise ProofError("proof is shorter than needed")
    if fr != old_root:
        raise ProofError("proof does not reproduce the old root")
    if sr != new_root:
        raise ProofError("proof does not reproduce the new root")
