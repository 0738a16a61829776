"""The log as this process recomputed it from entry bytes: the signer's only source of hashes.

Whoever can write the database can delete an entry, re-chain the rest, rebuild `audit_tiles` and
reset `audit_head`; a signer that took its hashes from those tables would sign the forgery. So each
process keeps its own Merkle tree, built from leaf hashes it computed itself: of the entries it
wrote, and of other replicas' entries read back and checked to chain on (seq and prev, the rule
`auditlog verify --tiles` applies). It never reads `audit_tiles`.

Memory: the tree above 256-entry blocks (one tlog tile) is kept, 32 bytes per 256 entries (about
2.5 MiB for 10 million entries with the levels above), plus the leaf hashes of the unfinished
block and of the block finished last (the next checkpoint's consistency proof starts in it, mostly).
A node inside an earlier block is recomputed from that block's entries, which must still hash to
the block hash kept here. The writer stores the tiles the proofs served to clients read
(schema.audit_tiles) from this tree (`tiles`), never the other way round.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence

from auditlog.entry import GENESIS_PREV
from auditlog.merkle import HASH_BYTES, node_hash, perfect_root, root_hash, subtree_levels
from auditlog.tree import consistency_ranges, perfect_subtrees

BLOCK_LEVEL = 8
BLOCK_ENTRIES = 1 << BLOCK_LEVEL
CACHED_BLOCKS = 8  # 64 KiB: a checkpoint every 1,000 entries proves from within the last four blocks
_sha256 = hashlib.sha256


def _mth(hashes: Sequence[bytes]) -> bytes:
    """Merkle tree hash of 2**k hashes (a block, or an aligned part of one)."""
    return perfect_root(b"".join(hashes))


class HistoryRewritten(Exception):
    """The stored log is not an extension of what this process wrote, read, signed or published.

    `kind`: "shrink" (fewer entries than already seen), "fork" (entries already seen now hash
    differently) or "mismatch" (the stored log contradicts itself or a signed checkpoint)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def recompute(entries: Sequence[bytes], first: int, prev_leaf: bytes) -> list[bytes]:
    """Leaf hashes of entries [first, first + n), each checked to carry its own index and the hash of
    the entry before it (`prev_leaf`; empty before entry 0), as the tiles verifier checks them."""
    prev = prev_leaf.hex().encode() if prev_leaf else GENESIS_PREV.encode()
    leaves = []
    for index, data in enumerate(entries, first):
        if b'"prev":"' + prev + b'","request_id":' not in data or b',"seq":%d,"target":' % index not in data:
            kind = "fork" if index == first and first else "mismatch"
            raise HistoryRewritten(kind, f"stored entry {index} does not carry seq {index} and the hash of "
                                         f"entry {index - 1}")
        leaf = _sha256(b"\x00" + data).digest()
        leaves.append(leaf)
        prev = leaf.hex().encode()
    return leaves


class RecomputedTree:
    """An append-only Merkle tree of recomputed leaf hashes; `read_entries(start, n)` reaches back
    into the stored log for nodes inside a finished block."""

    def __init__(self, read_entries: Callable[[int, int], list[bytes]]) -> None:
        self._read = read_entries
        self._lock = threading.RLock()  # head() holds it across the nodes it reads
        self.size = 0
        self.last_leaf = b""  # leaf hash of entry size - 1: what entry `size` must link to
        self._tail: list[bytes] = []  # leaf hashes of the unfinished block
        self._levels: list[bytearray] = []  # [k]: roots of the perfect subtrees of 256 * 2**k leaves
        self._blocks: dict[int, list[bytes]] = {}  # leaf hashes of recent blocks (at most CACHED_BLOCKS)
        # block -> (its leaf hashes, their block hash) as `tiles` computed them, for append to take when
        # it fills that block with the same leaves (the batch committed), not to hash them again
        self._tops: dict[int, tuple[bytes, bytes]] = {}

    def append(self, leaves: Sequence[bytes]) -> None:
        """Add leaf hashes the caller computed from entries [size, size + n)."""
        if not leaves:
            return
        with self._lock:
            for leaf in leaves:
                self._tail.append(leaf)
                if len(self._tail) == BLOCK_ENTRIES:
                    block = len(self._levels[0]) // HASH_BYTES if self._levels else 0
                    raw = b"".join(self._tail)
                    known = self._tops.get(block)
                    self._push(known[1] if known is not None and known[0] == raw else perfect_root(raw))
                    self._remember(block, self._tail)  # the next checkpoint's proofs start in a recent block
                    self._tail = []
            self._tops.clear()
            self.size += len(leaves)
            self.last_leaf = leaves[-1]

    def tiles(self, leaves: Sequence[bytes]) -> list[tuple[int, int, bytes, bytes | None]]:
        """The stored tiles (level, idx, hashes, nodes) that appending `leaves` fills or grows, in the shape
        of schema.audit_tiles: each level-0 tile it fills, and each tile above that gains a hash, whole as
        far as it goes. Computed from this tree, which is not changed (the caller appends once they commit)."""
        rows: list[tuple[int, int, bytes, bytes | None]] = []
        with self._lock:
            tile, tail = self.size >> BLOCK_LEVEL, list(self._tail)
            tops: list[bytes] = []  # the level-8 hashes of the level-0 tiles filled
            first = tile  # index of tops[0] on its level
            for leaf in leaves:
                tail.append(leaf)
                if len(tail) == BLOCK_ENTRIES:
                    raw = b"".join(tail)
                    tops.append(_stored_tile(rows, 0, tile, raw))
                    self._tops[tile] = (raw, tops[-1])
                    tile, tail = tile + 1, []
            if tail:
                # The unfinished leaf tile as far as it goes (its nodes are hashed up when read): proofs are
                # served from the leaf hashes written with the entries, never from entries read back, so an
                # entry edited in the database cannot change the proofs of the entries beside it.
                rows.append((0, tile, b"".join(tail), None))
            tile_level = 1
            while tops:
                k = BLOCK_LEVEL * (tile_level - 1)  # self._levels[k]: every node of tree level 8 * tile_level
                below = self._levels[k] if k < len(self._levels) else bytearray()
                tile = first >> BLOCK_LEVEL
                hashes, filled = bytes(below[tile * BLOCK_ENTRIES * HASH_BYTES:first * HASH_BYTES]), []
                for h in tops:
                    hashes += h
                    if len(hashes) == BLOCK_ENTRIES * HASH_BYTES:
                        filled.append(_stored_tile(rows, tile_level, tile, hashes))
                        tile, hashes = tile + 1, b""
                if hashes:
                    _stored_tile(rows, tile_level, tile, hashes)
                tops, first, tile_level = filled, first >> BLOCK_LEVEL, tile_level + 1
        return rows

    def _push(self, h: bytes) -> None:
        k = 0
        while True:
            if k == len(self._levels):
                self._levels.append(bytearray())
            level = self._levels[k]
            level += h
            if len(level) // HASH_BYTES % 2:
                return
            h, k = node_hash(bytes(level[-2 * HASH_BYTES:-HASH_BYTES]), bytes(level[-HASH_BYTES:])), k + 1

    def _node(self, level: int, index: int) -> bytes:
        """The root of the perfect subtree over leaves [index * 2**level, (index + 1) * 2**level)."""
        lo, width = index << level, 1 << level
        with self._lock:
            if lo + width > self.size:
                raise ValueError(f"leaves [{lo}, {lo + width}) are beyond the {self.size} recomputed")
            if level >= BLOCK_LEVEL:
                return bytes(self._levels[level - BLOCK_LEVEL][index * HASH_BYTES:(index + 1) * HASH_BYTES])
            block, offset = lo >> BLOCK_LEVEL, lo % BLOCK_ENTRIES
            if block == self.size >> BLOCK_LEVEL:
                return _mth(self._tail[offset:offset + width])
            expected = bytes(self._levels[0][block * HASH_BYTES:(block + 1) * HASH_BYTES])
        return _mth(self._block(block, expected)[offset:offset + width])

    def _block(self, block: int, expected: bytes) -> list[bytes]:
        """Leaf hashes of a finished block, recomputed from its stored entries."""
        cached = self._blocks.get(block)
        if cached is not None:
            return cached
        first = block * BLOCK_ENTRIES
        entries = self._read(first, BLOCK_ENTRIES)
        if len(entries) != BLOCK_ENTRIES:
            raise HistoryRewritten("shrink", f"entries {first}..{first + BLOCK_ENTRIES - 1} are no longer all stored")
        leaves = [_sha256(b"\x00" + e).digest() for e in entries]
        if _mth(leaves) != expected:
            raise HistoryRewritten("fork", f"stored entries {first}..{first + BLOCK_ENTRIES - 1} no longer hash to "
                                           "what this process recomputed from them")
        self._remember(block, leaves)
        return leaves

    def leaves(self, start: int, end: int) -> bytes | None:
        """Leaf hashes [start, end), concatenated, if all are still in memory (the unfinished block and the
        blocks remembered); else None."""
        with self._lock:
            if not 0 <= start <= end <= self.size:
                return None
            parts = []
            for block in range(start >> BLOCK_LEVEL, -(-end >> BLOCK_LEVEL)):
                leaves = self._tail if block == self.size >> BLOCK_LEVEL else self._blocks.get(block)
                if leaves is None:
                    return None
                first = block << BLOCK_LEVEL
                parts.append(b"".join(leaves[max(start - first, 0):end - first]))
            return b"".join(parts)

    def _remember(self, block: int, leaves: list[bytes]) -> None:
        self._blocks[block] = leaves
        while len(self._blocks) > CACHED_BLOCKS:
            del self._blocks[min(self._blocks)]

    def _range_root(self, lo: int, hi: int) -> bytes:
        hashes = [self._node(level, index) for level, index in perfect_subtrees(lo, hi)]
        root = hashes[-1]
        for left in reversed(hashes[:-1]):
            root = node_hash(left, root)
        return root

    def head(self) -> tuple[int, bytes, bytes]:
        """(size, root, last leaf hash), consistent with each other; from memory only."""
        with self._lock:
            return self.size, self.root(self.size), self.last_leaf

    def root(self, size: int) -> bytes:
        return self._range_root(0, size) if size else root_hash([])

    def subtrees(self, size: int) -> list[bytes]:
        """The perfect subtrees of [0, size), left to right (a compact range)."""
        return [self._node(level, index) for level, index in perfect_subtrees(0, size)]

    def consistency_proof(self, old_size: int, size: int) -> list[bytes]:
        """RFC 9162 PROOF(old_size, D[size]) from recomputed hashes."""
        return [self._range_root(lo, hi) for lo, hi in consistency_ranges(old_size, size)]


def _stored_tile(rows: list[tuple[int, int, bytes, bytes | None]], level: int, idx: int, hashes: bytes) -> bytes:
    """Add the tile's row (its hashes, and the 7 levels of nodes above them within it: schema.audit_tiles);
    returns the node over all of it (the tile's hash one level up; meaningful once the tile is full)."""
    levels = subtree_levels(hashes, BLOCK_LEVEL)
    rows.append((level, idx, hashes, b"".join(levels[1:BLOCK_LEVEL])))
    return levels[BLOCK_LEVEL]
