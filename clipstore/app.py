"""The service's components, built once from config: the one place a backend is chosen."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clipstore.access_reports import PSEUDONYM_KEY_NAME, AccessReports
from clipstore.accounts import AccountDirectory
from clipstore.audio import FetchAudio, FetchAudioPolicy, WatermarkSource
from clipstore.audit import AuditLog
from clipstore.audit.publish import Publisher, TileStorage, storage_for
from clipstore.audit.report_checkpoints import ReportCheckpoints
from clipstore.audit.signing import load_or_create_signer
from clipstore.audit.witnessing import Cosigner, PublishLoop, WitnessEndpoint
from clipstore.blobs import BlobStore, FileBlobStore, S3BlobStore
from clipstore.clips import ClipLibrary
from clipstore.clock import Clock, SystemClock
from clipstore.config import Config, ConfigError
from clipstore.enrolment import EnrolmentPorts, SelfEnrolment
from clipstore.identity import LOOKUP_KEY_NAME, AccountLookup
from clipstore.peers import PEER_PSEUDONYM_KEY_NAME, PeerPseudonyms
from clipstore.principals import PrincipalLifecycle, PrincipalPorts
from clipstore.review import ReviewDesk, ReviewPolicy, ReviewPorts
from clipstore.review.assignments import Assignments
from clipstore.review.escalations import Escalations
from clipstore.review.forensics import Forensics, LeakDetector
from clipstore.review.redeem import Grants
from clipstore.review.sessions import Sessions, totp_context
from clipstore.sampling import ReviewSampler
from clipstore.store import Database, PrincipalRepository, schema
from clipstore.store.clips import AccountRepository, ClipRepository, ClipRows
from clipstore.store.db import connection
from clipstore.store.enrolment import EnrolmentRows
from clipstore.store.keys import KekRows, SqlKekStore, destroy_keks
from clipstore.store.principals import PrincipalRows
from clipstore.store.review import ReviewRows
from clipstore.store.service_keys import load_or_create_service_key
from clipstore.unit import STARTUP, Tx
from clipstore.upgrade import finish_upgrade
from kms import AwsKms, KeyProvider, KeyRing, KmsDecryptError, LocalKms


def root_provider(config: Config, *, create: bool = True) -> KeyProvider:
    """The KMS root, or the local root key file (made when missing only if `create`: a database that already
    holds keys was made with another root key, and a new one would open none of them)."""
    if config.kms is not None:
        return AwsKms(config.kms.key_id, endpoint_url=config.kms.endpoint_url, region=config.kms.region)
    if not create and not config.root_key_file.exists():
        raise ConfigError("data_dir", f"{config.root_key_file} is missing but the database holds keys wrapped by it; "
                                      "restore the root key file from your backup (a new one would open nothing)")
    try:
        return LocalKms.from_file(config.root_key_file, create=create)
    except (OSError, ValueError) as exc:  # the message names the file and the fix
        raise ConfigError("data_dir", str(exc)) from None


def holds_keys(db: Database) -> bool:
    """Whether the database already holds a key wrapped by a root: a service key (made at first start), an
    account key, a reviewer's TOTP secret, or (a database from before service_keys) the signing seed in
    audit_signing_key, which the upgrade moves only once the root opens it."""
    with db.read() as conn:
        wrapped = [sa.select(schema.service_keys.c.name).limit(1),
                   sa.select(schema.account_keys.c.account_ref).limit(1),
                   sa.select(schema.reviewers.c.principal_id)
                   .where(schema.reviewers.c.wrapped_totp_secret.is_not(None)).limit(1)]
        if sa.inspect(conn).has_table("audit_signing_key"):
            wrapped.append(sa.select(sa.text("1")).select_from(sa.table("audit_signing_key")).limit(1))
        return any(conn.scalar(query) is not None for query in wrapped)


def _wrong_root(config: Config) -> ConfigError:
    if config.kms is not None:
        return ConfigError("kms.key_id", f"the KMS key {config.kms.key_id} does not open this database's keys; "
                                         "set the key the database was created with")
    return ConfigError("data_dir", f"{config.root_key_file} does not open this database's keys; restore the root "
                                   "key file this database was created with")


GRANT_KEY_NAME = "grant-signing"
REPORT_RESPONSE_HEADROOM = 1024  # the response's other fields and framing, next to the report


def blob_store(config: Config) -> BlobStore:
    if config.s3 is not None:
        return S3BlobStore(config.s3.bucket, prefix=config.s3.prefix, endpoint_url=config.s3.endpoint_url,
                           region=config.s3.region, profile=config.s3.profile,
                           sse_kms_key_id=config.s3.sse_kms_key_id, connections=config.serving.max_workers)
    return FileBlobStore(config.blob_dir)


PRIVATE_UMASK = 0o077


def private_data(config: Config) -> None:
    """Start-up checks: what the service writes is readable by the service user alone.

    A private umask covers every file created from here on (SQLite's database, -wal and -shm,
    blobs, exports). What already exists is checked, not silently repaired: a data directory or
    database that others can read, or that another user owns, stops the start with one line
    naming the path and the command that fixes it."""
    os.umask(PRIVATE_UMASK)
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_private("data_dir", config.data_dir, 0o700)
    url = config.effective_database_url
    if url.startswith("sqlite:///"):
        database = Path(url.removeprefix("sqlite:///"))
        for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
            if path.exists():
                _check_private("database_url", path, 0o600)


def _check_private(key: str, path: Path, mode: int) -> None:
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise ConfigError(key, f"{path} is owned by uid {st.st_uid}, not the service user (uid {os.geteuid()}); "
                               f"run: chown {os.geteuid()} {path}")
    if st.st_mode & 0o077:
        raise ConfigError(key, f"{path} is accessible to group or others (mode {st.st_mode & 0o777:o}); "
                               f"run: chmod {mode:o} {path}")


def publish_loop(config: Config, audit: AuditLog, tiles: TileStorage | None) -> PublishLoop | None:
    """Witnessing and tile publishing, when configured: a background thread off the append path."""
    if tiles is None and not config.audit_witnesses:
        return None
    publisher = Publisher(audit.reader, tiles) if tiles is not None else None
    cosigner = Cosigner(audit.signer.verifier, [WitnessEndpoint.parse(w) for w in config.audit_witnesses],
                        config.audit_witness_quorum, audit.consistency_proof) \
        if config.audit_witnesses else None
    loop = PublishLoop(audit.reader, audit.signer.verifier, publisher, cosigner,
                       interval_s=config.audit_publish_every_s)
    loop.start()
    return loop


WATERMARK_KEY_NAME = "forensic-watermark"


def forensic_watermarks(config: Config, db: Database, root: KeyProvider
                        ) -> tuple[WatermarkSource | None, LeakDetector | None]:
    """The per-fetch forensic watermark (review.watermark) and its detector, keyed by a service key wrapped
    by the root; (None, None) when it is off."""
    if config.review_watermark != "on":
        return None, None
    from clipstore.audio.errors import UnsupportedAudio  # the audio extra, only when it is on
    from clipstore.audio.watermark import ForensicWatermarks, watermark_id

    marks = ForensicWatermarks(load_or_create_service_key(db, root, WATERMARK_KEY_NAME))
    return marks, LeakDetector(identify=marks.identify, watermark_id=watermark_id, unreadable=UnsupportedAudio)


def _clip_rows(tx: Tx) -> ClipRows:
    return ClipRows(connection(tx))


def _review_rows(tx: Tx) -> ReviewRows:
    return ReviewRows(connection(tx))


class App:
    """Stores and key providers shared by the servicers; close() releases them."""

    def __init__(self, config: Config, *, clock: Clock | None = None) -> None:
        self.config = config
        private_data(config)
        self.db = Database(config.effective_database_url)
        self.root = root_provider(config, create=not holds_keys(self.db))
        self.principals = PrincipalRepository(self.db)
        self.clock: Clock = clock or SystemClock()
        self.keyring = KeyRing(self.root, SqlKekStore(self.db), now=self.clock.now)
        try:
            finish_upgrade(self.db, self.root, self.keyring)  # before the signer: it may move the signing seed
            signer = load_or_create_signer(self.db, self.root)
        except KmsDecryptError:
            self.db.close()
            raise _wrong_root(config) from None
        self.audit = AuditLog(self.db, signer, self.clock,
                              checkpoint_every_entries=config.audit_checkpoint_every_entries,
                              checkpoint_every_s=config.audit_checkpoint_every_s)
        tiles = storage_for(config.audit_tiles, retain_days=config.audit_tiles_retain_days) \
            if config.audit_tiles else None
        # Before anything is appended: the stored log against the published one (may halt the log).
        self.audit.open(tiles.read if tiles is not None else None)
        self.publishing = publish_loop(config, self.audit, tiles)
        self.blobs = blob_store(config)
        self.lifecycle = PrincipalLifecycle(
            PrincipalPorts(ledger=self.audit, bind=lambda tx: PrincipalRows(connection(tx)), read=self.principals.read,
                           sessions=_review_rows, clock=self.clock),
            trust_domain=config.trust_domain, default_overlap_s=config.key_overlap_s,
            certificates=config.tls is not None and config.tls.client_ca_file is not None)
        self.enrolment = SelfEnrolment(
            EnrolmentPorts(ledger=self.audit, bind=lambda tx: EnrolmentRows(connection(tx)), read=self._enrolment_rows,
                           seal_totp=lambda pid, secret: self.root.encrypt(secret, totp_context(pid)),
                           sessions=_review_rows, clock=self.clock),
            code_ttl_s=config.enrolment_code_ttl_s, key_overlap_s=config.key_overlap_s)
        self.accounts = AccountDirectory(
            accounts=AccountRepository(self.db), clips=ClipRepository(self.db), rows=_clip_rows, review=_review_rows,
            keks=lambda tx: KekRows(connection(tx)),
            shred_keys=lambda tx, ref: destroy_keks(connection(tx), ref, tx.now), keyring=self.keyring,
            lookup=AccountLookup(load_or_create_service_key(self.db, self.root, LOOKUP_KEY_NAME)),
            blobs=self.blobs, audit=self.audit, clock=self.clock,
            default_allow_review=config.review_default_allow)
        if self.audit.halted is None:  # before serving: a restored database must not bring a deleted account back
            self.accounts.replay_deletions(self.audit.deleted_accounts, STARTUP)
            self.audit.deleted_accounts.clear()
        clip_rows = ClipRepository(self.db)
        self.report_checkpoints = ReportCheckpoints(
            checkpoint=self.audit.checkpoint, cosign=self.cosign,
            known=lambda: self.publishing.latest if self.publishing is not None else None,
            min_interval_s=config.audit_report_checkpoint_min_interval_s)
        self.access_reports = AccessReports(
            audit=self.audit, account_ref=lambda account_id: self.accounts.require(account_id).account_ref,
            captured_at=clip_rows.captured_at,
            pseudonym_key=load_or_create_service_key(self.db, self.root, PSEUDONYM_KEY_NAME),
            checkpoints=self.report_checkpoints.covering,
            max_bytes=config.max_message_bytes - REPORT_RESPONSE_HEADROOM)
        # What an anonymous denial summary names instead of the caller's address (clipstore.peers).
        self.peer_pseudonyms = PeerPseudonyms(load_or_create_service_key(self.db, self.root, PEER_PSEUDONYM_KEY_NAME))
        self.sampler = ReviewSampler(rate=config.review_sample_rate)
        self.clips = ClipLibrary(clips=ClipRepository(self.db), rows=_clip_rows, review=_review_rows,
                                 accounts=self.accounts, keyring=self.keyring,
                                 blobs=self.blobs, audit=self.audit, clock=self.clock,
                                 sampler=self.sampler, retention_days=config.retention_days,
                                 accidental_retention_hours=config.accidental_retention_hours)
        policy = ReviewPolicy(session_lifetime_s=config.review_session_lifetime_s,
                              session_idle_s=config.review_session_idle_s,
                              max_failed_codes=config.review_max_failed_codes, lockout_s=config.review_lockout_s,
                              daily_cap=config.review_daily_cap, grant_ttl_s=config.review_grant_ttl_s)
        ports = ReviewPorts(ledger=self.audit, bind=_review_rows, read=self._read_rows,
                            clock=self.clock)
        grant_key = Ed25519PrivateKey.from_private_bytes(load_or_create_service_key(self.db, self.root,
                                                                                    GRANT_KEY_NAME))
        marks, detector = forensic_watermarks(config, self.db, self.root)
        self.forensics = Forensics(ports, detector)
        self.review = ReviewDesk(
            ports=ports, policy=policy, clips=self.clips, audit=self.audit,
            sessions=Sessions(ports, root=self.root, policy=policy),
            assignments=Assignments(ports, policy=policy),
            grants=Grants(ports, key=grant_key, policy=policy, audio=FetchAudio(FetchAudioPolicy.from_settings(
                disguise=config.review_disguise, locales=config.review_disguise_locales,
                require_transform=config.review_require_transform), watermark=marks)),
            escalations=Escalations(ports, data_key=self.clips.key, policy=policy))

    @contextmanager
    def _enrolment_rows(self) -> Iterator[EnrolmentRows]:
        with self.db.read() as conn:
            yield EnrolmentRows(conn)

    @contextmanager
    def _read_rows(self) -> Iterator[ReviewRows]:
        with self.db.read() as conn:
            yield ReviewRows(conn)

    def cosign(self, note: str) -> str:
        """A checkpoint note as it is published: with a quorum of witness cosignatures when witnesses
        are configured."""
        return self.publishing.cosign(note) if self.publishing is not None else note

    def close(self) -> None:
        if self.publishing is not None:
            self.publishing.close()
        self.audit.close()
        self.db.close()
