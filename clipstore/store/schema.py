"""Table definitions at the head revision. A change here ships with a new revision in
`migrations/versions/` (which spells out its own DDL); tests/test_migrations.py fails
until the two agree."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

principals = sa.Table(
    "principals", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
    sa.Column("expires_at", sa.Float, nullable=True),  # NULL: never (revision 0006)
    # spiffe://<trust domain>/<role>/<name> of the client certificate naming this principal (revision 0006)
    sa.Column("spiffe_id", sa.String(255), nullable=True, unique=True),
)

# API keys (revision 0006; before it, one key_hash column on principals). A principal has at most one
# current key (retires_at NULL); a rotated key keeps working until retires_at, then is refused with
# its own reason, so a caller still using it learns why.
principal_keys = sa.Table(
    "principal_keys", metadata,
    # SHA-256 of the API key: keys are 256-bit random, so a fast hash suffices.
    sa.Column("key_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column("principal_id", sa.String(40), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("retires_at", sa.Float, nullable=True),
)

# -- audit log (revisions 0002, 0009, 0010, 0013, 0015, 0017) ---------------------
# SQLite: each audit table is one b-tree per row written, where it can be (revision 0017). An
# INTEGER (not BIGINT) primary key is the rowid itself, and WITHOUT ROWID keeps a table in its
# primary key's b-tree: with BIGINT keys every entry and index row went into two.
_SQLITE_ROWID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

audit_head = sa.Table(
    "audit_head", metadata,
    sa.Column("id", sa.Integer, primary_key=True),  # always 1: the row writers lock
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("last_hash", sa.String(64), nullable=False),
)

audit_entries = sa.Table(
    "audit_entries", metadata,
    sa.Column("seq", _SQLITE_ROWID, primary_key=True, autoincrement=False),
    sa.Column("entry", sa.LargeBinary, nullable=False),  # canonical JSON bytes
)

# The tree's hashes for the proofs served to clients (never for signing: clipstore.audit.history), as
# C2SP tlog-tiles (auditlog.tiles): `hashes` of tile (level, idx) are those of tree level 8 * level,
# nodes idx * 256 onwards, 32 bytes each, in order; `nodes` the 7 levels above them within the tile,
# level by level, each over complete pairs only (128, 64, ... 2 hashes for a full tile), so a proof
# reads its nodes instead of hashing up to 255 (NULL: hashed when read, as for tiles migrated on
# PostgreSQL). A level-0 tile (leaf hashes) is stored once full; the reader hashes the entries of the
# unfinished one. A tile above is stored as far as it goes and rewritten as it grows (once per
# 256**level entries), so a commit inserts one row per 256 entries instead of one per entry.
audit_tiles = sa.Table(
    "audit_tiles", metadata,
    sa.Column("level", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("hashes", sa.LargeBinary, nullable=False),
    sa.Column("nodes", sa.LargeBinary, nullable=True),
)

# Each account's access chain (auditlog.access, revision 0015): one row per chained entry, written with
# the entry by the audit writer, so an access report finds an account's entries without scanning the
# log. `leaf` is the entry's leaf hash: the next chained entry's account_prev. An index, not a source
# of truth: the report's verifier checks every entry against the signed tree.
audit_account_entries = sa.Table(
    "audit_account_entries", metadata,
    sa.Column("account_ref", sa.String(40), primary_key=True),
    sa.Column("account_seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, nullable=False, unique=True),
    sa.Column("time", sa.String(32), nullable=False),  # the entry's RFC 3339 time
    sa.Column("leaf", sa.LargeBinary(32), nullable=False),
    sqlite_with_rowid=False,
)

audit_checkpoints = sa.Table(
    "audit_checkpoints", metadata,
    sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("root", sa.LargeBinary(32), nullable=False),
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

# Secrets the service keeps for itself (the checkpoint signing seed, the
# account-lookup HMAC key), wrapped by the KMS root and shared by every replica.
service_keys = sa.Table(
    "service_keys", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("wrapped", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

# -- account keys (revision 0003) ----------------------------------------------
account_keys = sa.Table(
    "account_keys", metadata,
    sa.Column("account_ref", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("wrapped_kek", sa.LargeBinary, nullable=False),  # by the KMS root
    sa.Column("retired", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

# A crypto-shredded account leaves only this: the random pseudonym and when.
account_key_tombstones = sa.Table(
    "account_key_tombstones", metadata,
    sa.Column("account_ref", sa.String(64), primary_key=True),
    sa.Column("destroyed_at", sa.Float, nullable=False),
)

# -- accounts and clips (revision 0004) ----------------------------------------
# The only link from an account id to its pseudonym: a keyed HMAC, deleted with the account.
accounts = sa.Table(
    "accounts", metadata,
    sa.Column("account_ref", sa.String(64), primary_key=True),
    sa.Column("lookup_hmac", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("allow_review", sa.Boolean, nullable=False),
    sa.Column("retention_days", sa.Integer, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

clips = sa.Table(
    "clips", metadata,
    sa.Column("clip_id", sa.String(64), primary_key=True),
    sa.Column("account_ref", sa.String(64), nullable=False, index=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("sealed_bytes", sa.BigInteger, nullable=False),
    sa.Column("content_type", sa.String(64), nullable=False),
    sa.Column("locale", sa.String(35), nullable=False),
    sa.Column("device_type", sa.String(64), nullable=False),
    sa.Column("duration_ms", sa.Integer, nullable=False),
    sa.Column("captured_at", sa.Float, nullable=True),
    sa.Column("wake_word", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
    sa.Column("key_version", sa.Integer, nullable=False),
    sa.Column("wrapped_dek", sa.LargeBinary, nullable=False),
    # account id and device serial, AES-GCM under the clip's DEK: shredded with the account.
    sa.Column("identity_ct", sa.LargeBinary, nullable=False),
)

# A retried PutClip with the same key returns the same clip. A row outlives its clip (deletion,
# purge, account deletion) as a tombstone: the retry is refused and never re-creates the recording.
# It holds no PII: the ingest principal, SHA-256 of the key, a random clip id, a time.
ingest_idempotency = sa.Table(
    "ingest_idempotency", metadata,
    sa.Column("principal_id", sa.String(40), primary_key=True),
    sa.Column("key_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column("clip_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

# -- review (revisions 0005, 0007, 0008, 0011, 0013) ---------------------------
reviewers = sa.Table(
    "reviewers", metadata,
    sa.Column("principal_id", sa.String(40), primary_key=True),
    sa.Column("locales", sa.String(400), nullable=False),  # comma-separated; empty = any
    # By the KMS root. NULL until the reviewer redeems their enrolment code (revision 0008): the admin who
    # creates a reviewer never sees a factor.
    sa.Column("wrapped_totp_secret", sa.LargeBinary, nullable=True),
    sa.Column("last_totp_step", sa.BigInteger, nullable=False),  # a step is accepted once
    sa.Column("failed_attempts", sa.Integer, nullable=False),
    sa.Column("locked_until", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("lockouts", sa.Integer, nullable=False, server_default="0"),  # revision 0007: escalating lockouts
)

review_sessions = sa.Table(
    "review_sessions", metadata,
    sa.Column("session_id", sa.String(40), primary_key=True),
    sa.Column("token_hash", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("reviewer_id", sa.String(40), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("last_seen_at", sa.Float, nullable=False),
    sa.Column("ended", sa.Boolean, nullable=False),
)

# Sampled clips waiting for review; the reviewer sees only review_clip_id.
review_queue = sa.Table(
    "review_queue", metadata,
    sa.Column("clip_id", sa.String(64), primary_key=True),
    sa.Column("review_clip_id", sa.String(40), nullable=False, unique=True),
    sa.Column("account_ref", sa.String(64), nullable=False, index=True),
    sa.Column("locale", sa.String(35), nullable=False),
    sa.Column("enqueued_at", sa.Float, nullable=False),
    sa.Column("assignment_id", sa.String(40), nullable=True),
    sa.Column("assignment_expires_at", sa.Float, nullable=True),
    sa.Index("ix_review_queue_assignment_id", "assignment_id"),  # revision 0014
    sa.Index("ix_review_queue_enqueued_at", "enqueued_at"),
)

assignments = sa.Table(
    "assignments", metadata,
    sa.Column("assignment_id", sa.String(40), primary_key=True),
    sa.Column("clip_id", sa.String(64), nullable=False),
    sa.Column("review_clip_id", sa.String(40), nullable=False),
    sa.Column("reviewer_id", sa.String(40), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("completed_at", sa.Float, nullable=True),
    sa.Column("label", sa.String(64), nullable=True),  # before revision 0007; NULL once sealed
    sa.Column("label_ct", sa.LargeBinary, nullable=True),  # revision 0007: sealed under the clip's key
    sa.Index("ix_assignments_reviewer_created", "reviewer_id", "created_at"),
)

grants = sa.Table(
    "grants", metadata,
    sa.Column("grant_id", sa.String(40), primary_key=True),
    sa.Column("reviewer_id", sa.String(40), nullable=False, index=True),
    sa.Column("session_id", sa.String(40), nullable=False, index=True),
    sa.Column("assignment_id", sa.String(40), nullable=False),
    sa.Column("clip_id", sa.String(64), nullable=False, index=True),
    sa.Column("account_ref", sa.String(64), nullable=False, index=True),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("redeemed_at", sa.Float, nullable=True),
    sa.Column("voided", sa.Boolean, nullable=False),
    sa.Index("ix_grants_assignment_id", "assignment_id"),  # revision 0014
)

escalations = sa.Table(
    "escalations", metadata,
    sa.Column("escalation_id", sa.String(40), primary_key=True),
    sa.Column("review_clip_id", sa.String(40), nullable=False),
    sa.Column("clip_id", sa.String(64), nullable=False),
    sa.Column("category", sa.Integer, nullable=False),
    # What the reviewer wrote may quote the speaker: AES-GCM under the clip's DEK, shredded with the account.
    sa.Column("note_ct", sa.LargeBinary, nullable=False),
    sa.Column("created_by", sa.String(40), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("resolved_at", sa.Float, nullable=True),
    sa.Column("resolution", sa.Text, nullable=True),  # before revision 0007; NULL once sealed
    sa.Column("resolution_ct", sa.LargeBinary, nullable=True),  # revision 0007: sealed under the clip's key
)

# -- self-enrolment (revision 0008) --------------------------------------------
# One-time codes an admin hands a reviewer, who redeems one for factors only they see. Only the
# code's SHA-256 is kept (codes are 128-bit random); redeemed_at is set exactly once.
enrolment_codes = sa.Table(
    "enrolment_codes", metadata,
    sa.Column("code_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column("principal_id", sa.String(40), nullable=False, index=True),
    sa.Column("purpose", sa.String(20), nullable=False),
    sa.Column("created_by", sa.String(40), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("redeemed_at", sa.Float, nullable=True),
)

# -- forensic watermarks (revision 0016) ----------------------------------------
# One row per watermarked fetch: the random id embedded in the audio a reviewer received, and the
# fetch it names (also in that fetch's clip.fetch entry). Self-contained, so a leak stays traceable
# after the grant rows are gone; no account ref, no name: the reviewer is their principal pseudonym.
watermarks = sa.Table(
    "watermarks", metadata,
    sa.Column("watermark_id", sa.String(16), primary_key=True),
    sa.Column("grant_id", sa.String(40), nullable=False, unique=True),
    sa.Column("reviewer_id", sa.String(40), nullable=False),
    sa.Column("clip_id", sa.String(64), nullable=False),
    sa.Column("review_clip_id", sa.String(40), nullable=False),
    sa.Column("fetched_at", sa.Float, nullable=False),
)
