"""auditlog.merkle against the transparency-dev/merkle published vectors,
plus property tests over every tree size up to 64."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from auditlog import ProofError
from auditlog.merkle import (
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).parent / "vectors" / "transparency-dev-merkle" / "testdata"


def _load(kind: str) -> list[Any]:
    files = sorted((VECTORS / kind).rglob("*.json"))
    assert len(files) > 50, f"vectors missing under {VECTORS / kind}"
    return [pytest.param(json.loads(f.read_text()), id=str(f.relative_to(VECTORS))) for f in files]


def _b64(items: list[str] | None) -> list[bytes]:
    return [base64.b64decode(x) for x in items or []]


@pytest.mark.parametrize("vector", _load("inclusion"))
def test_inclusion_vectors(vector: dict[str, Any]) -> None:
    args = (base64.b64decode(vector["leafHash"]), vector["leafIdx"], vector["treeSize"],
            _b64(vector["proof"]), base64.b64decode(vector["root"]))
    if vector["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("vector", _load("consistency"))
def test_consistency_vectors(vector: dict[str, Any]) -> None:
    args = (vector["size1"], vector["size2"], base64.b64decode(vector["root1"]),
            base64.b64decode(vector["root2"]), _b64(vector["proof"]))
    if vector["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


# RFC 6962's reference tree of 8 leaves, as published in the CT test suites.
RFC6962_LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243",
                                             "5051525354555657", "606162636465666768696a6b6c6d6e6f")]
RFC6962_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_root_hash_matches_rfc6962_reference_roots() -> None:
    hashes = [leaf_hash(d) for d in RFC6962_LEAVES]
    for size, want in enumerate(RFC6962_ROOTS, start=1):
        assert root_hash(hashes[:size]).hex() == want


def test_empty_tree_root_is_sha256_of_empty_string() -> None:
    assert root_hash([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_node_hash_prefixes_0x01() -> None:
    import hashlib
    assert node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()


def _leaves(n: int) -> list[bytes]:
    return [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


@given(st.integers(1, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))))
def test_every_inclusion_proof_verifies(size_index: tuple[int, int]) -> None:
    size, index = size_index
    leaves = _leaves(size)
    verify_inclusion(leaves[index], index, size, inclusion_proof(leaves, index), root_hash(leaves))


@given(st.integers(1, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_every_consistency_proof_verifies(sizes: tuple[int, int]) -> None:
    new, old = sizes
    leaves = _leaves(new)
    verify_consistency(old, new, root_hash(leaves[:old]), root_hash(leaves), consistency_proof(leaves, old))


@given(st.integers(2, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))),
       st.sampled_from(["proof", "root", "index", "size", "leaf"]), st.data())
def test_any_change_to_an_inclusion_proof_fails(size_index: tuple[int, int], what: str,
                                                data: st.DataObject) -> None:
    size, index = size_index
    leaves = _leaves(size)
    proof, root, leaf = inclusion_proof(leaves, index), root_hash(leaves), leaves[index]
    if what == "proof":
        i = data.draw(st.integers(0, len(proof) - 1))
        proof[i] = bytes([proof[i][0] ^ 1]) + proof[i][1:]
    elif what == "root":
        root = bytes([root[0] ^ 1]) + root[1:]
    elif what == "leaf":
        leaf = leaves[(index + 1) % size]
    elif what == "index":
        index = data.draw(st.integers(0, size - 1).filter(lambda j: j != index))
    else:
        # The proof binds the size only through the path's shape; the signed
        # checkpoint binds size and root together. So change it to one whose path differs.
        size = data.draw(st.integers(index + 1, 2 * size).filter(
            lambda s: len(inclusion_proof(_leaves(s), index)) != len(proof)))
    with pytest.raises(ProofError):
        verify_inclusion(leaf, index, size, proof, root)


@given(st.integers(2, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n - 1))),
       st.sampled_from(["proof", "old_root", "new_root", "old_size", "new_size"]), st.data())
def test_any_change_to_a_consistency_proof_fails(sizes: tuple[int, int], what: str,
                                                 data: st.DataObject) -> None:
    new, old = sizes
    leaves = _leaves(new)
    proof, old_root, new_root = consistency_proof(leaves, old), root_hash(leaves[:old]), root_hash(leaves)
    if what == "proof":
        i = data.draw(st.integers(0, len(proof) - 1))
        proof[i] = bytes([proof[i][0] ^ 1]) + proof[i][1:]
    elif what == "old_root":
        old_root = bytes([old_root[0] ^ 1]) + old_root[1:]
    elif what == "new_root":
        new_root = bytes([new_root[0] ^ 1]) + new_root[1:]
    elif what == "old_size":
        old = data.draw(st.integers(1, new).filter(lambda s: len(consistency_proof(leaves, s)) != len(proof)))
    else:  # as above: a size whose proof has another shape
        new = data.draw(st.integers(old + 1, 2 * new).filter(
            lambda s: len(consistency_proof(_leaves(s), old)) != len(proof)))
    with pytest.raises(ProofError):
        verify_consistency(old, new, old_root, new_root, proof)


def test_index_bounds_are_checked_before_hashing() -> None:
    with pytest.raises(ProofError, match="outside"):
        verify_inclusion(b"x" * 32, 5, 5, [], b"y" * 32)
    with pytest.raises(ProofError, match="at most"):
        verify_inclusion(b"x" * 32, 0, 5, [b"z" * 32] * 1000, b"y" * 32)
