"""Configuration: defaults < TOML file < CLIPSTORE_* environment < flags.

With nothing given, clipstore runs embedded: a data dir holding a local root
key, a SQLite database and a file blob store, listening on 127.0.0.1:50051.
Every problem is reported as one `ConfigError` naming the key.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20  # bounds memory per gRPC message
DEFAULT_GRACE_S = 10.0
MAX_ENROLMENT_CODE_TTL_S = 86400  # a code travels out of band; the shorter it lives, the less it is worth
MAX_KEY_OVERLAP_S = 7 * 86400  # an overlap is for rolling a deployment, not a second key for good
# SPIFFE-ID spec §2.1: the trust domain of the ids client certificates carry.
TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]{1,255}$")


class ConfigError(Exception):
    """A configuration value is missing, unknown or malformed."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config error: {key}: {problem}")
        self.key = key


def default_data_dir(env: Mapping[str, str]) -> Path:
    """`$CLIPSTORE_DATA_DIR`, else `$XDG_DATA_HOME/clipstore`, else ~/.local/share/clipstore."""
    if env.get("CLIPSTORE_DATA_DIR"):
        return Path(env["CLIPSTORE_DATA_DIR"])
    base = Path(env["XDG_DATA_HOME"]) if env.get("XDG_DATA_HOME") else Path.home() / ".local" / "share"
    return base / "clipstore"


@dataclass(frozen=True, kw_only=True)
class S3Config:
    bucket: str
    endpoint_url: str | None = None
    region: str | None = None
    prefix: str = "clips/"
    profile: str | None = None
    sse_kms_key_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class KmsConfig:
    key_id: str
    endpoint_url: str | None = None
    region: str | None = None


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    crl_file: Path | None = None  # revoked client certificates; needs client_ca_file


@dataclass(frozen=True, kw_only=True)
class ServingConfig:
    """How much of the server one caller may hold, and for how long (keys `server.*`)."""

    max_workers: int = 64  # threads serving RPCs; health and reflection have their own few
    max_calls_per_principal: int = 24  # concurrent calls of one principal; the rest stay for others
    max_streams_per_connection: int = 100  # HTTP/2 concurrent streams on one connection
    request_body_timeout_s: float = 10.0  # a caller that opened a call must send its message by then
    stream_max_s: float = 300.0  # the longest PutClip, FetchClip (or other streaming) call
    keepalive_s: float = 60.0  # ping an idle connection this often ...
    keepalive_timeout_s: float = 20.0  # ... and close it if the ping is not answered in this time
    max_connection_idle_s: float = 300.0  # close a connection without calls after this long
    max_connection_age_s: float = 3600.0  # then ask the client to reconnect (rebalances, sheds state)


@dataclass(frozen=True, kw_only=True)
class Config:
    data_dir: Path
    listen: str = DEFAULT_LISTEN
    database_url: str | None = None
    s3: S3Config | None = None
    kms: KmsConfig | None = None
    tls: TlsConfig | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    shutdown_grace_s: float = DEFAULT_GRACE_S
    audit_checkpoint_every_entries: int = 1000
    audit_checkpoint_every_s: float = 60.0
    retention_days: float = 180.0
    accidental_retention_hours: float = 24.0
    review_default_allow: bool = False
    purge_interval_s: float = 300.0
    review_sample_rate: float = 0.02
    review_daily_cap: int = 1000
    review_grant_ttl_s: int = 120
    review_session_lifetime_s: float = 8 * 3600
    review_session_idle_s: float = 30 * 60
    review_max_failed_codes: int = 5
    review_lockout_s: float = 15 * 60
    metrics_listen: str | None = None
    audit_tiles: str | None = None  # a directory or s3://bucket/prefix for the C2SP tlog-tiles
    audit_tiles_retain_days: int | None = None  # S3 Object Lock (compliance) retention per object
    audit_witnesses: tuple[str, ...] = ()  # "URL VERIFIER-KEY" per witness
    audit_witness_quorum: int = 0
    audit_publish_every_s: float = 5.0
    log_level: str = "info"
    trust_domain: str = "clipstore"
    key_overlap_s: float = 3600.0
    enrolment_code_ttl_s: float = 3600.0
    serving: ServingConfig = ServingConfig()
    denial_summary_s: float = 60.0  # anonymous denials: one audit entry per peer per this interval
    denials_per_principal: int = 10  # identified denials appended one by one per interval; the rest counted

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'clipstore.db'}"

    @property
    def root_key_file(self) -> Path:
        return self.data_dir / "root.key"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"


# key -> (environment variable, type); nested keys use dots as in the TOML file.
_SCHEMA: dict[str, tuple[str, type]] = {
    "data_dir": ("CLIPSTORE_DATA_DIR", str),
    "listen": ("CLIPSTORE_LISTEN", str),
    "database_url": ("CLIPSTORE_DATABASE_URL", str),
    "max_message_bytes": ("CLIPSTORE_MAX_MESSAGE_BYTES", int),
    "shutdown_grace_s": ("CLIPSTORE_SHUTDOWN_GRACE_S", float),
    "s3.bucket": ("CLIPSTORE_S3_BUCKET", str),
    "s3.endpoint_url": ("CLIPSTORE_S3_ENDPOINT_URL", str),
    "s3.region": ("CLIPSTORE_S3_REGION", str),
    "s3.prefix": ("CLIPSTORE_S3_PREFIX", str),
    "s3.profile": ("CLIPSTORE_S3_PROFILE", str),
    "s3.sse_kms_key_id": ("CLIPSTORE_S3_SSE_KMS_KEY_ID", str),
    "kms.key_id": ("CLIPSTORE_KMS_KEY_ID", str),
    "kms.endpoint_url": ("CLIPSTORE_KMS_ENDPOINT_URL", str),
    "kms.region": ("CLIPSTORE_KMS_REGION", str),
    "tls.cert_file": ("CLIPSTORE_TLS_CERT_FILE", str),
    "tls.key_file": ("CLIPSTORE_TLS_KEY_FILE", str),
    "tls.client_ca_file": ("CLIPSTORE_TLS_CLIENT_CA_FILE", str),
    "tls.crl_file": ("CLIPSTORE_TLS_CRL_FILE", str),
    "audit.checkpoint_every_entries": ("CLIPSTORE_AUDIT_CHECKPOINT_EVERY_ENTRIES", int),
    "audit.checkpoint_every_s": ("CLIPSTORE_AUDIT_CHECKPOINT_EVERY_S", float),
    "retention.default_days": ("CLIPSTORE_RETENTION_DEFAULT_DAYS", float),
    "retention.accidental_hours": ("CLIPSTORE_RETENTION_ACCIDENTAL_HOURS", float),
    "retention.purge_interval_s": ("CLIPSTORE_RETENTION_PURGE_INTERVAL_S", float),
    "review.default_allow": ("CLIPSTORE_REVIEW_DEFAULT_ALLOW", bool),
    "review.sample_rate": ("CLIPSTORE_REVIEW_SAMPLE_RATE", float),
    "review.daily_cap": ("CLIPSTORE_REVIEW_DAILY_CAP", int),
    "review.grant_ttl_s": ("CLIPSTORE_REVIEW_GRANT_TTL_S", int),
    "review.session_lifetime_s": ("CLIPSTORE_REVIEW_SESSION_LIFETIME_S", float),
    "review.session_idle_s": ("CLIPSTORE_REVIEW_SESSION_IDLE_S", float),
    "review.max_failed_codes": ("CLIPSTORE_REVIEW_MAX_FAILED_CODES", int),
    "review.lockout_s": ("CLIPSTORE_REVIEW_LOCKOUT_S", float),
    "metrics.listen": ("CLIPSTORE_METRICS_LISTEN", str),
    "audit.denial_summary_s": ("CLIPSTORE_AUDIT_DENIAL_SUMMARY_S", float),
    "audit.denials_per_principal": ("CLIPSTORE_AUDIT_DENIALS_PER_PRINCIPAL", int),
    **{f"server.{name}": (f"CLIPSTORE_SERVER_{name.upper()}", type(default))
       for name, default in vars(ServingConfig()).items()},
    "log.level": ("CLIPSTORE_LOG_LEVEL", str),
    "auth.trust_domain": ("CLIPSTORE_AUTH_TRUST_DOMAIN", str),
    "auth.key_overlap_s": ("CLIPSTORE_AUTH_KEY_OVERLAP_S", float),
    "audit.tiles": ("CLIPSTORE_AUDIT_TILES", str),
    "audit.tiles_retain_days": ("CLIPSTORE_AUDIT_TILES_RETAIN_DAYS", int),
    "audit.witnesses": ("CLIPSTORE_AUDIT_WITNESSES", str),
    "audit.witness_quorum": ("CLIPSTORE_AUDIT_WITNESS_QUORUM", int),
    "audit.publish_every_s": ("CLIPSTORE_AUDIT_PUBLISH_EVERY_S", float),
    "auth.enrolment_code_ttl_s": ("CLIPSTORE_AUTH_ENROLMENT_CODE_TTL_S", float),
}


# Numbers are positive, except where 0 is a meaningful setting.
_ZERO_ALLOWED = frozenset({"review.sample_rate"})  # 0 switches human review sampling off


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def _coerce(key: str, value: Any, want: type) -> Any:
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(key, f"must be true or false, got {value!r}")
    if want is str:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(key, "must be a non-empty string")
        return value
    if isinstance(value, bool):
        raise ConfigError(key, f"must be a number, got {value!r}")
    try:
        number = want(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(key, f"must be a finite number, got {value!r}")
    if number < 0 or (number == 0 and key not in _ZERO_ALLOWED):
        raise ConfigError(key, f"must be {'0 or more' if key in _ZERO_ALLOWED else 'positive'}, got {value!r}")
    return number


def _check_listen(listen: str) -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("listen", f"must be HOST:PORT, got {listen!r}")


def is_loopback(listen: str) -> bool:
    """True when `listen` binds only the loopback interface."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(*, config_file: Path | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Merge the sources and validate; raises `ConfigError` on the first problem."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    config_file = config_file or (Path(env["CLIPSTORE_CONFIG"]) if env.get("CLIPSTORE_CONFIG") else None)
    if config_file is not None:
        try:
            with config_file.open("rb") as fh:
                table = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError("config", f"cannot read {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{config_file} is not valid TOML: {exc}") from None
        for key, value in _flatten(table).items():
            if key not in _SCHEMA:
                raise ConfigError(key, f"unknown key in {config_file}; known keys: {', '.join(sorted(_SCHEMA))}")
            values[key] = value
    for key, (var, _) in _SCHEMA.items():
        if var in env:
            values[key] = env[var]
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    values = {key: _coerce(key, value, _SCHEMA[key][1]) for key, value in values.items()}
    return _build(values, env)


def _section(values: Mapping[str, Any], name: str) -> dict[str, Any]:
    prefix = f"{name}."
    return {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}


def _build(values: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    listen = values.get("listen", DEFAULT_LISTEN)
    _check_listen(listen)
    database_url = values.get("database_url")
    if database_url is not None and not database_url.startswith(("sqlite:///", "postgresql://")):
        raise ConfigError("database_url", "must start with sqlite:/// or postgresql://")
    s3 = _section(values, "s3")
    if s3 and "bucket" not in s3:
        raise ConfigError("s3.bucket", "is required when any s3.* key is set")
    kms = _section(values, "kms")
    if kms and "key_id" not in kms:
        raise ConfigError("kms.key_id", "is required when any kms.* key is set")
    tls = _section(values, "tls")
    for required in ("cert_file", "key_file"):
        if tls and required not in tls:
            raise ConfigError(f"tls.{required}", "is required when any tls.* key is set")
    if "crl_file" in tls and "client_ca_file" not in tls:
        raise ConfigError("tls.crl_file", "revokes client certificates, so it needs tls.client_ca_file")
    return Config(
        data_dir=Path(values["data_dir"]) if "data_dir" in values else default_data_dir(env),
        listen=listen,
        database_url=database_url,
        s3=S3Config(**s3) if s3 else None,
        kms=KmsConfig(**kms) if kms else None,
        tls=TlsConfig(**{k: Path(v) for k, v in tls.items()}) if tls else None,
        max_message_bytes=values.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES),
        shutdown_grace_s=values.get("shutdown_grace_s", DEFAULT_GRACE_S),
        audit_checkpoint_every_entries=values.get("audit.checkpoint_every_entries", 1000),
        audit_checkpoint_every_s=values.get("audit.checkpoint_every_s", 60.0),
        retention_days=values.get("retention.default_days", 180.0),
        accidental_retention_hours=values.get("retention.accidental_hours", 24.0),
        purge_interval_s=values.get("retention.purge_interval_s", 300.0),
        review_default_allow=values.get("review.default_allow", False),
        review_sample_rate=_sample_rate(values.get("review.sample_rate", 0.02)),
        review_daily_cap=values.get("review.daily_cap", 1000),
        review_grant_ttl_s=_grant_ttl(values.get("review.grant_ttl_s", 120)),
        review_session_lifetime_s=values.get("review.session_lifetime_s", 8 * 3600),
        review_session_idle_s=values.get("review.session_idle_s", 30 * 60),
        review_max_failed_codes=values.get("review.max_failed_codes", 5),
        review_lockout_s=values.get("review.lockout_s", 15 * 60),
        metrics_listen=_metrics_listen(values.get("metrics.listen")),
        log_level=_log_level(values.get("log.level", "info")),
        trust_domain=_trust_domain(values.get("auth.trust_domain", "clipstore")),
        key_overlap_s=_key_overlap(values.get("auth.key_overlap_s", 3600.0)),
        **_witnessing(values),
        enrolment_code_ttl_s=_code_ttl(values.get("auth.enrolment_code_ttl_s", 3600.0)),
        serving=_serving(_section(values, "server")),
        denial_summary_s=values.get("audit.denial_summary_s", 60.0),
        denials_per_principal=values.get("audit.denials_per_principal", 10),
    )


def _serving(section: dict[str, Any]) -> ServingConfig:
    serving = ServingConfig(**section)
    if serving.max_calls_per_principal >= serving.max_workers:
        raise ConfigError("server.max_calls_per_principal", f"must be below server.max_workers "
                                                            f"({serving.max_workers}) so one principal cannot "
                                                            f"hold every worker")
    return serving


def _witnessing(values: Mapping[str, Any]) -> dict[str, Any]:
    witnesses = tuple(w.strip() for w in values.get("audit.witnesses", "").split(",") if w.strip())
    for w in witnesses:
        url, _, key = w.partition(" ")
        if not url.startswith(("http://", "https://")) or not key.strip():
            raise ConfigError("audit.witnesses", "comma-separated 'URL VERIFIER-KEY' entries, e.g. "
                                                 "'https://w1.example w1.example+1a2b3c4d+BA…'")
    quorum = values.get("audit.witness_quorum", len(witnesses))
    if quorum > len(witnesses):
        raise ConfigError("audit.witness_quorum", f"is {quorum} but only {len(witnesses)} witnesses are configured")
    return {"audit_tiles": values.get("audit.tiles"), "audit_tiles_retain_days": values.get("audit.tiles_retain_days"),
            "audit_witnesses": witnesses, "audit_witness_quorum": quorum,
            "audit_publish_every_s": values.get("audit.publish_every_s", 5.0)}
LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(level: str) -> str:
    if level.lower() not in LOG_LEVELS:
        raise ConfigError("log.level", f"one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level.lower()


def _trust_domain(name: str) -> str:
    if not TRUST_DOMAIN_RE.match(name):
        raise ConfigError("auth.trust_domain", f"lower-case letters, digits, '.', '-', '_'; got {name!r}")
    return name


def _code_ttl(seconds: float) -> float:
    if seconds > MAX_ENROLMENT_CODE_TTL_S:
        raise ConfigError("auth.enrolment_code_ttl_s", f"a code is short-lived: at most {MAX_ENROLMENT_CODE_TTL_S} s "
                                                       f"(1 day), got {seconds:g}")
    return seconds


def _key_overlap(seconds: float) -> float:
    if seconds > MAX_KEY_OVERLAP_S:
        raise ConfigError("auth.key_overlap_s", f"at most {MAX_KEY_OVERLAP_S} s (7 days), got {seconds:g}")
    return seconds


def _metrics_listen(listen: str | None) -> str | None:
    if listen is not None:
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError("metrics.listen", f"must be HOST:PORT, got {listen!r}")
        if not is_loopback(listen):
            raise ConfigError("metrics.listen", "metrics are served without TLS; bind a loopback address and "
                                                "let the scraper reach it through your mesh or a sidecar")
    return listen


def _sample_rate(rate: float) -> float:
    if rate > 1:
        raise ConfigError("review.sample_rate", f"is a share between 0 and 1, got {rate}")
    return rate


def _grant_ttl(ttl: int) -> int:
    if ttl > 300:
        raise ConfigError("review.grant_ttl_s", f"grants live at most 300 s, got {ttl}")
    return ttl
