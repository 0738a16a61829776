"""Accounts: pseudonyms, review preference, deletion (crypto-shred) and key rotation."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable

from clipstore.blobs import BlobStore
from clipstore.clock import Clock
from clipstore.errors import FailedPrecondition, NotFound, Unavailable
from clipstore.identity import AccountLookup
from clipstore.logs import get_logger
from clipstore.ports import Accounts, ClipCatalog, ClipWrites, KekWrites, ReviewQueue
from clipstore.rows import AccountRow, ClipRow
from clipstore.unit import Actor, AuditRecord, AuditTrail, Tx
from kms import KeyRing, WrappedDek

log = get_logger("clipstore.accounts")
DELETE_PAGE_CLIPS = 500  # clip rows per unit of work when an account is deleted
REWRAP_PAGE_CLIPS = 200  # data keys rewrapped per unit of work in a rotation
ROTATE_MARGIN_S = 1.0  # stop this long before the caller's deadline, to answer in time
CREATE_ATTEMPTS = 3  # a deletion of the account another request just created: this one creates it anew
PREFERENCE_ATTEMPTS = 3  # a deletion between finding the account and the unit sends the preference to the new one
REMAINING_COUNT_LIMIT = 1_000_000  # "remaining" is exact up to this; the caller just calls again


class AccountDirectory:
    def __init__(self, *, accounts: Accounts, clips: ClipCatalog, rows: Callable[[Tx], ClipWrites],
                 review: Callable[[Tx], ReviewQueue], keks: Callable[[Tx], KekWrites],
                 shred_keys: Callable[[Tx, str], object], keyring: KeyRing,
                 lookup: AccountLookup, blobs: BlobStore, audit: AuditTrail, clock: Clock,
                 default_allow_review: bool) -> None:
        """`rows`, `review`, `keks`: the store bound to a unit's transaction; `shred_keys(tx, account_ref)`
        destroys every KEK version of the account in it (the crypto-shred)."""
        self._accounts, self._clips, self._keyring = accounts, clips, keyring
        self._rows, self._review, self._keks, self._shred_keys = rows, review, keks, shred_keys
        self._lookup, self._blobs, self._audit, self._clock = lookup, blobs, audit, clock
        self._default_allow = default_allow_review

    def find(self, account_id: str) -> AccountRow | None:
        return self._accounts.by_lookup(self._lookup.hmac(account_id))

    def find_or_create(self, account_id: str) -> AccountRow:
        lookup = self._lookup.hmac(account_id)
        existing = self._accounts.by_lookup(lookup)
        for _ in range(CREATE_ATTEMPTS):
            if existing is not None:
                return existing
            ref = "acct_" + secrets.token_hex(12)
            first = self._keyring.new_kek(ref, 1)  # the root call, before the transaction
            # The account and its first key in one transaction: a failure between them used to leave a key row
            # no account owns and nothing swept; a request that created the account first rolls back both.
            if self._accounts.insert(ref, lookup, allow_review=self._default_allow, now=self._clock.now(),
                                     key=first.record):
                self._keyring.stored(first)
                return AccountRow(account_ref=ref, allow_review=self._default_allow, retention_days=None)
            existing = self._accounts.by_lookup(lookup)  # the winner's; None if a deletion erased it since
        raise Unavailable("the account was created and deleted again and again meanwhile; retry", reason="UNAVAILABLE")

    def require(self, account_id: str) -> AccountRow:
        account = self.find(account_id)
        if account is None:
            raise _no_account()
        return account

    def _still_there(self, tx: Tx, ref: str) -> None:
        """Refuse the unit when the account was deleted since it was found (the check inside the unit, so a
        deletion cannot slip between it and the change)."""
        if not self._rows(tx).account_exists(ref):
            raise tx.refuse(_no_account())

    def set_review_preference(self, account_id: str, allow: bool, actor: Actor) -> tuple[AccountRow, int, int]:
        """Returns the account and, when review is turned off, how many queued clips and
        unredeemed grants were withdrawn (in the same unit as the change).

        The account is found (or created) before the unit; if a deletion erased it in between, the unit
        changes nothing and the preference goes to the account id's new account, as it would have a moment
        later: never to an erased account, where it would be lost (with `review.default_allow = true`, an
        opt-out lost that way let the id's next clips be reviewed)."""
        for _ in range(PREFERENCE_ATTEMPTS):
            account = self.find_or_create(account_id)
            ref = account.account_ref

            def unit(tx: Tx, ref: str = ref) -> tuple[int, int] | None:
                rows = self._rows(tx)
                if not rows.account_exists(ref):  # erased since it was found
                    return None
                rows.set_allow_review(ref, allow)
                withdrawn = (0, 0) if allow else self._review(tx).withdraw_from_review(account_ref=ref)
                tx.audit(actor.record("account.review_preference", account_ref=ref,
                                      reason="allow" if allow else "deny"))
                return withdrawn

            changed = self._audit.run(unit)
            if changed is not None:
                dequeued, revoked = changed
                return AccountRow(account_ref=ref, allow_review=allow, retention_days=account.retention_days), \
                    dequeued, revoked
        raise Unavailable("the account was deleted again and again while its preference was set; retry",
                          reason="UNAVAILABLE")

    def delete_account(self, account_id: str, actor: Actor) -> int:
        """Crypto-shred first (from then on nothing of the account opens), then delete rows and objects.

        The shred, the withdrawal from review, the pseudonym mapping and the entry are one unit; the clip
        rows then go a page per unit (no transaction is held for long), and the objects after them. If
        the process stops half-way, the purge loop removes what is left (`ClipRepository.shredded`)."""
        ref = self.require(account_id).account_ref
        return self._erase(ref, actor.record("account.delete", account_ref=ref), once=True)

    def replay_deletions(self, account_refs: Iterable[str], actor: Actor) -> int:
        """Erase again every account the audit log records as deleted whose keys, pseudonym or clips the
        database still holds (a restored backup); each erasure audited like a deletion. Returns how many."""
        held = self._accounts.still_held(account_refs)
        for ref in sorted(held):
            self._erase(ref, actor.record("account.delete_replay", account_ref=ref, reason="restored_database"))
        if held:
            log.warning("accounts.deletions_replayed", accounts=len(held))
        return len(held)

    def _erase(self, ref: str, record: AuditRecord, *, once: bool = False) -> int:
        """With `once`, the account's pseudonym mapping must still be there when the shred's unit runs: of
        concurrent deletions of one account, one erases it (one entry) and the others are told it is gone,
        as a deletion after it would be."""
        def shred(tx: Tx) -> None:
            if once:
                self._still_there(tx, ref)
            self._shred_keys(tx, ref)
            self._review(tx).withdraw_from_review(account_ref=ref)
            self._rows(tx).delete_account(ref)
            tx.audit(record)

        def next_page(tx: Tx) -> list[str]:
            rows, review = self._rows(tx), self._review(tx)
            page = [c.clip_id for c in rows.of_account(ref, DELETE_PAGE_CLIPS)]
            for clip_id in page:
                review.forget_clip(clip_id)  # no label or escalation text outlives the clip
                rows.delete(clip_id)  # its idempotency key stays as a tombstone
            return page

        try:
            self._audit.run(shred)
        finally:  # also when its commit went unanswered (it may have landed): never a shredded key kept cached
            self._keyring.forget(ref)
        deleted = 0
        while page := self._audit.run(next_page):
            deleted += len(page)
            for clip_id in page:
                try:
                    self._blobs.delete(clip_id)
                except Exception as exc:  # the object is noise now; the orphan sweep retries
                    log.warning("account.object_delete_failed", clip_id=clip_id, exc_type=type(exc).__name__)
        if not self._accounts.flush_erasure():  # a reader held it back; the next erasure retries
            log.warning("account.wal_not_truncated")
        return deleted

    def retire_key_versions(self, account_id: str, min_version: int, actor: Actor, *, dry_run: bool = False) -> int:
        """Set the minimum decryption version, once no clip of the account still needs an older one.
        With `dry_run`, only check and count the versions it would retire. The retirement and its entry
        are one unit of work: both are there, or neither; the unit checks the clips again (a PutClip may
        have committed one meanwhile), and a PutClip committed after it wraps its key anew (`ClipLibrary.ingest`)."""
        ref = self.require(account_id).account_ref

        def in_use() -> FailedPrecondition:
            return FailedPrecondition(f"clips still use a version below {min_version}; "
                                      "run RotateAccountKey (it rewraps) first", reason="KEY_VERSION_IN_USE")

        if any(c.key_version < min_version for c in self._clips.all_for_account(ref)):
            raise in_use()
        if dry_run:
            return sum(r.version < min_version and not r.retired for r in self._keyring.versions(ref))
        if min_version > self._keyring.active_version(ref):
            raise ValueError(f"min_version {min_version} is above the active version")

        def retire(tx: Tx) -> int:
            self._still_there(tx, ref)
            if self._rows(tx).uses_version_below(ref, min_version):  # committed since the check above
                raise tx.refuse(in_use())
            retired = self._keks(tx).retire_below(ref, min_version)
            tx.audit(actor.record("account.key_retire", account_ref=ref, reason=f"below {min_version}"))
            return retired

        try:
            return self._audit.run(retire)
        finally:
            self._keyring.forget(ref)

    def rotate_key(self, account_id: str, actor: Actor, *, budget_s: float | None = None) -> tuple[int, int, int]:
        """A new active key version, and every clip's DEK rewrapped to it (audio untouched), a page per
        unit of work. Within `budget_s` (the caller's deadline): what is left is returned, and the next
        call resumes it instead of adding yet another version. Returns (version, rewrapped, remaining)."""
        ref = self.require(account_id).account_ref
        version = self._keyring.active_version(ref)
        resuming = bool(self._clips.below_version(ref, version, 1))
        new = None if resuming else self._keyring.new_kek(ref, self._keyring.next_version(ref))  # the root call
        if new is not None:
            version = new.record.version

        def rotate(tx: Tx) -> None:
            """The new version and its entry in one unit (a resumed rotation adds only its entry)."""
            self._still_there(tx, ref)  # never a key added after the shred
            if new is not None:
                keks = self._keks(tx)
                if keks.newest_version(ref) != version - 1:  # another rotation added this version first
                    raise tx.refuse(Unavailable("the account's key was rotated by another call meanwhile; retry",
                                                reason="UNAVAILABLE"))
                keks.add(ref, new.record, tx.now)
            tx.audit(actor.record("account.key_rotate", account_ref=ref,
                                  reason=f"{'resume' if resuming else 'new'} version {version}"))

        try:
            self._audit.run(rotate)
        except BaseException:
            self._keyring.forget(ref)  # a version another replica added: the retry reads it, not the cache
            raise
        if new is not None:
            self._keyring.stored(new)
        stop_at = None if budget_s is None else time.monotonic() + budget_s - ROTATE_MARGIN_S
        rewrapped = 0
        while page := self._clips.below_version(ref, version, REWRAP_PAGE_CLIPS):
            moved = [(clip, self._keyring.rewrap(WrappedDek(key_version=clip.key_version, blob=clip.wrapped_dek),
                                                 account_ref=ref, clip_id=clip.clip_id)) for clip in page]

            def store(tx: Tx, moved: list[tuple[ClipRow, WrappedDek]] = moved) -> int:
                rows = self._rows(tx)
                return sum(rows.rewrapped(clip, new.key_version, new.blob) for clip, new in moved)

            rewrapped += self._audit.run(store)
            if stop_at is not None and time.monotonic() >= stop_at:
                break
        return version, rewrapped, len(self._clips.below_version(ref, version, REMAINING_COUNT_LIMIT))


def _no_account() -> NotFound:
    return NotFound("no such account; it has no clips or was deleted", reason="ACCOUNT_NOT_FOUND")
