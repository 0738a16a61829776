"""Schema upgrade with the data steps that need the KMS (see clipstore.store.legacy)."""

from __future__ import annotations

from clipstore.clipkey import ClipKey, Purpose
from clipstore.store import Database
from clipstore.store.clips import ClipRepository
from clipstore.store.legacy import move_signing_seed, scrub_plaintext, seal_plaintext
from clipstore.store.migrations import HEAD
from kms import AccountKeysDestroyed, KeyProvider, KeyRing, WrappedDek


def finish_upgrade(db: Database, root: KeyProvider, keyring: KeyRing) -> str:
    """Bring a database that stopped before the data steps to head; returns the revision."""
    if db.revision == HEAD:
        return HEAD
    clips = ClipRepository(db)

    def seal(purpose: str, clip_id: str, row_id: str, text: str) -> bytes:
        clip = clips.get(clip_id)
        if clip is None:  # purged: its key, and with it the text, is gone
            return b""
        try:
            dek = keyring.unwrap(WrappedDek(key_version=clip.key_version, blob=clip.wrapped_dek),
                                 account_ref=clip.account_ref, clip_id=clip_id)
        except AccountKeysDestroyed:  # erased with the account; any other KMS failure stops the upgrade
            return b""
        return ClipKey(dek).seal(Purpose(purpose), row_id, text.encode())

    move_signing_seed(db, root)
    seal_plaintext(db, seal)
    revision = db.upgrade()
    if revision != HEAD:
        raise RuntimeError(f"schema stopped at {revision}: legacy data steps left work undone")
    scrub_plaintext(db)
    return revision
