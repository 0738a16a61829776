"""Domain errors, free of any transport.

`Reason` is the single list of machine-readable reasons a caller can see; each
reason belongs to one `Kind` (what went wrong, by meaning) and says what to do
next. The transport layer (`clipstore.servicers.status`) is the one place that
maps a kind to a gRPC status code; the README error table is generated from
this list. Messages say what to do next and never carry keys, tokens, codes or
PII.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum, StrEnum, auto

ERROR_DOMAIN = "clipstore.v1"


class Kind(Enum):
    """What went wrong, by meaning."""

    BAD_INPUT = "the request itself is malformed"
    OUT_OF_RANGE = "a position lies beyond what exists"
    NOT_AUTHENTICATED = "the caller did not prove who it is"
    NOT_ALLOWED = "the caller may not do this"
    NOT_FOUND = "the thing does not exist (any more)"
    WRONG_STATE = "the thing exists but is not in a state that allows this"
    LIMIT_REACHED = "a quota or limit is used up"
    DEPENDENCY_DOWN = "a dependency failed; nothing was done"
    CORRUPT = "stored data failed authentication"
    NOT_IMPLEMENTED = "not in this release"
    CANCELLED = "the caller went away"
    BUG = "a bug in the service"


class Reason(StrEnum):
    """Every reason a caller can receive, with its kind and what to do about it."""

    kind: Kind
    advice: str

    @staticmethod
    def _generate_next_value_(name: str, start: int, count: int, last_values: list[str]) -> str:
        return name  # the wire value is the member's name

    def __new__(cls, value: str, kind: Kind, advice: str) -> Reason:
        member = str.__new__(cls, value)
        member._value_, member.kind, member.advice = value, kind, advice
        return member

    # -- authentication and roles ------------------------------------------------------------------
    MISSING_CREDENTIALS = auto(), Kind.NOT_AUTHENTICATED, "send `authorization: Bearer <key>`"
    MALFORMED_CREDENTIALS = auto(), Kind.NOT_AUTHENTICATED, "the header is not `Bearer csk_…`"
    INVALID_CREDENTIALS = auto(), Kind.NOT_AUTHENTICATED, "key unknown; ask an admin"
    PRINCIPAL_DISABLED = auto(), Kind.NOT_AUTHENTICATED, "the principal (e.g. a reviewer) was disabled"
    PRINCIPAL_EXPIRED = auto(), Kind.NOT_AUTHENTICATED, "the principal's expiry has passed; an admin may extend it"
    KEY_ROTATED_OUT = auto(), Kind.NOT_AUTHENTICATED, "the key was replaced and its overlap has ended; use the new key"
    CERT_WITHOUT_PRINCIPAL = auto(), Kind.NOT_AUTHENTICATED, \
        "the client certificate has no single `spiffe://<trust domain>/<role>/<name>` URI"
    WRONG_TRUST_DOMAIN = auto(), Kind.NOT_AUTHENTICATED, \
        "the certificate's SPIFFE id belongs to another trust domain (`auth.trust_domain`)"
    UNKNOWN_SPIFFE_ID = auto(), Kind.NOT_AUTHENTICATED, \
        "no principal is enrolled for the certificate's SPIFFE id; ask an admin"
    CERT_REVOKED = auto(), Kind.NOT_AUTHENTICATED, "the client certificate is on the revocation list; get a new one"
    WRONG_ROLE = auto(), Kind.NOT_ALLOWED, "the principal's role may not call this RPC"
    # -- requests ----------------------------------------------------------------------------------
    INVALID_ARGUMENT = auto(), Kind.BAD_INPUT, "`metadata.field` names the bad field"
    MALFORMED_REQUEST = auto(), Kind.BAD_INPUT, \
        "the request bytes do not parse as the method's message; check the client's generated code"
    CLIP_TRAILER_MISSING = auto(), Kind.BAD_INPUT, \
        "PutClip ended without a trailer; nothing was stored; resend the clip ending with ClipTrailer"
    CLIP_SIZE_MISMATCH = auto(), Kind.BAD_INPUT, \
        "the trailer's size_bytes differs from the audio that arrived; nothing was stored; resend the whole clip"
    CLIP_DIGEST_MISMATCH = auto(), Kind.BAD_INPUT, \
        "the trailer's sha256 differs from the audio that arrived; nothing was stored; resend the whole clip"
    BEYOND_TREE_SIZE = auto(), Kind.OUT_OF_RANGE, \
        "a proof asked for a tree larger than the log; use GetCheckpoint's `tree_size`"
    NOT_IMPLEMENTED = auto(), Kind.NOT_IMPLEMENTED, "the RPC exists in the API but not yet in this release"
    CANCELLED = auto(), Kind.CANCELLED, "the client cancelled the call or its deadline passed; nothing was committed"
    INTERNAL = auto(), Kind.BUG, "a bug; quote the request id"
    TOO_MANY_CALLS = auto(), Kind.LIMIT_REACHED, \
        "the principal has `server.max_calls_per_principal` calls in flight; finish some, then retry"
    STREAM_TOO_LONG = auto(), Kind.LIMIT_REACHED, \
        "a streaming call may last `server.stream_max_s`; send or read faster, or split the work"
    IDENTIFY_LEAK_BUSY = auto(), Kind.LIMIT_REACHED, \
        "`server.max_identify_leak_calls` IdentifyLeak calls are in flight on this server; retry in a minute"
    # -- dependencies --------------------------------------------------------------------------------
    AUDIT_UNAVAILABLE = auto(), Kind.DEPENDENCY_DOWN, \
        "the action could not be audited, so it was not performed; retry (when the message says the database did " \
        "not confirm the commit, it may have been: read its state, or retry idempotently)"
    BLOB_STORE_UNAVAILABLE = auto(), Kind.DEPENDENCY_DOWN, "the blob store failed; nothing was stored; retry"
    KMS_UNAVAILABLE = auto(), Kind.DEPENDENCY_DOWN, "the key service is down; retry"
    KMS_ACCESS_DENIED = auto(), Kind.DEPENDENCY_DOWN, \
        "the service may not use its root key; operators check the key policy"
    DATABASE_UNAVAILABLE = auto(), Kind.DEPENDENCY_DOWN, "the metadata database is down; retry"
    UNAVAILABLE = auto(), Kind.DEPENDENCY_DOWN, "a dependency is down; retry"
    # -- clips and accounts --------------------------------------------------------------------------
    CLIP_INTEGRITY = auto(), Kind.CORRUPT, \
        "a stored clip failed authentication; nothing was returned and the event was audited"
    CLIP_NOT_FOUND = auto(), Kind.NOT_FOUND, "deleted, expired or never existed"
    BLOB_NOT_FOUND = auto(), Kind.NOT_FOUND, "the clip's object is missing from the blob store"
    ACCOUNT_NOT_FOUND = auto(), Kind.NOT_FOUND, "the account has no clips or was deleted"
    ACCOUNT_DELETED = auto(), Kind.NOT_FOUND, "the account was crypto-shredded; its clips can never be opened"
    REPORT_TOO_LARGE = auto(), Kind.LIMIT_REACHED, \
        "the access report exceeds one message (server.max_message_bytes): ask with since, a window starting later"
    IDEMPOTENCY_KEY_SPENT = auto(), Kind.WRONG_STATE, \
        "the key's clip was deleted, purged or expired (or its account deleted); it is never stored again"
    IDEMPOTENCY_KEY_REUSED = auto(), Kind.WRONG_STATE, \
        "the key already names a clip with other audio or metadata; nothing was stored; use a new key for a new " \
        "recording"
    KEY_VERSION_UNAVAILABLE = auto(), Kind.WRONG_STATE, "the clip's key version is retired; an operator must rewrap"
    KEY_VERSION_IN_USE = auto(), Kind.WRONG_STATE, "clips still use an older key version; RotateAccountKey first"
    # -- review sessions -------------------------------------------------------------------------------
    BAD_CODE = auto(), Kind.NOT_AUTHENTICATED, "wrong TOTP code; wait for the next code"
    REPLAYED_CODE = auto(), Kind.NOT_AUTHENTICATED, "that code was already used; wait for the next code"
    SESSION_UNKNOWN = auto(), Kind.NOT_AUTHENTICATED, "no such session; start one with a TOTP code"
    SESSION_ENDED = auto(), Kind.NOT_AUTHENTICATED, "the session has ended; start a new one"
    SESSION_EXPIRED = auto(), Kind.NOT_AUTHENTICATED, "the session reached its lifetime; start a new one"
    SESSION_IDLE = auto(), Kind.NOT_AUTHENTICATED, "the session was idle too long; start a new one"
    REVIEWER_LOCKED = auto(), Kind.NOT_ALLOWED, "too many wrong codes; wait for the lockout to pass"
    NOT_ENROLLED = auto(), Kind.NOT_ALLOWED, "the principal is not an enrolled reviewer"
    REVIEWER_NOT_FOUND = auto(), Kind.NOT_FOUND, "no reviewer with that id"
    # -- principal lifecycle (admins) ------------------------------------------------------------------
    PRINCIPAL_NOT_FOUND = auto(), Kind.NOT_FOUND, "no principal with that id"
    SPIFFE_ID_IN_USE = auto(), Kind.WRONG_STATE, "another principal is enrolled under that SPIFFE id"
    FACTORS_BELONG_TO_REVIEWER = auto(), Kind.WRONG_STATE, \
        "a reviewer's key and TOTP secret go only to the reviewer: issue them an enrolment code"
    LAST_ADMIN = auto(), Kind.WRONG_STATE, \
        "the change would leave no enabled admin that stays unexpired for the next hour; create or enable " \
        "another admin first"
    # -- self-enrolment (reviewers) -----------------------------------------------------------------------
    ENROLMENT_CODE_INVALID = auto(), Kind.NOT_AUTHENTICATED, "no such enrolment code; check it or ask an admin"
    ENROLMENT_CODE_USED = auto(), Kind.NOT_AUTHENTICATED, "the code was already redeemed; ask an admin for a new one"
    ENROLMENT_CODE_EXPIRED = auto(), Kind.NOT_AUTHENTICATED, \
        "the code expired or a newer one replaced it; ask an admin for a new one"
    ENROLMENT_CODE_WRONG_REVIEWER = auto(), Kind.NOT_ALLOWED, \
        "the code belongs to another reviewer (or another certificate presented it); it is void now"
    # -- assignments and grants --------------------------------------------------------------------------
    QUEUE_EMPTY = auto(), Kind.NOT_FOUND, "nothing to review now; try again later"
    ASSIGNMENT_NOT_FOUND = auto(), Kind.NOT_FOUND, "not your assignment, or no such assignment"
    LOCALE_NOT_ENROLLED = auto(), Kind.NOT_ALLOWED, "ask only for locales you are enrolled for"
    DAILY_CAP = auto(), Kind.LIMIT_REACHED, "the reviewer's daily cap is reached; it resets at 00:00 UTC"
    GRANT_LIMIT = auto(), Kind.LIMIT_REACHED, "an assignment gets at most 3 grants; complete or flag it"
    ASSIGNMENT_EXPIRED = auto(), Kind.WRONG_STATE, "the assignment expired; ask for the next one"
    ASSIGNMENT_COMPLETED = auto(), Kind.WRONG_STATE, "the assignment is closed; ask for the next one"
    CLIP_UNAVAILABLE = auto(), Kind.WRONG_STATE, "the clip may no longer be reviewed; ask for the next assignment"
    CLIP_GONE = auto(), Kind.WRONG_STATE, "the clip was deleted or expired; ask for the next assignment"
    GRANT_INVALID = auto(), Kind.NOT_ALLOWED, "the grant is malformed or its signature is bad; request a new one"
    GRANT_EXPIRED = auto(), Kind.NOT_ALLOWED, "the grant expired; request a new one"
    GRANT_WRONG_REVIEWER = auto(), Kind.NOT_ALLOWED, "the grant was issued to another reviewer"
    GRANT_WRONG_SESSION = auto(), Kind.NOT_ALLOWED, "the grant belongs to another session"
    GRANT_WRONG_CLIP = auto(), Kind.NOT_ALLOWED, "the grant is for another clip"
    GRANT_REVOKED = auto(), Kind.NOT_ALLOWED, \
        "the grant was revoked; request a new one (or stop: the clip may not be heard)"
    GRANT_REPLAYED = auto(), Kind.NOT_ALLOWED, "the grant was already used; request a new one"
    REVIEWER_DISABLED = auto(), Kind.NOT_ALLOWED, "the reviewer was disabled"
    ACCOUNT_OPTED_OUT = auto(), Kind.NOT_ALLOWED, "the account no longer allows human review; stop"
    AUDIO_FORMAT_UNSUPPORTED = auto(), Kind.WRONG_STATE, \
        "review.require_transform is on and the clip's audio cannot be disguised or watermarked; skip the clip"
    AUDIO_LONGER_THAN_STORED = auto(), Kind.WRONG_STATE, \
        "the clip decodes to more audio than its duration_ms or its size allows (a decode bomb, or a wrong " \
        "duration_ms at ingest); skip the clip"
    ESCALATION_NOT_FOUND = auto(), Kind.NOT_FOUND, "no escalation with that id"
    ESCALATION_RESOLVED = auto(), Kind.WRONG_STATE, "the escalation was already resolved"
    ALREADY_FLAGGED = auto(), Kind.WRONG_STATE, \
        "the assignment was already flagged (its escalation_id is in the error's metadata); nothing more was sent"
    # -- forensics ----------------------------------------------------------------------------------------
    LEAK_AUDIO_UNREADABLE = auto(), Kind.BAD_INPUT, "send the copy as WAV, FLAC, Ogg Vorbis or Ogg Opus"
    WATERMARK_NOT_FOUND = auto(), Kind.NOT_FOUND, \
        "no watermark under this service's key: the copy is too short, too degraded, or not from this service"
    WATERMARK_UNKNOWN = auto(), Kind.NOT_FOUND, \
        "the copy carries a valid watermark this database has no fetch for (another deployment, or restored)"
    WATERMARK_UNAVAILABLE = auto(), Kind.WRONG_STATE, \
        "watermarking is off (review.watermark or the audio extra missing); nothing can be identified"


class ClipstoreError(Exception):
    """A security or request outcome the caller should see. Families below group kinds;
    a reason always belongs to its family's kind (checked here, so a typo fails loudly)."""

    kind: Kind = Kind.BUG
    reason: Reason = Reason.INTERNAL

    def __init_subclass__(cls) -> None:
        cls.reason = _checked(cls.reason, cls.kind)

    def __init__(self, message: str, *, reason: str | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = _checked(reason, self.kind)
        self.metadata = dict(metadata or {})


def _checked(reason: str, kind: Kind) -> Reason:
    checked = Reason.__members__.get(reason)  # the wire value is the member's name
    if checked is None:
        raise ValueError(f"unknown reason {reason!r}: add it to clipstore.errors.Reason")
    if checked.kind is not kind:
        raise ValueError(f"reason {checked} is {checked.kind.name}, not {kind.name}")
    return checked


class InvalidArgument(ClipstoreError):
    kind, reason = Kind.BAD_INPUT, Reason.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str, *, reason: str | None = None) -> None:
        super().__init__(f"{field}: {problem}", reason=reason, metadata={"field": field})


class OutOfRange(ClipstoreError):
    kind, reason = Kind.OUT_OF_RANGE, Reason.BEYOND_TREE_SIZE


class Unauthenticated(ClipstoreError):
    kind, reason = Kind.NOT_AUTHENTICATED, Reason.MISSING_CREDENTIALS


class PrincipalRefused(Unauthenticated):
    """A credential that names a known principal who may not act (disabled, expired, rotated-out key, revoked
    certificate). The principal's id goes to the audit entry of the refusal, never to the caller."""

    def __init__(self, principal_id: str, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason)
        self.principal_id = principal_id


class PermissionDenied(ClipstoreError):
    kind, reason = Kind.NOT_ALLOWED, Reason.WRONG_ROLE


class NotFound(ClipstoreError):
    kind, reason = Kind.NOT_FOUND, Reason.CLIP_NOT_FOUND


class FailedPrecondition(ClipstoreError):
    kind, reason = Kind.WRONG_STATE, Reason.CLIP_GONE


class ResourceExhausted(ClipstoreError):
    kind, reason = Kind.LIMIT_REACHED, Reason.DAILY_CAP


class Unavailable(ClipstoreError):
    kind, reason = Kind.DEPENDENCY_DOWN, Reason.UNAVAILABLE


class Unimplemented(ClipstoreError):
    kind, reason = Kind.NOT_IMPLEMENTED, Reason.NOT_IMPLEMENTED


class Cancelled(ClipstoreError):
    kind, reason = Kind.CANCELLED, Reason.CANCELLED


class Internal(ClipstoreError):
    kind, reason = Kind.BUG, Reason.INTERNAL


class DataLoss(ClipstoreError):
    kind, reason = Kind.CORRUPT, Reason.CLIP_INTEGRITY


class EnvelopeError(DataLoss):
    """A clip object (or a blob sealed under its key) failed authentication. Callers see one
    generic status; `tamper` and `detail` (never key material) goes to the audit log and tests."""

    tamper = "integrity"

    def __init__(self, detail: str) -> None:
        super().__init__("the clip failed its integrity check and was not returned; the event was recorded")
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.tamper}: {self.detail}"


class MalformedHeader(EnvelopeError):
    tamper = "malformed_header"


class UnsupportedFormat(EnvelopeError):
    tamper = "unsupported_format"


class HeaderTampered(EnvelopeError):
    tamper = "header_tampered"


class ClipIdMismatch(EnvelopeError):
    tamper = "clip_id_mismatch"


class AccountMismatch(EnvelopeError):
    tamper = "account_mismatch"


class SegmentTampered(EnvelopeError):
    tamper = "segment_tampered"


class Truncated(EnvelopeError):
    tamper = "truncated"


class Extended(EnvelopeError):
    tamper = "extended"


class Reordered(EnvelopeError):
    tamper = "reordered"


class SealedBlobTampered(EnvelopeError):
    """An identity or note blob sealed under a clip's key failed authentication."""

    tamper = "sealed_blob_tampered"
