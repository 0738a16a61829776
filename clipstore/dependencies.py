"""Are the database, the root key and the blob store there?

At start (`check_at_start`) each configured dependency is tried the way the
service will use it, and the first failure stops the start with one line
naming the setting and the fix (`DependencyError`). While serving,
`DependencyMonitor` probes them every `PROBE_INTERVAL_S` and sets the gRPC
health of each service: NOT_SERVING while something it needs is down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import sqlalchemy as sa
from grpc_health.v1 import health, health_pb2

from clipstore.config import Config, ConfigError, KmsConfig, S3Config
from clipstore.logs import get_logger
from kms import KeyProvider
from kms.keyring import kek_context

T = TypeVar("T")
PROBE_INTERVAL_S = 15.0  # two root-key calls per probe: ~12k KMS requests a day per replica
PROBE_PLAINTEXT = b"clipstore dependency probe"
# The key ring's own context shape, so a key policy that conditions on it is exercised too.
PROBE_CONTEXT = kek_context("dependency-probe", 0)
_AWS_CONFIG = botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=10)
log = get_logger("clipstore.dependencies")


class DependencyError(ConfigError):
    """A dependency is missing or refuses us: what, and what to do about it, in one line."""

    def __init__(self, setting: str, problem: str, fix: str) -> None:
        super().__init__(setting, f"{problem}; {fix}")
        self.setting, self.problem, self.fix = setting, problem, fix


# -- at start ------------------------------------------------------------------------------------------

def check_at_start(config: Config) -> None:
    """Raise `DependencyError` for the first dependency that does not work as configured.

    The local root key and the data directory are checked when the app opens them."""
    check_database(config.effective_database_url)
    if config.kms is not None:
        check_kms(config.kms)
    if config.s3 is not None:
        check_bucket(config.s3)
    if config.audit_tiles and config.audit_tiles.startswith("s3://"):
        check_tiles_bucket(config.audit_tiles, config.audit_tiles_retain_days)


def check_database(url: str) -> None:
    """PostgreSQL answers a query (SQLite is a file in the data directory, checked when opened)."""
    if not url.startswith("postgresql://"):
        return
    shown = sa.engine.make_url(url).render_as_string(hide_password=True)
    try:
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1),
                                  connect_args={"connect_timeout": 5}, poolclass=sa.pool.NullPool)
    except ImportError:
        raise DependencyError("database_url", "PostgreSQL needs psycopg", "pip install 'clipstore[postgres]'") \
            from None
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.DBAPIError as exc:
        raise database_unreachable(exc, shown) from None
    finally:
        engine.dispose()


def database_unreachable(exc: sa.exc.DBAPIError, shown: str = "the database") -> DependencyError:
    """The driver's first line (no statement, no parameters; libpq never prints a password) as a
    `DependencyError` for `database_url`."""
    cause = str(exc.orig).strip().splitlines()[0][:200] if exc.orig else type(exc).__name__
    return DependencyError("database_url", f"cannot connect to {shown} ({cause})",
                           "start it, or fix database_url (CLIPSTORE_DATABASE_URL)")


# AWS error codes → (setting, problem, fix); {key} and {bucket} are filled in.
_KMS_CODES = {
    "NotFoundException": ("kms.key_id", "KMS key {key} does not exist in {region}",
                          "create it (aws kms create-key) or fix kms.key_id (CLIPSTORE_KMS_KEY_ID)"),
    "AccessDeniedException": ("kms.key_id", "the service's AWS identity may not use KMS key {key}",
                              "allow kms:Encrypt and kms:Decrypt on it in the key policy or the IAM role"),
    "DisabledException": ("kms.key_id", "KMS key {key} is disabled", "enable it (aws kms enable-key)"),
    "KMSInvalidStateException": ("kms.key_id", "KMS key {key} is pending deletion or unusable",
                                 "cancel the deletion (aws kms cancel-key-deletion) or choose another key"),
    "InvalidKeyUsageException": ("kms.key_id", "KMS key {key} is not a symmetric ENCRYPT_DECRYPT key",
                                 "create a symmetric encryption key"),
}
_S3_CODES = {
    "404": ("s3.bucket", "bucket {bucket} does not exist",
            "create it (aws s3 mb s3://{bucket}) or fix s3.bucket (CLIPSTORE_S3_BUCKET)"),
    "NoSuchBucket": ("s3.bucket", "bucket {bucket} does not exist",
                     "create it (aws s3 mb s3://{bucket}) or fix s3.bucket (CLIPSTORE_S3_BUCKET)"),
    "403": ("s3.bucket", "the service's AWS identity may not use bucket {bucket}",
            "allow s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject on it"),
    "AccessDenied": ("s3.bucket", "the service's AWS identity may not write to bucket {bucket}",
                     "allow s3:PutObject and s3:DeleteObject on it"),
    "301": ("s3.region", "bucket {bucket} is in another region", "set s3.region to the bucket's region"),
    "KMS.NotFoundException": ("s3.sse_kms_key_id", "the SSE-KMS key for bucket {bucket} does not exist",
                              "fix s3.sse_kms_key_id"),
    "KMS.AccessDeniedException": ("s3.sse_kms_key_id", "the service may not use the SSE-KMS key of bucket {bucket}",
                                  "allow kms:GenerateDataKey and kms:Decrypt on it"),
}
_CREDENTIAL_CODES = frozenset({"UnrecognizedClientException", "InvalidClientTokenId", "InvalidAccessKeyId",
                               "SignatureDoesNotMatch", "InvalidSignatureException", "ExpiredToken",
                               "ExpiredTokenException"})


def _aws(section: str, endpoint_url: str | None, codes: Mapping[str, tuple[str, str, str]],
         facts: Mapping[str, str], call: Callable[[], T]) -> T:
    """Run one AWS call; turn each way it can fail into a DependencyError."""
    env = f"CLIPSTORE_{section.upper()}"
    try:
        return call()
    except botocore.exceptions.NoRegionError:
        raise DependencyError(f"{section}.region", "no AWS region is configured",
                              f"set {section}.region ({env}_REGION) or AWS_DEFAULT_REGION") from None
    except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError):
        raise DependencyError(section, "no AWS credentials found", "set AWS_PROFILE, or AWS_ACCESS_KEY_ID and "
                                       "AWS_SECRET_ACCESS_KEY, or run with an instance or task role") from None
    except botocore.exceptions.ProfileNotFound as exc:
        raise DependencyError(f"{section}.profile", f"no AWS profile named {exc.kwargs.get('profile')!r}",
                              f"fix {section}.profile or add the profile to ~/.aws/config") from None
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError) as exc:
        where = endpoint_url or facts.get("region", "")
        raise DependencyError(f"{section}.endpoint_url" if endpoint_url else f"{section}.region",
                              f"cannot reach {section.upper()} at {where} ({type(exc).__name__})",
                              "check the address and the network path") from None
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code in _CREDENTIAL_CODES:
            raise DependencyError(section, f"AWS refused the credentials ({code})",
                                  "check AWS_PROFILE / AWS_ACCESS_KEY_ID or the role, and the clock") from None
        setting, problem, fix = codes.get(code, (section, f"{section.upper()} answered {code or 'an error'}",
                                                 "see the AWS error code's documentation"))
        raise DependencyError(setting, problem.format(**facts), fix.format(**facts)) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise DependencyError(section, f"the AWS client failed ({type(exc).__name__})",
                              "check the AWS settings") from None


def _session(section: str, profile: str | None, endpoint_url: str | None) -> Any:
    # A fresh session reads the environment and profile now, not what an earlier one cached.
    return _aws(section, endpoint_url, {}, {}, lambda: boto3.session.Session(profile_name=profile))


def check_kms(config: KmsConfig) -> None:
    """The root key encrypts and decrypts under the key ring's context, as every account key will be."""
    session = _session("kms", None, config.endpoint_url)
    client = _aws("kms", config.endpoint_url, {}, {}, lambda: session.client(
        "kms", endpoint_url=config.endpoint_url, region_name=config.region, config=_AWS_CONFIG))
    facts = {"key": repr(config.key_id), "region": client.meta.region_name}
    blob = _aws("kms", config.endpoint_url, _KMS_CODES, facts, lambda: client.encrypt(
        KeyId=config.key_id, Plaintext=PROBE_PLAINTEXT, EncryptionContext=PROBE_CONTEXT)["CiphertextBlob"])
    plain = _aws("kms", config.endpoint_url, _KMS_CODES, facts, lambda: client.decrypt(
        KeyId=config.key_id, CiphertextBlob=blob, EncryptionContext=PROBE_CONTEXT)["Plaintext"])
    if plain != PROBE_PLAINTEXT:
        raise DependencyError("kms.key_id", f"KMS key {config.key_id!r} did not give back what it encrypted",
                              "check kms.endpoint_url points at AWS KMS or a faithful emulator")


def check_bucket(config: S3Config) -> None:
    """The bucket exists, and the service may write and delete under its prefix."""
    session = _session("s3", config.profile, config.endpoint_url)
    client = _aws("s3", config.endpoint_url, {}, {}, lambda: session.client(
        "s3", endpoint_url=config.endpoint_url, region_name=config.region, config=_AWS_CONFIG))
    facts = {"bucket": config.bucket, "region": client.meta.region_name}
    _aws("s3", config.endpoint_url, _S3_CODES, facts, lambda: client.head_bucket(Bucket=config.bucket))
    probe = f"{config.prefix}.clipstore-start-check"
    sse = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": config.sse_kms_key_id} if config.sse_kms_key_id else {}
    _aws("s3", config.endpoint_url, _S3_CODES, facts,
         lambda: client.put_object(Bucket=config.bucket, Key=probe, Body=b"", **sse))
    _aws("s3", config.endpoint_url, _S3_CODES, facts, lambda: client.delete_object(Bucket=config.bucket, Key=probe))


def check_tiles_bucket(location: str, retain_days: int | None) -> None:
    """The bucket the audit log is published to exists and, when objects are to be locked, has
    versioning and Object Lock. Nothing is written: a probe in a locked bucket could never be removed."""
    bucket = location.removeprefix("s3://").partition("/")[0]
    session = _session("s3", None, None)
    # The publisher's client: endpoint and region from the AWS environment (AWS_ENDPOINT_URL_S3, …).
    client = _aws("s3", None, {}, {}, lambda: session.client("s3", config=_AWS_CONFIG))
    facts = {"bucket": bucket}
    codes = {code: ("audit.tiles", problem, fix) for code, (_, problem, fix) in _S3_CODES.items()}
    codes["404"] = codes["NoSuchBucket"] = (
        "audit.tiles", "bucket {bucket} does not exist",
        "create it with Object Lock (aws s3api create-bucket --bucket {bucket} --object-lock-enabled-for-bucket) "
        "or fix audit.tiles (CLIPSTORE_AUDIT_TILES)")
    _aws("s3", None, codes, facts, lambda: client.head_bucket(Bucket=bucket))
    if not retain_days:
        return
    versioning = _aws("s3", None, codes, facts, lambda: client.get_bucket_versioning(Bucket=bucket))

    def lock_enabled() -> bool:
        try:
            lock = client.get_object_lock_configuration(Bucket=bucket)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ObjectLockConfigurationNotFoundError":
                return False
            raise
        return bool(lock.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled")

    locked = _aws("s3", None, codes, facts, lock_enabled)
    if versioning.get("Status") != "Enabled" or not locked:
        raise DependencyError("audit.tiles_retain_days", f"bucket {bucket} has no Object Lock (and versioning), so "
                              "published tiles could not be locked",
                              "publish to a bucket created with --object-lock-enabled-for-bucket, or unset "
                              "audit.tiles_retain_days (CLIPSTORE_AUDIT_TILES_RETAIN_DAYS)")


# -- while serving -------------------------------------------------------------------------------------

# What each service needs; a service not listed needs the database only.
SERVICE_NEEDS: Mapping[str, tuple[str, ...]] = {
    "clipstore.v1.ClipService": ("database", "root_key", "blob_store"),
    "clipstore.v1.AccountService": ("database", "root_key", "blob_store"),
    "clipstore.v1.ReviewService": ("database", "root_key", "blob_store"),
    "clipstore.v1.ReviewerAdminService": ("database", "root_key"),
    "clipstore.v1.SafetyService": ("database", "root_key"),
    "clipstore.v1.EnrolmentService": ("database", "root_key"),  # a new TOTP secret is wrapped by the root
    "clipstore.v1.AuditService": ("database", "audit_log"),
}


def root_key_probe(root: KeyProvider) -> Callable[[], None]:
    def probe() -> None:
        if root.decrypt(root.encrypt(PROBE_PLAINTEXT, PROBE_CONTEXT), PROBE_CONTEXT) != PROBE_PLAINTEXT:
            raise RuntimeError("the root key did not give back what it encrypted")
    return probe


def audit_log_probe(audit: Any) -> Callable[[], None]:
    """Down while the log has halted (its stored history no longer extends what it signed)."""
    def probe() -> None:
        if audit.halted is not None:
            raise RuntimeError("the audit log halted")
    return probe


def database_probe(engine: sa.Engine) -> Callable[[], None]:
    def probe() -> None:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    return probe


class DependencyMonitor:
    """Probes each dependency and keeps every service's health status in step with them."""

    def __init__(self, probes: Mapping[str, Callable[[], None]], health_servicer: health.HealthServicer,
                 services: Iterable[str], *, interval_s: float = PROBE_INTERVAL_S) -> None:
        self._probes = dict(probes)
        self._health = health_servicer
        self._services = tuple(services)
        self._interval_s = interval_s
        self.down: dict[str, str] = {}  # dependency -> why, for those that failed their last probe
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dependency-probes", daemon=True)

    def check(self) -> dict[str, str]:
        """Probe everything once, set every service's status; returns what is down and why."""
        down: dict[str, str] = {}
        for name, probe in self._probes.items():
            try:
                probe()
            except Exception as exc:  # any failure means "down"; the type says which, never a secret
                down[name] = type(exc).__name__
        for name in down.keys() - self.down.keys():
            log.warning("dependency.down", dependency=name, error=down[name])
        for name in self.down.keys() - down.keys():
            log.info("dependency.up", dependency=name)
        self.down = down
        for service in self._services:
            needs = SERVICE_NEEDS.get(service, ("database",))
            self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING if any(n in down for n in needs)
                             else health_pb2.HealthCheckResponse.SERVING)
        self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING if down
                         else health_pb2.HealthCheckResponse.SERVING)
        return down

    def up(self) -> dict[str, float]:
        """1 or 0 per dependency, as of the last probe (for the `clipstore_dependency_up` gauge)."""
        return {name: 0.0 if name in self.down else 1.0 for name in self._probes}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)  # a probe stuck on a dead endpoint must not hold up shutdown

    def _loop(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self.check()
            except Exception as exc:  # never let the prober die silently; the next tick retries
                log.error("dependency.probe_failed", exc_type=type(exc).__name__)
