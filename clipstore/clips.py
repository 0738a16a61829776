"""Clips: streaming ingest, reads, deletion, retention purge and the orphan sweep."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from clipstore.accounts import AccountDirectory
from clipstore.blobs import BlobNotFound, BlobStore
from clipstore.clipkey import MAGIC_V2, ClipKey, Purpose
from clipstore.clock import Clock
from clipstore.envelope import open_clip, seal_clip
from clipstore.errors import (
    Cancelled,
    ClipstoreError,
    DataLoss,
    EnvelopeError,
    FailedPrecondition,
    InvalidArgument,
    Kind,
    NotFound,
    Unavailable,
)
from clipstore.identity import open_identity, seal_identity
from clipstore.locales import canonical_locale
from clipstore.logs import get_logger
from clipstore.ports import ClipCatalog, ClipWrites, ReviewQueue
from clipstore.rows import ClipRow
from clipstore.sampling import ReviewSampler
from clipstore.unit import SYSTEM, Actor, AuditTrail, Tx, deny_alone
from kms import (
    AccountKeysDestroyed,
    DekUnwrapError,
    KeyRing,
    KeyVersionError,
    KmsAccessDenied,
    KmsError,
    WrappedDek,
)

MAX_CHUNK_BYTES = 1 << 20  # bounds memory per stream message
MAX_CLIP_BYTES = 256 << 20  # ~2.5 h of 16-bit 16 kHz audio; longer is not a voice command
ORPHAN_AGE_S = 3600.0  # an object without a row this old is a crashed or failed ingest
PURGE_BATCH = 500
RETIRED_KEY_ATTEMPTS = 3  # commits of one PutClip whose data key's version was retired meanwhile
log = get_logger("clipstore.clips")
_PURPOSE_OF = {"identity_ct": Purpose.IDENTITY, "note_ct": Purpose.NOTE, "label_ct": Purpose.LABEL,
               "resolution_ct": Purpose.RESOLUTION}


@dataclass(frozen=True, kw_only=True)
class NewClip:
    """Validated metadata of a PutClip stream."""

    account_id: str
    device_serial: str
    device_type: str
    locale: str
    captured_at: float | None
    wake_word: bool
    content_type: str
    idempotency_key: str
    duration_ms: int


class Upload(Protocol):
    """The audio of one PutClip as it arrives: its chunks, then the SHA-256 of them all."""

    def __iter__(self) -> Iterator[bytes | memoryview]:
        """The chunks; raises rather than ends early when the upload is incomplete or does not match
        what the client declared."""
        ...

    def sha256(self) -> bytes:
        """SHA-256 of all the chunks, as checked against the client's declaration; only once they ended."""
        ...


def key_failure(exc: KmsError) -> ClipstoreError:
    """A key ring or key service failure as the error a caller sees."""
    if isinstance(exc, AccountKeysDestroyed):
        return NotFound("the account was deleted; its clips can never be opened", reason="ACCOUNT_DELETED")
    if isinstance(exc, KeyVersionError):
        return FailedPrecondition("the clip's key version is retired or unknown; an operator must rewrap it",
                                  reason="KEY_VERSION_UNAVAILABLE")
    if isinstance(exc, DekUnwrapError):
        return DataLoss("the clip's data key does not open; the event was recorded", reason="CLIP_INTEGRITY")
    if isinstance(exc, KmsAccessDenied):
        return Unavailable("the service cannot use its root key; operators: check the KMS key policy and state",
                           reason="KMS_ACCESS_DENIED")
    return Unavailable("the key service is unavailable; retry later", reason="KMS_UNAVAILABLE")


def _empty_clip() -> InvalidArgument:
    return InvalidArgument("audio_chunk", "the clip is empty; send at least one audio chunk")


class _Counted:
    """Passes audio chunks through, enforcing the size limits and counting bytes."""

    def __init__(self, chunks: Iterable[bytes | memoryview]) -> None:
        self._chunks = chunks
        self.total = 0

    def __iter__(self) -> Iterator[bytes | memoryview]:
        for chunk in self._chunks:
            if len(chunk) > MAX_CHUNK_BYTES:
                raise InvalidArgument("audio_chunk", f"chunks may be at most {MAX_CHUNK_BYTES} bytes, "
                                                     f"got {len(chunk)}; split the audio")
            self.total += len(chunk)
            if self.total > MAX_CLIP_BYTES:
                raise InvalidArgument("audio_chunk", f"clips may be at most {MAX_CLIP_BYTES} bytes")
            yield chunk


class ClipLibrary:
    def __init__(self, *, clips: ClipCatalog, rows: Callable[[Tx], ClipWrites], review: Callable[[Tx], ReviewQueue],
                 accounts: AccountDirectory, keyring: KeyRing, blobs: BlobStore, audit: AuditTrail, clock: Clock,
                 sampler: ReviewSampler, retention_days: float, accidental_retention_hours: float) -> None:
        """`rows`, `review`: the store bound to a unit's transaction."""
        self._clips, self._accounts, self._keyring = clips, accounts, keyring
        self._rows, self._review = rows, review
        self._sampler = sampler
        self._blobs, self._audit, self._clock = blobs, audit, clock
        self._retention_s = retention_days * 86400
        self._accidental_s = accidental_retention_hours * 3600

    # -- ingest ------------------------------------------------------------
    def ingest(self, new: NewClip, audio: Upload, actor: Actor, *,
               active: Callable[[], bool] = lambda: True) -> ClipRow:
        """Seal and store the audio, then commit the row: a failure leaves no row and no object.

        `active` says whether the caller still waits for the answer (a cancelled call never commits).
        An idempotency key that already names a clip returns it only to a retry of the same recording:
        the upload is read to its end as usual and compared with the clip (metadata, identity, audio);
        anything else is refused (IDEMPOTENCY_KEY_REUSED, audited) and stores nothing.
        """
        idem = hashlib.sha256(new.idempotency_key.encode()).digest()
        existing = self._clips.by_idempotency(actor.id, idem)
        if existing is not None:
            self._existing(existing)  # a spent key is refused before the upload is read
            counted = _Counted(audio)
            for _ in counted:  # the same limits and checks as a first upload; the audio goes nowhere
                pass
            if counted.total == 0:
                raise _empty_clip()
            # Again: the upload took as long as the client liked, and the clip may have been deleted meanwhile.
            clip, key = self._existing(existing)
            return self._same_recording(clip, key, new, counted.total, audio.sha256(), actor)
        account = self._accounts.find_or_create(new.account_id)
        ref, clip_id = account.account_ref, "c_" + secrets.token_hex(12)
        dek, wrapped = self._keyring.data_key_for(ref, clip_id)
        counted = _Counted(audio)
        try:
            sealed_bytes = self._blobs.put_stream(clip_id, seal_clip(dek, counted, clip_id=clip_id, account_ref=ref))
        except ClipstoreError as exc:
            if exc.kind is Kind.DEPENDENCY_DOWN:
                self._audit.append(actor.record("clip.ingest", account_ref=ref, clip_id=clip_id,
                                                outcome="failed", reason=exc.reason))
            raise
        if counted.total == 0:
            self._delete_object(clip_id)  # if the store fails now, the orphan sweep removes it: the answer stays
            raise _empty_clip()
        now = self._clock.now()
        keep_s = self._retention_s if new.wake_word else self._accidental_s
        if new.wake_word and account.retention_days is not None:
            keep_s = account.retention_days * 86400
        row = ClipRow(clip_id=clip_id, account_ref=ref, size_bytes=counted.total, sealed_bytes=sealed_bytes,
                      content_type=new.content_type, locale=new.locale, device_type=new.device_type,
                      duration_ms=new.duration_ms, captured_at=new.captured_at, wake_word=new.wake_word,
                      created_at=now, expires_at=now + keep_s, key_version=wrapped.key_version,
                      wrapped_dek=wrapped.blob,
                      identity_ct=seal_identity(ClipKey(dek), clip_id, account_id=new.account_id,
                                                device_serial=new.device_serial))

        def commit(tx: Tx) -> str | None:
            # Row, idempotency key, entry and queue place: one unit. `active` is checked inside it, right
            # before anything is written: a client's retry must find nothing half-done. None: nothing
            # written, the data key's version was retired meanwhile.
            if not active():
                raise tx.refuse(Cancelled("the call was cancelled before the clip was committed; nothing was "
                                          "stored"))
            rows = self._rows(tx)
            owner, account_live, key_live = rows.owner_account_key(actor.id, idem, ref, row.key_version)
            if owner is not None:  # a concurrent retry with the same key committed first
                return owner
            if not account_live:  # deleted (shredded) while the audio arrived: the clip goes with it
                raise tx.deny(actor, "clip.ingest", NotFound(
                    "the account was deleted while this clip was uploaded; nothing was stored",
                    reason="ACCOUNT_DELETED"), account_ref=ref)
            if not key_live:  # a rotation and a retirement while the audio arrived: never a row the key won't open
                return None
            rows.insert(row, principal_id=actor.id, idempotency_hash=idem)
            tx.audit(actor.record("clip.ingest", account_ref=ref, clip_id=clip_id))
            review = self._review(tx)
            self._sampler.offer(review, row, allow_review=review.allows_review(ref), now=tx.now)
            return clip_id

        for _ in range(RETIRED_KEY_ATTEMPTS):
            try:
                owner = self._audit.run(commit)
            except Exception as exc:
                # AuditUnavailable.unconfirmed: the COMMIT was sent and never answered
                if self._committed_after_all(clip_id, unconfirmed=getattr(exc, "unconfirmed", False) is True):
                    return row
                raise
            if owner is not None:
                break
            # The same data key (the object stays as sealed), wrapped anew under the active version, which
            # this process may not have cached yet (another replica's rotation)
            self._keyring.forget(ref)
            try:
                wrapped = self._keyring.wrap(dek, account_ref=ref, clip_id=clip_id)
            except Exception:
                self._delete_object(clip_id)
                raise
            row = dataclasses.replace(row, key_version=wrapped.key_version, wrapped_dek=wrapped.blob)
        else:
            self._delete_object(clip_id)
            raise Unavailable("the account's key was retired again and again while this clip was stored; nothing "
                              "was stored; retry", reason="UNAVAILABLE")
        if owner != clip_id:
            self._delete_object(clip_id)  # ours is a duplicate; the sweep retries a failed delete
            clip, key = self._existing(owner)
            return self._same_recording(clip, key, new, counted.total, audio.sha256(), actor)
        return row

    def _committed_after_all(self, clip_id: str, *, unconfirmed: bool) -> bool:
        """After a failed commit: whether the row is stored all the same (the database committed but its
        answer was lost: a dropped connection, a failover). If not, the object is deleted, unless the COMMIT
        was sent and never answered (`unconfirmed`): such a commit may still become visible (a slow link or
        fsync, a synchronous standby), so the object stays, as it does when the row cannot be looked up (the
        database is still away), and the orphan sweep decides later, by the row. An object whose row
        committed is never deleted."""
        try:
            committed = self._clips.exists(clip_id)
        except Exception as exc:
            log.warning("clip.commit_unknown", clip_id=clip_id, exc_type=type(exc).__name__)
            return False
        if not committed:
            if unconfirmed:
                log.warning("clip.commit_unknown", clip_id=clip_id, exc_type="CommitUnconfirmed")
            else:
                self._delete_object(clip_id)
        return committed

    def _existing(self, clip_id: str) -> tuple[ClipRow, ClipKey]:
        """The clip an idempotency key names, with its key; refused as spent once it is gone."""
        clip = self._clips.get(clip_id)
        if clip is not None and clip.expires_at > self._clock.now():  # else deleted, purged or due for purge
            try:
                return clip, self.key(clip)
            except AccountKeysDestroyed:  # erased with its account; the purge has not reached the row yet
                pass
        raise FailedPrecondition("this idempotency key belongs to a clip that was deleted; use a new key",
                                 reason="IDEMPOTENCY_KEY_SPENT")

    def _same_recording(self, clip: ClipRow, key: ClipKey, new: NewClip, size: int, sha256: bytes,
                        actor: Actor) -> ClipRow:
        """`clip` if the upload is a retry of it, else a refusal (audited) naming only which part differs.

        Compared: the metadata as stored, the identity (opened under the clip's key, not released: no
        `clip.identity_read`) and the audio's SHA-256 (the stored object decrypted and hashed; no digest
        is kept, it would outlive a crypto-shred as the recording's fingerprint).
        """
        try:
            differs = self._differs(clip, key, new, size, sha256)
        except BlobNotFound:
            self._existing(clip.clip_id)  # a deletion removes the row before the object: spent if it is gone
            raise
        except EnvelopeError as exc:
            self._audit.append(actor.record("clip.integrity_failure", clip_id=clip.clip_id,
                                            account_ref=clip.account_ref, outcome="failed", reason=exc.tamper))
            raise
        if differs is None:
            return clip
        deny_alone(self._audit, actor, "clip.ingest", FailedPrecondition(
            f"this idempotency key already names a clip with other {differs}; nothing was stored; use a new "
            "key for a new recording", reason="IDEMPOTENCY_KEY_REUSED"), clip_id=clip.clip_id,
            account_ref=clip.account_ref)

    def _differs(self, clip: ClipRow, key: ClipKey, new: NewClip, size: int, sha256: bytes) -> str | None:
        """Which part of the upload differs from `clip`, in general terms (never a value); None if none."""
        # canonical_locale: a row stored before tags were canonicalised may hold `en-us` for the `en-US` sent
        stored = (clip.content_type, canonical_locale(clip.locale), clip.device_type, clip.captured_at, clip.wake_word,
                  clip.duration_ms)
        sent = (new.content_type, new.locale, new.device_type, new.captured_at, new.wake_word, new.duration_ms)
        identity = open_identity(key, clip.clip_id, clip.identity_ct)
        same_identity = (hmac.compare_digest(identity["account_id"].encode(), new.account_id.encode())
                         & hmac.compare_digest(identity["device_serial"].encode(), new.device_serial.encode()))
        if stored != sent or not same_identity:
            return "metadata (identity, device, locale, capture time, wake word, content type or duration)"
        if size != clip.size_bytes:
            return "audio"
        digest = hashlib.sha256()
        for segment in self._plaintext(clip, key):
            digest.update(segment)
        return None if hmac.compare_digest(digest.digest(), sha256) else "audio"

    # -- reads -------------------------------------------------------------
    def find(self, clip_id: str) -> ClipRow | None:
        return self._clips.get(clip_id)

    def get(self, clip_id: str) -> ClipRow:
        clip = self._clips.get(clip_id)
        if clip is None or clip.expires_at <= self._clock.now():
            raise NotFound(f"no clip {clip_id}; it never existed, was deleted, or expired", reason="CLIP_NOT_FOUND")
        return clip

    def key(self, clip: ClipRow) -> ClipKey:
        """The clip's key: its data key unwrapped by the account's key ring."""
        return ClipKey(self._keyring.unwrap(WrappedDek(key_version=clip.key_version, blob=clip.wrapped_dek),
                                            account_ref=clip.account_ref, clip_id=clip.clip_id))

    def identities(self, clips: list[ClipRow], actor: Actor) -> list[dict[str, str]]:
        """Account id and device serial of each clip, released only after one durable
        `clip.identity_read` entry per clip (it names the clip and pseudonym, never the identity)."""
        opened = [open_identity(self.key(c), c.clip_id, c.identity_ct) for c in clips]

        def audit(tx: Tx) -> None:
            for c in clips:
                tx.audit(actor.record("clip.identity_read", clip_id=c.clip_id, account_ref=c.account_ref))

        if clips:
            self._audit.run(audit)  # one transaction for a whole page
        return opened

    def list(self, account_id: str, *, after: str, limit: int) -> list[ClipRow]:
        account = self._accounts.find(account_id)
        if account is None:
            return []
        now = self._clock.now()
        return [c for c in self._clips.list_by_account(account.account_ref, after=after, limit=limit)
                if c.expires_at > now]

    def audio(self, clip: ClipRow) -> Iterator[bytes]:
        """Authenticated plaintext, segment by segment (bounded memory)."""
        return self._plaintext(clip, self.key(clip))

    def _plaintext(self, clip: ClipRow, key: ClipKey) -> Iterator[bytes]:
        return open_clip(key.stream_dek, self._blobs.get_stream(clip.clip_id), clip_id=clip.clip_id,
                         account_ref=clip.account_ref)

    # -- deletion and retention ---------------------------------------------
    def _remove(self, clip_id: str, actor: Actor, action: str, *, reason: str = "",
                still: Callable[[ClipRow, float], bool] = lambda clip, now: True) -> ClipRow | None:
        """One unit: the entry, the row with its wrapped DEK (the idempotency key stays as a tombstone),
        its place in review and any label or escalation text; then the object. None if the clip is gone
        (or no longer meets `still`)."""
        def unit(tx: Tx) -> ClipRow | None:
            rows = self._rows(tx)
            clip = rows.get(clip_id)
            if clip is None or not still(clip, tx.now):
                return None
            self._review(tx).forget_clip(clip_id)
            rows.delete(clip_id)
            tx.audit(actor.record(action, account_ref=clip.account_ref, clip_id=clip_id, reason=reason))
            return clip

        clip = self._audit.run(unit)
        if clip is not None:
            self._delete_object(clip_id)
        return clip

    def _delete_object(self, clip_id: str) -> None:
        try:
            self._blobs.delete(clip_id)
        except Exception as exc:  # unreadable without its DEK; the orphan sweep retries
            log.warning("clip.object_delete_failed", clip_id=clip_id, exc_type=type(exc).__name__)

    def delete(self, clip_id: str, actor: Actor) -> None:
        if self._remove(clip_id, actor, "clip.delete") is None:
            raise NotFound(f"no clip {clip_id}", reason="CLIP_NOT_FOUND")

    def expire_now(self, clip_id: str, actor: Actor) -> None:
        """Out of review at once and purged at the next run (an accidental activation)."""
        def unit(tx: Tx) -> None:
            clip = self._rows(tx).get(clip_id)
            if clip is None:
                return
            review = self._review(tx)
            review.withdraw_from_review(clip_id=clip_id)
            review.expire_clip(clip_id, tx.now)
            tx.audit(actor.record("clip.expire", clip_id=clip_id, account_ref=clip.account_ref,
                                  reason="accidental_activation"))
        self._audit.run(unit)

    def purge_expired(self, actor: Actor = SYSTEM) -> int:
        """Delete object, row and wrapped DEK of every expired clip, and of every clip whose account was
        crypto-shredded by a deletion that stopped half-way; each purge is audited."""
        purged = 0
        sources: list[tuple[Callable[[], list[ClipRow]], str, Callable[[ClipRow, float], bool]]] = [
            (lambda: self._clips.expired(self._clock.now(), PURGE_BATCH), "expired",
             lambda clip, now: clip.expires_at <= now),
            (lambda: self._clips.shredded(PURGE_BATCH), "account_deleted", lambda clip, now: True)]
        for find, reason, still in sources:
            while batch := find():
                removed = [self._remove(c.clip_id, actor, "clip.purge", reason=reason, still=still) for c in batch]
                purged += sum(r is not None for r in removed)
                if not any(removed):
                    break
        return purged

    def reseal_legacy(self, limit: int = PURGE_BATCH) -> int:
        """Move identities, notes, labels and resolutions sealed before the current format (`clipkey`)
        forward, a page per call: a resumable job the retention loop runs until nothing is left."""
        moved = 0
        for table, key, column, row_id, blob, clip in self._clips.sealed_blobs_before(MAGIC_V2, limit):
            purpose = _PURPOSE_OF[column]
            new = self.key(clip).reseal(purpose, row_id, blob)
            moved += self._clips.replace_blob(table, key, column, row_id, blob, new)
        return moved

    def purge_plan(self, older_than_s: float = ORPHAN_AGE_S) -> tuple[int, int, int]:
        """What `purge_expired` and `sweep_orphans` would remove now, removing nothing:
        (expired clips, clips of deleted accounts, orphan objects)."""
        expired, shredded = self._clips.count_purgeable(self._clock.now())
        orphans = sum(not self._clips.exists(key) for key in self._blobs.list_keys(older_than_s))
        return expired, shredded, orphans

    def sweep_orphans(self, older_than_s: float = ORPHAN_AGE_S) -> int:
        """Remove objects that have no row (an ingest that crashed after upload) and partial uploads."""
        removed = self._blobs.sweep_incomplete(older_than_s)
        for key in list(self._blobs.list_keys(older_than_s)):
            if not self._clips.exists(key):
                self._blobs.delete(key)
                removed += 1
        return removed
