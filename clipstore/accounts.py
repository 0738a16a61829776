"""Accounts: pseudonyms, review preference, deletion (crypto-shred) and key rotation."""

from __future__ import annotations

import secrets

from clipstore.audit import Actor, AuditLog
from clipstore.blobs import BlobStore
from clipstore.clock import Clock
from clipstore.errors import FailedPrecondition, NotFound
from clipstore.identity import AccountLookup
from clipstore.logs import get_logger
from clipstore.store.clips import AccountRepository, AccountRow, ClipRepository
from clipstore.store.review import ReviewRepository
from kms import KeyRing, WrappedDek

log = get_logger("clipstore.accounts")


class AccountDirectory:
    def __init__(self, *, accounts: AccountRepository, clips: ClipRepository, keyring: KeyRing,
                 lookup: AccountLookup, blobs: BlobStore, audit: AuditLog, clock: Clock, review: ReviewRepository,
                 default_allow_review: bool) -> None:
        self._accounts, self._clips, self._keyring, self._review = accounts, clips, keyring, review
        self._lookup, self._blobs, self._audit, self._clock = lookup, blobs, audit, clock
        self._default_allow = default_allow_review

    def find(self, account_id: str) -> AccountRow | None:
        return self._accounts.by_lookup(self._lookup.hmac(account_id))

    def find_or_create(self, account_id: str) -> AccountRow:
        lookup = self._lookup.hmac(account_id)
        existing = self._accounts.by_lookup(lookup)
        if existing is not None:
            return existing
        ref = "acct_" + secrets.token_hex(12)
        self._keyring.create_account(ref)
        if self._accounts.insert(ref, lookup, allow_review=self._default_allow, now=self._clock.now()):
            return AccountRow(account_ref=ref, allow_review=self._default_allow, retention_days=None)
        self._keyring.destroy(ref)  # a concurrent request created the account first; drop our unused key
        winner = self._accounts.by_lookup(lookup)
        assert winner is not None
        return winner

    def require(self, account_id: str) -> AccountRow:
        account = self.find(account_id)
        if account is None:
            raise NotFound("no such account; it has no clips or was deleted", reason="ACCOUNT_NOT_FOUND")
        return account

    def set_review_preference(self, account_id: str, allow: bool, actor: Actor) -> tuple[AccountRow, int, int]:
        """Returns the account and, when review is turned off, how many queued clips and
        unredeemed grants were withdrawn."""
        account = self.find_or_create(account_id)
        ref = account.account_ref
        self._audit.append(actor.record("account.review_preference", account_ref=ref,
                                        reason="allow" if allow else "deny"))
        self._accounts.set_allow_review(ref, allow)
        dequeued = revoked = 0
        if not allow:
            dequeued = self._review.dequeue(account_ref=ref)
            revoked = self._review.void_grants(account_ref=ref)
        return AccountRow(account_ref=ref, allow_review=allow, retention_days=account.retention_days), \
            dequeued, revoked

    def delete_account(self, account_id: str, actor: Actor) -> int:
        """Crypto-shred first (from then on nothing of the account opens), then delete rows and objects."""
        account = self.require(account_id)
        ref = account.account_ref
        self._audit.append(actor.record("account.delete", account_ref=ref))
        self._keyring.destroy(ref)
        self._review.dequeue(account_ref=ref)
        self._review.void_grants(account_ref=ref)
        clip_ids = [c.clip_id for c in self._clips.all_for_account(ref)]
        for clip_id in clip_ids:
            self._review.forget_clip(clip_id)  # no label or escalation text outlives the clip
            self._clips.delete(clip_id)
            try:
                self._blobs.delete(clip_id)
            except Exception as exc:  # the object is noise now; the orphan sweep retries
                log.warning("account.object_delete_failed", clip_id=clip_id, exc_type=type(exc).__name__)
        self._accounts.delete(ref)  # the pseudonym mapping goes last
        if not self._accounts.flush_erasure():  # a reader held it back; the next erasure retries
            log.warning("account.wal_not_truncated")
        return len(clip_ids)

    def retire_key_versions(self, account_id: str, min_version: int, actor: Actor) -> int:
        """Set the minimum decryption version, once no clip of the account still needs an older one."""
        ref = self.require(account_id).account_ref
        if any(c.key_version < min_version for c in self._clips.all_for_account(ref)):
            raise FailedPrecondition(f"clips still use a version below {min_version}; "
                                     "run RotateAccountKey (it rewraps) first", reason="KEY_VERSION_IN_USE")
        self._audit.append(actor.record("account.key_retire", account_ref=ref, reason=f"below {min_version}"))
        return self._keyring.retire_below(ref, min_version)

    def rotate_key(self, account_id: str, actor: Actor) -> tuple[int, int]:
        """A new active key version; every clip's DEK is rewrapped to it, audio untouched."""
        account = self.require(account_id)
        ref = account.account_ref
        self._audit.append(actor.record("account.key_rotate", account_ref=ref))
        version = self._keyring.rotate(ref)
        rewrapped = 0
        for clip in self._clips.all_for_account(ref):
            if clip.key_version != version:
                new = self._keyring.rewrap(WrappedDek(key_version=clip.key_version, blob=clip.wrapped_dek),
                                           account_ref=ref, clip_id=clip.clip_id)
                self._clips.update_wrapped_dek(clip.clip_id, new.key_version, new.blob)
                rewrapped += 1
        return version, rewrapped
