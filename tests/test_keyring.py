"""Root providers (LocalKms, AwsKms on moto) and the per-account key ring."""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from clipstore.app import App
from clipstore.envelope import open_clip, seal_clip
from clipstore.errors import EnvelopeError
from clipstore.store import Database
from clipstore.store.keys import KekRows, SqlKekStore, destroy_keks
from clipstore.unit import OPERATOR
from kms import (
    AccountKeysDestroyed,
    AwsKms,
    DataKey,
    DekUnwrapError,
    EncryptionContext,
    KekRecord,
    KeyProvider,
    KeyRing,
    KmsAccessDenied,
    KmsDecryptError,
    KmsUnavailable,
    LocalKms,
    RetiredKeyVersion,
    UnknownKeyVersion,
    WrappedDek,
)
from tests.conftest import FakeClock, make_config

CTX = {"account_ref": "acct_1", "key_version": "1", "purpose": "account-kek"}


@pytest.fixture(params=["local", "aws-in-process", "aws-server"])
def provider(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyProvider]:
    if request.param == "local":
        yield LocalKms.from_file(tmp_path / "root.key")
    elif request.param == "aws-in-process":
        with mock_aws():
            key_id = boto3.client("kms").create_key()["KeyMetadata"]["KeyId"]
            yield AwsKms(key_id)
    else:
        endpoint = request.getfixturevalue("moto_endpoint")
        key_id = boto3.client("kms", endpoint_url=endpoint).create_key()["KeyMetadata"]["KeyId"]
        yield AwsKms(key_id, endpoint_url=endpoint)


# -- the provider contract, run against every provider -----------------------------
def test_provider_round_trip(provider: KeyProvider) -> None:
    secret = secrets.token_bytes(32)
    assert provider.decrypt(provider.encrypt(secret, CTX), CTX) == secret


def test_provider_rejects_wrong_context(provider: KeyProvider) -> None:
    blob = provider.encrypt(b"k" * 32, CTX)
    with pytest.raises(KmsDecryptError):
        provider.decrypt(blob, {**CTX, "account_ref": "acct_2"})


def test_provider_rejects_tampered_blob(provider: KeyProvider) -> None:
    blob = bytearray(provider.encrypt(b"k" * 32, CTX))
    blob[-1] ^= 1
    with pytest.raises(KmsDecryptError):
        provider.decrypt(bytes(blob), CTX)


def test_provider_generates_data_keys(provider: KeyProvider) -> None:
    key = provider.generate_data_key(CTX)
    assert len(key.plaintext) == 32 and provider.decrypt(key.wrapped, CTX) == key.plaintext
    assert key.plaintext.hex() not in repr(key)


def test_local_root_key_file_is_0600_and_refused_when_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    LocalKms.from_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        LocalKms.from_file(path)


def test_aws_missing_key_is_access_denied() -> None:
    # moto does not enforce a disabled key's state; a key that does not exist is refused the same way.
    with mock_aws(), pytest.raises(KmsAccessDenied, match="NotFoundException"):
        AwsKms("11111111-2222-3333-4444-555555555555").encrypt(b"k" * 32, CTX)


def test_aws_unreachable_endpoint_is_unavailable() -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        kms = AwsKms("alias/x", endpoint_url=f"http://127.0.0.1:{port}", retry_attempts=1)
        with pytest.raises(KmsUnavailable):
            kms.encrypt(b"k" * 32, CTX)


# -- the key ring ---------------------------------------------------------------------
# Accounts get, rotate, retire and shred their keys as the service does: through the units of work of
# `AccountDirectory` (PutClip's account creation, RotateAccountKey, `clipstore keys retire`, DeleteAccount).
@pytest.fixture
def app(tmp_path: Path, clock: FakeClock) -> Iterator[App]:
    app = App(make_config(tmp_path / "data"), clock=clock)
    yield app
    app.close()


@pytest.fixture
def ring(app: App) -> KeyRing:
    return app.keyring


def _account(app: App, account_id: str) -> str:
    """A new account and its first key version (as a PutClip makes one); its account_ref."""
    return app.accounts.find_or_create(account_id).account_ref


def _seal(ring: KeyRing, account: str, clip: str, plaintext: bytes) -> tuple[bytes, WrappedDek]:
    dek, wrapped = ring.data_key_for(account, clip)
    return b"".join(seal_clip(dek, [plaintext], clip_id=clip, account_ref=account)), wrapped


def _open(ring: KeyRing, account: str, clip: str, ciphertext: bytes, wrapped: WrappedDek) -> bytes:
    dek = ring.unwrap(wrapped, account_ref=account, clip_id=clip)
    return b"".join(open_clip(dek, [ciphertext], clip_id=clip, account_ref=account))


def test_root_is_called_about_once_per_account_per_ttl(app: App, ring: KeyRing) -> None:
    accounts = [_account(app, f"account-{i:03d}") for i in range(100)]
    ring.root_calls = 0
    ring._cache._items.clear()  # start cold: every account must be unwrapped once
    for n in range(10_000):
        account = accounts[n % 100]
        dek, wrapped = ring.data_key_for(account, f"c_{n}")
        assert ring.unwrap(wrapped, account_ref=account, clip_id=f"c_{n}") == dek
    assert ring.root_calls <= 100
    assert ring.cache_hit_ratio > 0.99


def test_cache_expires_after_ttl(app: App, ring: KeyRing, clock: FakeClock) -> None:
    ref = _account(app, "alice")
    ring.data_key_for(ref, "c_1")
    calls = ring.root_calls
    clock.t += 301
    ring.data_key_for(ref, "c_2")
    assert ring.root_calls == calls + 1


def test_rotate_rewrap_retire_keeps_every_clip_readable(app: App, ring: KeyRing) -> None:
    ref = _account(app, "alice")
    clips = {f"c_{i}": secrets.token_bytes(1000 + i) for i in range(5)}
    sealed = {cid: _seal(ring, ref, cid, pt) for cid, pt in clips.items()}
    assert app.accounts.rotate_key("alice", OPERATOR)[0] == 2
    rewrapped = {cid: (ct, ring.rewrap(w, account_ref=ref, clip_id=cid)) for cid, (ct, w) in sealed.items()}
    assert all(w.key_version == 2 for _, w in rewrapped.values())
    assert app.accounts.retire_key_versions("alice", 2, OPERATOR) == 1
    for cid, (ct, wrapped) in rewrapped.items():
        assert _open(ring, ref, cid, ct, wrapped) == clips[cid]  # audio untouched, still readable
    ct, old = sealed["c_0"]
    with pytest.raises(RetiredKeyVersion):
        _open(ring, ref, "c_0", ct, old)


def test_unknown_key_version_is_refused(app: App, ring: KeyRing) -> None:
    ref = _account(app, "alice")
    with pytest.raises(UnknownKeyVersion):
        ring.wrap(b"d" * 32, account_ref=ref, clip_id="c_1", key_version=7)


def test_wrong_key_version_does_not_unwrap(app: App, ring: KeyRing) -> None:
    ref = _account(app, "alice")
    _, wrapped = ring.data_key_for(ref, "c_1")
    app.accounts.rotate_key("alice", OPERATOR)
    with pytest.raises(DekUnwrapError):
        ring.unwrap(WrappedDek(key_version=2, blob=wrapped.blob), account_ref=ref, clip_id="c_1")


def test_wrapped_dek_is_bound_to_clip_and_account(app: App, ring: KeyRing) -> None:
    a, b = _account(app, "alice"), _account(app, "bob")
    _, wrapped = ring.data_key_for(a, "c_1")
    with pytest.raises(DekUnwrapError):
        ring.unwrap(wrapped, account_ref=a, clip_id="c_2")
    with pytest.raises(DekUnwrapError):
        ring.unwrap(wrapped, account_ref=b, clip_id="c_1")


def test_crypto_shred_makes_a_copy_taken_before_unopenable(app: App, ring: KeyRing) -> None:
    gone, kept = _account(app, "gone"), _account(app, "kept")
    backup = _seal(ring, gone, "c_1", b"secret audio")  # a copy, as a backup would hold
    other = _seal(ring, kept, "c_2", b"other audio")
    app.accounts.delete_account("gone", OPERATOR)
    with pytest.raises(AccountKeysDestroyed):
        _open(ring, gone, "c_1", *backup)
    assert _open(ring, kept, "c_2", *other) == b"other audio"  # no other account touched


def test_an_object_moved_to_another_account_does_not_open(app: App, ring: KeyRing) -> None:
    a, b = _account(app, "alice"), _account(app, "bob")
    ciphertext, _ = _seal(ring, a, "c_1", b"audio")
    dek_b, _ = ring.data_key_for(b, "c_1")
    with pytest.raises(EnvelopeError):
        b"".join(open_clip(dek_b, [ciphertext], clip_id="c_1", account_ref=b))


def test_key_material_is_never_in_reprs(app: App, ring: KeyRing) -> None:
    ref = _account(app, "alice")
    dek, wrapped = ring.data_key_for(ref, "c_1")
    assert dek.hex() not in repr(wrapped) and wrapped.blob.hex() not in repr(wrapped)
    assert "LocalKms(<root key hidden>)" in repr(ring)


def test_key_rows_and_tombstones_are_dated_by_the_injected_clock(tmp_path: Path, database_url: str | None) -> None:
    """Before, an account's KEK row and its crypto-shred tombstone were dated by time.time(), not the
    service's clock: an injected clock (tests, replays) disagreed with them."""
    import sqlalchemy as sa

    from clipstore.store import schema
    clock = FakeClock(1_500_000_000.0)
    app = App(make_config(tmp_path / "d", database_url=database_url), clock=clock)
    try:
        ref = _account(app, "alice")
        with app.db.read() as conn:
            created = conn.execute(sa.select(schema.account_keys.c.created_at).where(
                schema.account_keys.c.account_ref == ref)).scalar_one()
        clock.advance(60)
        app.accounts.delete_account("alice", OPERATOR)
        with app.db.read() as conn:
            destroyed = conn.execute(sa.select(schema.account_key_tombstones.c.destroyed_at).where(
                schema.account_key_tombstones.c.account_ref == ref)).scalar_one()
        assert (created, destroyed) == (1_500_000_000.0, 1_500_000_060.0)
    finally:
        app.close()


# -- a crypto-shred against a read in flight ---------------------------------------------
class _Pause:
    """Stops the first call it is armed for after its work, until the test lets it go."""

    def __init__(self) -> None:
        self.armed = False
        self.reached, self.go = threading.Event(), threading.Event()

    def __call__(self) -> None:
        if self.armed:
            self.armed = False
            self.reached.set()
            assert self.go.wait(10)


class _PausingStore(SqlKekStore):
    def __init__(self, db: Database, pause: _Pause) -> None:
        super().__init__(db)
        self.pause = pause

    def keks(self, account_ref: str) -> list[KekRecord]:
        records = super().keks(account_ref)  # read before the shred ...
        self.pause()  # ... handed back after it
        return records


class _PausingRoot:
    def __init__(self, root: LocalKms, pause: _Pause) -> None:
        self._root, self.pause = root, pause

    def encrypt(self, plaintext: bytes, context: EncryptionContext) -> bytes:
        return self._root.encrypt(plaintext, context)

    def decrypt(self, blob: bytes, context: EncryptionContext) -> bytes:
        kek = self._root.decrypt(blob, context)
        self.pause()
        return kek

    def generate_data_key(self, context: EncryptionContext) -> DataKey:
        return self._root.generate_data_key(context)


@pytest.mark.parametrize("window", ["store", "root"])
def test_a_shred_during_a_key_read_in_flight_is_not_undone_by_its_caching(
        tmp_path: Path, clock: FakeClock, window: str) -> None:
    """Before, a read of an account's keys (from the store, or unwrapped by the root) that began before a
    crypto-shred cached what it found after the shred's eviction: this process could then open the
    shredded account's clips until the cache's TTL (300 s) ran out."""
    pause = _Pause()
    db = Database(f"sqlite:///{tmp_path / 'meta.db'}")
    ring = KeyRing(_PausingRoot(LocalKms.from_file(tmp_path / "root.key"), pause), _PausingStore(db, pause),
                   now=clock.now)
    first = ring.new_kek("acct_a", 1)  # the account's first key, stored as AccountDirectory stores it
    with db.transaction() as conn:
        KekRows(conn).add("acct_a", first.record, clock.now())
    ring.stored(first)
    dek, wrapped = ring.data_key_for("acct_a", "c_1")
    ring.forget("acct_a")  # cold: the next unwrap reads the store and asks the root
    if window == "root":
        ring.versions("acct_a")  # the key list is cached; the root's unwrap is the read in flight
    pause.armed = True
    opened: list[bytes] = []
    reader = threading.Thread(target=lambda: opened.append(ring.unwrap(wrapped, account_ref="acct_a",
                                                                        clip_id="c_1")))
    reader.start()
    assert pause.reached.wait(10)  # the reader holds the keys it read ...
    with db.transaction() as conn:  # ... when the shred commits (DeleteAccount's unit) ...
        destroy_keks(conn, "acct_a", clock.now())
    ring.forget("acct_a")  # ... and evicts the account
    pause.go.set()
    reader.join(10)
    assert opened == [dek]  # begun before the shred, the call itself may still answer
    with pytest.raises(AccountKeysDestroyed):  # but nothing after the shred opens the account's keys
        ring.unwrap(wrapped, account_ref="acct_a", clip_id="c_1")
    with pytest.raises(AccountKeysDestroyed):
        ring.data_key_for("acct_a", "c_2")


def test_a_key_version_stored_after_a_shred_is_not_cached(app: App, ring: KeyRing) -> None:
    """A rotation commits its version, a shred destroys it, then the rotation reports it stored."""
    ref = _account(app, "alice")
    new = ring.new_kek(ref, 2)
    with app.db.transaction() as conn:  # the rotation's unit
        KekRows(conn).add(ref, new.record, app.clock.now())
    app.accounts.delete_account("alice", OPERATOR)
    ring.stored(new)
    with pytest.raises(AccountKeysDestroyed):
        ring.wrap(secrets.token_bytes(32), account_ref=ref, clip_id="c_1", key_version=2)
