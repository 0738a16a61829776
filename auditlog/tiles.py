"""The log as C2SP tlog-tiles: writing tiles and verifying a log from them.

Layout under a prefix: `checkpoint`; `tile/<L>/<N>[.p/<W>]` (256 hashes of
32 bytes; level 0 holds leaf hashes, level L+1 the Merkle tree hash of each
full level-L tile); `tile/entries/<N>[.p/<W>]` (the entries, each a big-endian
uint16 length then its bytes). `<N>` is written in 3-digit groups, all but
the last prefixed with `x` (1234067 -> x001/x234/067). Partial tiles (width
W < 256) exist for each published size and are never hashed upward.

Verifying from size M (0, or a checkpoint verified before) to the new
checkpoint's size N: (1) open the checkpoint (log key, witness quorum);
(2) N >= M, else rolled back; (3) hash entries [M, N), check seq and prev,
compare with the level-0 tiles; (4) every full tile touched by [M, N) hashes
to its entry one level up; (5) the root of size M computed from these tiles
equals the one verified before (else forked); (6) the root of size N computed
from them equals the checkpoint's. Work and reads are O(N - M + log N).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from auditlog.access import AccountChains
from auditlog.entry import GENESIS_PREV, chain_link, parse_entry
from auditlog.errors import CheckpointError, EntryError, VerificationError
from auditlog.merkle import HASH_BYTES, perfect_root, root_hash

__all__ = ["TILE_WIDTH", "TileError", "TileWriter", "bundle_entries", "entries_path", "parse_bundle",
           "tile_path", "tree_root", "verify_range"]

TILE_WIDTH = 256
TILE_BYTES = TILE_WIDTH * HASH_BYTES
MAX_LEVELS = 8  # 256**8 = 2**64 entries
_sha256 = hashlib.sha256


class TileError(VerificationError):
    """A tile or entry bundle is missing, malformed, or does not hash as the tree says."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _index(n: int) -> str:
    groups = [f"{n % 1000:03d}"]
    while n >= 1000:
        n //= 1000
        groups.append(f"x{n % 1000:03d}")
    return "/".join(reversed(groups))


def tile_path(level: int, n: int, width: int = TILE_WIDTH) -> str:
    if not 0 <= level <= 63 or n < 0 or not 1 <= width <= TILE_WIDTH:
        raise ValueError(f"no tile at level {level}, index {n}, width {width}")
    return f"tile/{level}/{_index(n)}" + (f".p/{width}" if width < TILE_WIDTH else "")


def entries_path(n: int, width: int = TILE_WIDTH) -> str:
    if n < 0 or not 1 <= width <= TILE_WIDTH:
        raise ValueError(f"no entry bundle at index {n}, width {width}")
    return f"tile/entries/{_index(n)}" + (f".p/{width}" if width < TILE_WIDTH else "")


def bundle_entries(entries: Iterable[bytes]) -> bytes:
    out = bytearray()
    for e in entries:
        if len(e) > 0xFFFF:
            raise ValueError(f"an entry bundle holds entries up to 65535 bytes, got {len(e)}")
        out += len(e).to_bytes(2, "big") + e
    return bytes(out)


def parse_bundle(data: bytes, path: str) -> list[bytes]:
    out: list[bytes] = []
    append, i, n = out.append, 0, len(data)
    try:
        while i < n:
            j = i + 2 + (data[i] << 8 | data[i + 1])
            if j > n:
                raise TileError(path, "entry runs past the end of the bundle")
            append(data[i + 2:j])
            i = j
    except IndexError:
        raise TileError(path, "truncated length prefix") from None
    return out


def _mth(hashes: Sequence[bytes]) -> bytes:
    """Merkle tree hash of 2**k hashes (a full tile, or an aligned piece of one)."""
    level = list(hashes)
    while len(level) > 1:
        level = [_sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level[0]


@dataclass
class TileWriter:
    """Turns appended entries into tile files; `flush()` adds the partial tiles of the current size.

    Holds only the unfinished tile of each level and the unfinished bundle: at
    most 256 hashes per level and 255 entries.
    """

    size: int = 0
    levels: list[list[bytes]] = field(default_factory=list)  # the partial tile of each level
    bundle: list[bytes] = field(default_factory=list)

    @classmethod
    def resume(cls, size: int, read: Callable[[str], bytes]) -> TileWriter:
        """Continue after a published size: read back that size's partial tiles and bundle."""
        writer = cls(size=size)
        level, count = 0, size
        while count:
            width = count % TILE_WIDTH
            data = read(tile_path(level, count // TILE_WIDTH, width)) if width else b""
            if len(data) != width * HASH_BYTES:
                raise TileError(tile_path(level, count // TILE_WIDTH, max(width, 1)), "wrong length to resume from")
            writer.levels.append([data[i:i + HASH_BYTES] for i in range(0, len(data), HASH_BYTES)])
            level, count = level + 1, count // TILE_WIDTH
        if size % TILE_WIDTH:
            path = entries_path(size // TILE_WIDTH, size % TILE_WIDTH)
            writer.bundle = parse_bundle(read(path), path)
        return writer

    def append(self, entries: Iterable[bytes]) -> list[tuple[str, bytes]]:
        """Add entries; returns the full tiles and bundles they complete (immutable files)."""
        files: list[tuple[str, bytes]] = []
        for entry in entries:
            self.bundle.append(entry)
            if len(self.bundle) == TILE_WIDTH:
                files.append((entries_path(self.size // TILE_WIDTH), bundle_entries(self.bundle)))
                self.bundle = []
            h, level = _sha256(b"\x00" + entry).digest(), 0
            while True:
                if level == len(self.levels):
                    self.levels.append([])
                tile = self.levels[level]
                tile.append(h)
                if len(tile) < TILE_WIDTH:
                    break
                index = (self.size >> (8 * (level + 1)))
                files.append((tile_path(level, index), b"".join(tile)))
                h, self.levels[level], level = _mth(tile), [], level + 1
            self.size += 1
        return files

    def flush(self) -> list[tuple[str, bytes]]:
        """The partial tiles and bundle of the current size (each at its own, immutable path)."""
        files = []
        for level, tile in enumerate(self.levels):
            if tile:
                files.append((tile_path(level, self.size >> (8 * (level + 1)), len(tile)), b"".join(tile)))
        if self.bundle:
            files.append((entries_path(self.size // TILE_WIDTH, len(self.bundle)), bundle_entries(self.bundle)))
        return files


class _Tiles:
    """Reads tiles of a tree of size `size` once each, checking their length."""

    def __init__(self, read: Callable[[str], bytes], size: int) -> None:
        self._read, self.size, self._cache = read, size, {}  # type: ignore[var-annotated]

    def width(self, level: int, n: int) -> int:
        return min(TILE_WIDTH, (self.size >> (8 * level)) - n * TILE_WIDTH)

    def forget(self, level: int, n: int) -> None:
        self._cache.pop((level, n), None)

    def raw(self, level: int, n: int) -> bytes:
        key = (level, n)
        if key not in self._cache:
            width = self.width(level, n)
            if width <= 0:
                raise ValueError(f"tile {level}/{n} is outside a tree of size {self.size}")
            path = tile_path(level, n, width)
            try:
                data = self._read(path)
            except FileNotFoundError:
                if width == TILE_WIDTH:
                    raise TileError(path, "missing") from None
                try:  # the spec's fallback once the full tile exists
                    data = self._read(tile_path(level, n))[:width * HASH_BYTES]
                except FileNotFoundError:
                    raise TileError(path, "missing") from None
            if len(data) != width * HASH_BYTES:
                raise TileError(path, f"is {len(data)} bytes, want {width * HASH_BYTES}")
            self._cache[key] = data
        raw: bytes = self._cache[key]
        return raw

    def get(self, level: int, n: int) -> list[bytes]:
        raw = self.raw(level, n)
        return [raw[i:i + HASH_BYTES] for i in range(0, len(raw), HASH_BYTES)]


def _root_from(tiles: _Tiles, size: int) -> bytes:
    """MTH of the first `size` leaves, from the hashes in `tiles` (size <= tiles.size)."""
    if size == 0:
        return root_hash([])
    subtrees, offset = [], 0
    for bit in range(size.bit_length() - 1, -1, -1):
        if not size >> bit & 1:
            continue
        level, r = divmod(bit, 8)
        first = offset >> (8 * level)
        tile = tiles.get(level, first // TILE_WIDTH)
        subtrees.append(_mth(tile[first % TILE_WIDTH:first % TILE_WIDTH + (1 << r)]))
        offset += 1 << bit
    root = subtrees[-1]
    for left in reversed(subtrees[:-1]):
        root = _sha256(b"\x01" + left + root).digest()
    return root


def tree_root(read: Callable[[str], bytes], size: int) -> bytes:
    """The root of a tree of `size` leaves computed from its tiles alone (no entries)."""
    return _root_from(_Tiles(read, size), size)


@dataclass(frozen=True)
class RangeResult:
    old_size: int
    size: int
    root: bytes
    last_leaf: bytes  # the leaf hash of entry size-1: what entry `size` must link to


def verify_range(read: Callable[[str], bytes], *, old_size: int, old_root: bytes, old_last_leaf: bytes,
                 size: int, root: bytes, progress: Callable[[int], None] = lambda done: None,
                 chains: AccountChains | None = None) -> RangeResult:
    """Steps 2-6 of the module plan; raises `EntryError`, `TileError` or `CheckpointError`. With `chains`,
    every new entry also goes through the account-chain check (`auditlog.access`), which needs the log
    from entry 0 on."""
    # (2)
    if size < old_size:
        raise CheckpointError(f"rolled back: the log was verified at size {old_size}, its checkpoint now says {size}")
    tiles = _Tiles(read, size)
    # (5) first: a fork is the finding, whatever else is wrong after it
    if old_size and _root_from(tiles, old_size) != old_root:
        raise CheckpointError(f"forked: the first {old_size} entries differ from the log verified before")
    # (3)
    prev = old_last_leaf.hex().encode() if old_size else GENESIS_PREV.encode()
    leaf = old_last_leaf
    for b in range(old_size // TILE_WIDTH, -(-size // TILE_WIDTH) if size > old_size else 0):
        width = min(TILE_WIDTH, size - b * TILE_WIDTH)
        path = entries_path(b, width)
        try:
            entries = parse_bundle(read(path), path)
        except FileNotFoundError:
            raise TileError(path, "missing") from None
        if len(entries) != width:
            raise TileError(path, f"holds {len(entries)} entries, want {width}")
        level0 = tiles.raw(0, b)
        start = max(old_size - b * TILE_WIDTH, 0)
        todo = entries[start:]
        # Hash the bundle in one pass and compare with the tile in one comparison; the
        # per-entry work is only for pinpointing a defect.
        leaves = [_sha256(b"\x00" + data).digest() for data in todo]
        links = [prev, *(h.hex().encode() for h in leaves[:-1])]
        first = b * TILE_WIDTH + start
        for k, data in enumerate(todo):
            if b'"prev":"' + links[k] + b'","request_id":' not in data or \
                    b',"seq":%d,"target":' % (first + k) not in data:
                index = first + k
                parse_entry(data, index)  # names a malformed entry
                seq, entry_prev = chain_link(data)
                if seq != index:
                    raise EntryError(index, f"seq is {seq}, expected {index}")
                raise EntryError(max(index - 1, 0), f"edited: its hash no longer matches entry {index}'s prev")
        if b"".join(leaves) != level0[start * HASH_BYTES:]:
            k = next(k for k, h in enumerate(leaves) if h != level0[(start + k) * HASH_BYTES:][:HASH_BYTES])
            raise EntryError(first + k, f"its hash differs from the one in {tile_path(0, b, width)}")
        if chains is not None:
            for k, data in enumerate(todo):
                chains.check(data, first + k)
        if leaves:
            leaf = leaves[-1]
            prev = leaf.hex().encode()
        if width == TILE_WIDTH:  # (4) for level 0, while the tile is at hand; then let it go
            parent = tiles.get(1, b // TILE_WIDTH)
            if perfect_root(level0) != parent[b % TILE_WIDTH]:
                raise TileError(tile_path(0, b), f"does not hash to entry {b % TILE_WIDTH} of "
                                                 f"{tile_path(1, b // TILE_WIDTH, len(parent))}")
        tiles.forget(0, b)
        progress(min((b + 1) * TILE_WIDTH, size) - old_size)
    # (4) for the levels above
    level = 1
    while size >> (8 * (level + 1)):
        for n in range(old_size >> (8 * (level + 1)), size >> (8 * (level + 1))):  # full tiles touched
            parent = tiles.get(level + 1, n // TILE_WIDTH)
            if perfect_root(tiles.raw(level, n)) != parent[n % TILE_WIDTH]:
                raise TileError(tile_path(level, n), f"does not hash to entry {n % TILE_WIDTH} of "
                                                     f"{tile_path(level + 1, n // TILE_WIDTH, len(parent))}")
        level += 1
    # (6)
    if _root_from(tiles, size) != root:
        raise CheckpointError("the tiles do not hash to the checkpoint's root")
    return RangeResult(old_size=old_size, size=size, root=root, last_leaf=leaf if size else b"")
