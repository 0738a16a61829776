"""Per-account key ring: KMS root → account KEK (versioned) → clip DEK.

KEKs are 256-bit random, stored only wrapped by the root with the context
{account_ref, key_version, purpose}. Unwrapped KEKs live in a bounded TTL
cache, so the root is called about once per account per TTL. A DEK is
wrapped by its account's KEK with AES-256-GCM, AAD binding clip id, account
ref and key version.
"""

from __future__ import annotations

import secrets
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, Protocol, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.errors import AccountKeysDestroyed, DekUnwrapError, RetiredKeyVersion, UnknownKeyVersion
from kms.provider import KeyProvider

KEK_BYTES = 32
DEK_BYTES = 32
NONCE_BYTES = 12
DEFAULT_CACHE_TTL_S = 300.0
DEFAULT_CACHE_MAX_ACCOUNTS = 10_000
_KEK_PURPOSE = "account-kek"


def kek_context(account_ref: str, version: int) -> dict[str, str]:
    """The encryption context an account key version is wrapped under by the root."""
    return {"account_ref": account_ref, "key_version": str(version), "purpose": _KEK_PURPOSE}
K = TypeVar("K")
V = TypeVar("V")

__all__ = ["KekRecord", "KekStore", "KeyRing", "NewKek", "WrappedDek"]


@dataclass(frozen=True, kw_only=True)
class KekRecord:
    version: int
    wrapped: bytes
    retired: bool = False


class _Read:
    """One read of an account's keys from the store or the root, in flight: a `KeyRing.forget` of the
    account meanwhile (a crypto-shred, a rotation) makes it stale, and what a stale read found is not
    cached (it may be keys the shred destroyed)."""

    __slots__ = ("__weakref__", "account_ref", "stale")

    def __init__(self, account_ref: str) -> None:
        self.account_ref, self.stale = account_ref, False


@dataclass(frozen=True, kw_only=True)
class NewKek:
    """A key version made and wrapped by the root but not stored yet (`KeyRing.new_kek`): the caller
    stores `record` in its own transaction, with the unit's other writes and audit entry, and once that
    committed hands it back to `KeyRing.stored`."""

    account_ref: str
    record: KekRecord
    # The key ring's own: the unwrapped KEK, and the read a forget of the account before `stored` (a shred)
    # marks stale, which keeps the KEK out of the cache
    _cipher: AESGCM = field(repr=False, compare=False)
    _read: _Read = field(repr=False, compare=False)


class KekStore(Protocol):
    """Where the key ring reads wrapped KEKs (the metadata store implements it). They are written only in
    the caller's units of work (an account's creation, a rotation, a retirement, a crypto-shred), which
    then tell the ring (`KeyRing.stored`, `KeyRing.forget`)."""

    def keks(self, account_ref: str) -> list[KekRecord]: ...

    def is_destroyed(self, account_ref: str) -> bool: ...


class WrappedDek(NamedTuple):
    """A NamedTuple: one is made per clip ingested, and a frozen dataclass cost several times as much."""

    key_version: int
    blob: bytes  # nonce ‖ AES-256-GCM(KEK, DEK)

    def __repr__(self) -> str:
        return f"WrappedDek(key_version={self.key_version})"


def _dek_aad(clip_id: str, account_ref: str, key_version: int) -> bytes:
    # Length-prefixed so no two (clip, account, version) triples share an encoding.
    cid, ref = clip_id.encode(), account_ref.encode()
    return struct.pack(f">H{len(cid)}sH{len(ref)}sI", len(cid), cid, len(ref), ref, key_version)


class _TtlCache(Generic[K, V]):
    """LRU with a time-to-live, bounded in entries."""

    def __init__(self, ttl_s: float, max_entries: int, now: Callable[[], float]) -> None:
        self._ttl, self._max, self._now = ttl_s, max_entries, now
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None or item[0] <= self._now():
            self._items.pop(key, None)
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[1]

    def put(self, key: K, value: V) -> None:
        self._items[key] = (self._now() + self._ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def evict(self, match: Callable[[K], bool]) -> None:
        for key in [k for k in self._items if match(k)]:
            del self._items[key]


class KeyRing:
    """The only door to account keys; see the module docstring."""

    def __init__(self, root: KeyProvider, store: KekStore, *, now: Callable[[], float],
                 cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
                 cache_max_accounts: int = DEFAULT_CACHE_MAX_ACCOUNTS) -> None:
        if cache_ttl_s <= 0 or cache_max_accounts <= 0:
            raise ValueError("cache_ttl_s and cache_max_accounts must be positive")
        self._root = root
        self._store = store
        # An account KEK is cached as its AES-GCM cipher (what wrap and unwrap use): no key setup per clip.
        self._cache: _TtlCache[tuple[str, int], AESGCM] = _TtlCache(cache_ttl_s, cache_max_accounts, now)
        self._versions: _TtlCache[str, list[KekRecord]] = _TtlCache(cache_ttl_s, cache_max_accounts, now)
        self._lock = threading.Lock()
        # Reads in flight (held weakly: one its caller dropped, e.g. on an error, just goes)
        self._reads: weakref.WeakSet[_Read] = weakref.WeakSet()
        self.root_calls = 0

    def __repr__(self) -> str:
        return f"KeyRing(root={self._root!r})"

    @property
    def cache_lookups(self) -> int:
        return self._cache.hits + self._cache.misses

    @property
    def cache_hits(self) -> int:
        return self._cache.hits

    @property
    def cache_hit_ratio(self) -> float:
        total = self._cache.hits + self._cache.misses
        return self._cache.hits / total if total else 0.0

    _context = staticmethod(lambda account_ref, version: kek_context(account_ref, version))

    # -- account keys ------------------------------------------------------
    def _records(self, account_ref: str) -> list[KekRecord]:
        """The account's versions, cached like KEKs: another replica's rotation is seen within one TTL."""
        with self._lock:
            cached = self._versions.get(account_ref)
            if cached is not None:
                return cached
            read = self._reading(account_ref)
        records = self._store.keks(account_ref)
        if not records and self._store.is_destroyed(account_ref):
            raise AccountKeysDestroyed(f"account {account_ref} was crypto-shredded; its clips cannot be opened")
        with self._lock:
            self._reads.discard(read)
            if records and not read.stale:  # else a shred may have come after the read: not cached
                self._versions.put(account_ref, records)
        return records

    def _reading(self, account_ref: str) -> _Read:
        """Under `_lock`: a read of the account's keys begins (before the store or the root is asked)."""
        read = _Read(account_ref)
        self._reads.add(read)
        return read

    def new_kek(self, account_ref: str, version: int) -> NewKek:
        """A fresh KEK for `version`, wrapped by the root (the root call happens here, outside any
        transaction); nothing is stored."""
        with self._lock:
            read = self._reading(account_ref)
        kek = secrets.token_bytes(KEK_BYTES)
        wrapped = self._root.encrypt(kek, self._context(account_ref, version))
        self.root_calls += 1
        return NewKek(account_ref=account_ref, record=KekRecord(version=version, wrapped=wrapped),
                      _cipher=AESGCM(kek), _read=read)

    def stored(self, new: NewKek) -> None:
        """`new` was committed by the caller: the account's cached versions are stale, its KEK is known
        (and cached, unless the account was forgotten, e.g. shredded, since `new_kek`)."""
        with self._lock:
            self._reads.discard(new._read)
            fresh = not new._read.stale
            self._forget_locked(new.account_ref)
            if fresh:
                self._cache.put((new.account_ref, new.record.version), new._cipher)

    def next_version(self, account_ref: str) -> int:
        """The version a rotation would add (one past the newest)."""
        records = self._records(account_ref)
        if not records:
            raise UnknownKeyVersion(f"account {account_ref} has no keys to rotate")
        return max(r.version for r in records) + 1

    def versions(self, account_ref: str) -> list[KekRecord]:
        """The account's key versions (wrapped), oldest first."""
        return sorted(self._records(account_ref), key=lambda r: r.version)

    def active_version(self, account_ref: str) -> int:
        live = [r.version for r in self._records(account_ref) if not r.retired]
        if not live:
            raise UnknownKeyVersion(f"account {account_ref} has no active key")
        return max(live)

    def forget(self, account_ref: str) -> None:
        """Drop the account's cached keys, after the caller's transaction changed them (a crypto-shred, a
        retirement, a rotation that failed or lost its race): the next read asks the store."""
        with self._lock:
            self._forget_locked(account_ref)

    def _forget_locked(self, account_ref: str) -> None:
        self._cache.evict(lambda key: key[0] == account_ref)
        self._versions.evict(lambda key: key == account_ref)
        for read in self._reads:  # what they found may predate the change: they must not cache it
            if read.account_ref == account_ref:
                read.stale = True

    def _kek(self, account_ref: str, version: int) -> AESGCM:
        with self._lock:
            cached = self._cache.get((account_ref, version))
            if cached is not None:
                return cached
            read = self._reading(account_ref)  # before the records: they may come from the cache
        record = next((r for r in self._records(account_ref) if r.version == version), None)
        if record is None:
            raise UnknownKeyVersion(f"account {account_ref} has no key version {version}")
        if record.retired:
            raise RetiredKeyVersion(f"key version {version} of account {account_ref} is retired; "
                                    "rewrap its clips before retiring it")
        kek = AESGCM(self._root.decrypt(record.wrapped, self._context(account_ref, version)))
        self.root_calls += 1
        with self._lock:
            self._reads.discard(read)
            if not read.stale:  # else the account was shredded (or rotated) meanwhile: not cached
                self._cache.put((account_ref, version), kek)
        return kek

    # -- clip data keys ----------------------------------------------------
    def data_key_for(self, account_ref: str, clip_id: str) -> tuple[bytes, WrappedDek]:
        """A fresh random DEK for one clip, and its wrapping under the active KEK."""
        dek = secrets.token_bytes(DEK_BYTES)
        return dek, self.wrap(dek, account_ref=account_ref, clip_id=clip_id)

    def wrap(self, dek: bytes, *, account_ref: str, clip_id: str, key_version: int | None = None) -> WrappedDek:
        if len(dek) != DEK_BYTES:
            raise ValueError(f"dek must be {DEK_BYTES} bytes, got {len(dek)}")
        version = key_version if key_version is not None else self.active_version(account_ref)
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._kek(account_ref, version).encrypt(nonce, dek, _dek_aad(clip_id, account_ref, version))
        return WrappedDek(key_version=version, blob=nonce + sealed)

    def unwrap(self, wrapped: WrappedDek, *, account_ref: str, clip_id: str) -> bytes:
        kek = self._kek(account_ref, wrapped.key_version)
        nonce, sealed = wrapped.blob[:NONCE_BYTES], wrapped.blob[NONCE_BYTES:]
        try:
            return kek.decrypt(nonce, sealed, _dek_aad(clip_id, account_ref, wrapped.key_version))
        except (InvalidTag, ValueError):
            raise DekUnwrapError(f"data key of clip {clip_id} does not open under account {account_ref} "
                                 f"key version {wrapped.key_version}") from None

    def rewrap(self, wrapped: WrappedDek, *, account_ref: str, clip_id: str) -> WrappedDek:
        """Move a DEK to the active version without touching the clip's audio."""
        active = self.active_version(account_ref)
        if wrapped.key_version == active:
            return wrapped
        dek = self.unwrap(wrapped, account_ref=account_ref, clip_id=clip_id)
        return self.wrap(dek, account_ref=account_ref, clip_id=clip_id, key_version=active)
