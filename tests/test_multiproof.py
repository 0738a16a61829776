"""auditlog.multiproof: one batched proof for many leaves, checked against RFC 9162 proofs."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from auditlog import ProofError
from auditlog.merkle import inclusion_proof, leaf_hash, root_hash
from auditlog.multiproof import multiproof_ranges, verify_multiproof


def _leaves(size: int) -> list[bytes]:
    return [leaf_hash(b"entry %d" % i) for i in range(size)]


def _proof(leaves: list[bytes], indices: list[int]) -> list[bytes]:
    return [root_hash(leaves[lo:hi]) for lo, hi in multiproof_ranges(indices, len(leaves))]


@st.composite
def _tree_and_indices(draw: st.DrawFn) -> tuple[int, list[int]]:
    size = draw(st.integers(1, 300))
    indices = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=40, unique=True))
    return size, sorted(indices)


@given(_tree_and_indices())
def test_multiproof_verifies_for_any_subset(case: tuple[int, list[int]]) -> None:
    size, indices = case
    leaves = _leaves(size)
    proof = _proof(leaves, indices)
    verify_multiproof([(i, leaves[i]) for i in indices], size, proof, root_hash(leaves))
    assert len(proof) <= len(indices) * max(size.bit_length(), 1)


@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))))
def test_one_leaf_multiproof_holds_exactly_the_rfc_inclusion_proof_nodes(case: tuple[int, int]) -> None:
    size, index = case
    leaves = _leaves(size)
    assert sorted(_proof(leaves, [index])) == sorted(inclusion_proof(leaves, index))


def test_shared_nodes_make_it_smaller_than_a_proof_per_leaf() -> None:
    leaves = _leaves(4096)
    indices = list(range(0, 4096, 37))
    per_leaf = sum(len(inclusion_proof(leaves, i)) for i in indices)
    assert len(_proof(leaves, indices)) < per_leaf / 2


@pytest.fixture
def case() -> tuple[list[bytes], list[int], list[bytes]]:
    leaves = _leaves(100)
    indices = [3, 17, 18, 64, 99]
    return leaves, indices, _proof(leaves, indices)


def test_an_altered_proof_hash_fails(case: tuple[list[bytes], list[int], list[bytes]]) -> None:
    leaves, indices, proof = case
    proof[2] = hashlib.sha256(proof[2]).digest()
    with pytest.raises(ProofError, match="computed root does not match"):
        verify_multiproof([(i, leaves[i]) for i in indices], 100, proof, root_hash(leaves))


def test_an_altered_leaf_fails(case: tuple[list[bytes], list[int], list[bytes]]) -> None:
    leaves, indices, proof = case
    pairs = [(i, leaves[i]) for i in indices]
    pairs[1] = (17, leaf_hash(b"forged"))
    with pytest.raises(ProofError, match="computed root does not match"):
        verify_multiproof(pairs, 100, proof, root_hash(leaves))


def test_a_short_or_long_proof_fails_by_name(case: tuple[list[bytes], list[int], list[bytes]]) -> None:
    leaves, indices, proof = case
    pairs = [(i, leaves[i]) for i in indices]
    with pytest.raises(ProofError, match="too short"):
        verify_multiproof(pairs, 100, proof[:-1], root_hash(leaves))
    with pytest.raises(ProofError, match="too long: 1 of"):
        verify_multiproof(pairs, 100, [*proof, proof[0]], root_hash(leaves))


def test_indices_out_of_order_or_out_of_range_fail_before_hashing(
        case: tuple[list[bytes], list[int], list[bytes]]) -> None:
    leaves, indices, proof = case
    with pytest.raises(ProofError, match="strictly increasing"):
        verify_multiproof([(17, leaves[17]), (3, leaves[3])], 100, proof, root_hash(leaves))
    with pytest.raises(ProofError, match="outside a tree of size 100"):
        verify_multiproof([(100, leaves[0])], 100, proof, root_hash(leaves))
    with pytest.raises(ProofError, match="at least one leaf"):
        verify_multiproof([], 100, proof, root_hash(leaves))
