"""Configuration: defaults < TOML file < CLIPSTORE_* environment < flags.

With nothing given, clipstore runs embedded: a data dir holding a local root
key, a SQLite database and a file blob store, listening on 127.0.0.1:50051.
Every problem is reported as one `ConfigError` naming the key.

Each setting is defined once, in `SETTINGS`; parsing, the README's settings
table (`python -m clipstore.config README.md`) and `clipstore serve
--print-config` all come from it.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipstore.audio.fetch import DISGUISE_NAMES, DISGUISE_OFF, parse_disguise_locales
from clipstore.grants import MAX_GRANT_TTL_S

MAX_ENROLMENT_CODE_TTL_S = 86400  # a code travels out of band; the shorter it lives, the less it is worth
MAX_KEY_OVERLAP_S = 7 * 86400  # an overlap is for rolling a deployment, not a second key for good
# SPIFFE-ID spec §2.1: the trust domain of the ids client certificates carry.
TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]{1,255}$")
LOG_LEVELS = ("debug", "info", "warning", "error")
ENV_PREFIX = "CLIPSTORE_"


class ConfigError(Exception):
    """A configuration value is missing, unknown or malformed."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config error: {key}: {problem}")
        self.key = key


# -- validators: take the typed value, return it (normalised) or raise ValueError(what is wrong) --------

_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits: str.isdigit() also takes '²' (int() refuses it) and '١٢' (12)

def _host_port(listen: str) -> str:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not _PORT.fullmatch(port) or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT, got {listen!r}")
    return listen


def is_loopback(listen: str) -> bool:
    """True when `listen` binds only the loopback interface."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _metrics_listen(listen: str) -> str:
    host, sep, port = listen.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT, got {listen!r}")
    if not is_loopback(listen):
        raise ValueError("metrics are served without TLS; bind a loopback address and "
                         "let the scraper reach it through your mesh or a sidecar")
    return listen


def _database_url(url: str) -> str:
    if not url.startswith(("sqlite:///", "postgresql://")):
        raise ValueError("must start with sqlite:/// or postgresql://")
    return url


def _log_level(level: str) -> str:
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level.lower()


def _trust_domain(name: str) -> str:
    if not TRUST_DOMAIN_RE.match(name):
        raise ValueError(f"lower-case letters, digits, '.', '-', '_'; got {name!r}")
    return name


def _at_most(limit: float, problem: str) -> Callable[[Any], Any]:
    """A cap; `problem` may use {limit} and {value}."""
    def check(value: Any) -> Any:
        if value > limit:
            raise ValueError(problem.format(limit=limit, value=value))
        return value
    return check


def _disguise(name: str) -> str:
    if name not in DISGUISE_NAMES:
        raise ValueError(f"one of {', '.join(sorted(DISGUISE_NAMES))}, got {name!r}")
    return name


def _on_off(value: str) -> str:
    if value not in ("on", "off"):
        raise ValueError(f"on or off, got {value!r}")
    return value


def audio_extra_installed() -> bool:
    try:
        import av  # noqa: F401
        import numpy  # noqa: F401
        import scipy  # noqa: F401
        import soundfile  # noqa: F401
    except ImportError:
        return False
    return True


def _disguise_locales(text: str) -> str:
    parse_disguise_locales(text)  # raises ValueError naming the bad entry
    return text


def _witnesses(text: str) -> tuple[str, ...]:
    witnesses = tuple(w.strip() for w in text.split(",") if w.strip())
    for w in witnesses:
        url, _, key = w.partition(" ")
        if not url.startswith(("http://", "https://")) or not key.strip():
            raise ValueError("comma-separated 'URL VERIFIER-KEY' entries, e.g. "
                             "'https://w1.example w1.example+1a2b3c4d+BA…'")
    return witnesses


# -- the registry ----------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Setting:
    """One setting: where it is read from, its type, default, limits and what it means."""

    key: str  # dotted, as in the TOML file
    type: type[Any]  # str, int, float, bool or Path; numbers must be positive unless zero_ok
    default: Any  # None: unset
    help: str  # one line: the README table's "meaning"
    check: Callable[[Any], Any] | None = None  # typed value -> value; raises ValueError(problem)
    zero_ok: bool = False  # 0 is a meaningful value, not a mistake
    secret: bool = False  # the value is never printed (--print-config, error messages)
    required: bool = False  # must be given when any other key of its section is
    flag: str | None = None  # the command-line flag that sets it (serve and the local commands)
    attr: str = ""  # the Config attribute, when it is not the key with dots as underscores
    default_text: str | None = None  # for the README, when the default is worked out at load time

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper().replace(".", "_")

    @property
    def section(self) -> str:
        return self.key.partition(".")[0] if "." in self.key else ""


# How to add a setting: append one `Setting` below (key as in the TOML file; the environment variable is
# CLIPSTORE_ + the key upper-cased with dots as underscores), add its field to `Config` (or to the section's
# dataclass: S3Config, KmsConfig, TlsConfig, ServingConfig; name it in `attr` if it is not the key with dots
# as underscores), read it from the Config where it is used (never a second default there), then run
# `python -m clipstore.config README.md`. tests/test_settings.py checks that each has help, a unique variable,
# a field of the right type, and that secrets are marked.
SETTINGS: tuple[Setting, ...] = (
    Setting(key="data_dir", type=Path, default=None, flag="--data-dir",
            default_text="`$XDG_DATA_HOME/clipstore` or `~/.local/share/clipstore`",
            help="root key, SQLite file, file blobs"),
    Setting(key="listen", type=str, default="127.0.0.1:50051", flag="--listen", check=_host_port,
            help="gRPC address; a non-loopback address requires `tls.*`"),
    Setting(key="database_url", type=str, default=None, flag="--database-url", check=_database_url,
            default_text="`sqlite:///<data_dir>/clipstore.db`",
            help="or `postgresql://user@host/db` (a password in it is never printed)"),
    Setting(key="max_message_bytes", type=int, default=4 << 20,
            help="gRPC max send/receive message; bounds memory per message. Keep it above 1.1 MiB: the client "
                 "library sends PutClip audio in 1 MiB messages"),
    Setting(key="shutdown_grace_s", type=float, default=10.0,
            help="drain time for in-flight RPCs on SIGTERM/SIGINT"),
    Setting(key="log.level", type=str, default="info", flag="--log-level", check=_log_level,
            help=f"log verbosity: {', '.join(f'`{level}`' for level in LOG_LEVELS)}"),
    Setting(key="s3.bucket", type=str, default=None, required=True, default_text="unset (file blobs)",
            help="S3-compatible blob store; the other `s3.*` keys need it"),
    Setting(key="s3.endpoint_url", type=str, default=None, default_text="unset (AWS)",
            help="an S3-compatible endpoint"),
    Setting(key="s3.region", type=str, default=None, help="the bucket's region (unset: the AWS default chain)"),
    Setting(key="s3.prefix", type=str, default="clips/", help="object key prefix"),
    Setting(key="s3.profile", type=str, default=None, help="AWS profile for the S3 client"),
    Setting(key="s3.sse_kms_key_id", type=str, default=None,
            help="SSE-KMS key for the objects, as defence in depth (clips are encrypted already)"),
    Setting(key="kms.key_id", type=str, default=None, required=True, default_text="unset (local root key)",
            help="AWS KMS root key (id, ARN or alias); the other `kms.*` keys need it"),
    Setting(key="kms.endpoint_url", type=str, default=None, default_text="unset (AWS)",
            help="a KMS-compatible endpoint"),
    Setting(key="kms.region", type=str, default=None, help="the key's region (unset: the AWS default chain)"),
    Setting(key="tls.cert_file", type=Path, default=None, required=True, flag="--tls-cert",
            help="server certificate (PEM); enables TLS; SIGHUP reloads the `tls.*` files"),
    Setting(key="tls.key_file", type=Path, default=None, required=True, flag="--tls-key",
            help="server private key (PEM)"),
    Setting(key="tls.client_ca_file", type=Path, default=None, flag="--client-ca",
            help="CA (PEM) that client certificates must chain to: client certificates are then required"),
    Setting(key="tls.crl_file", type=Path, default=None,
            help="CRL (PEM) of revoked client certificates; needs `tls.client_ca_file`"),
    Setting(key="auth.trust_domain", type=str, default="clipstore", check=_trust_domain, attr="trust_domain",
            help="trust domain of the SPIFFE ids that name principals"),
    Setting(key="auth.key_overlap_s", type=float, default=3600.0, attr="key_overlap_s",
            check=_at_most(MAX_KEY_OVERLAP_S, "at most {limit} s (7 days), got {value:g}"),
            help="how long a rotated API key keeps working (≤ 7 days)"),
    Setting(key="auth.enrolment_code_ttl_s", type=float, default=3600.0, attr="enrolment_code_ttl_s",
            check=_at_most(MAX_ENROLMENT_CODE_TTL_S, "a code is short-lived: at most {limit} s (1 day), "
                                                     "got {value:g}"),
            help="lifetime of a reviewer's enrolment code (≤ 1 day)"),
    Setting(key="review.default_allow", type=bool, default=False,
            help="human review of an account that never chose: false makes it opt-in"),
    Setting(key="review.sample_rate", type=float, default=0.02, zero_ok=True,
            check=_at_most(1, "is a share between 0 and 1, got {value}"),
            help="share of eligible clips queued for review (0 switches human review off)"),
    Setting(key="review.daily_cap", type=int, default=1000, help="assignments per reviewer per UTC day"),
    Setting(key="review.grant_ttl_s", type=int, default=120,
            check=_at_most(MAX_GRANT_TTL_S, "grants live at most {limit} s, got {value}"),
            help=f"lifetime of a grant to hear one clip (≤ {MAX_GRANT_TTL_S})"),
    Setting(key="review.session_lifetime_s", type=float, default=8 * 3600.0,
            help="an MFA review session ends this long after it started"),
    Setting(key="review.session_idle_s", type=float, default=30 * 60.0,
            help="... or after this long without a call"),
    Setting(key="review.max_failed_codes", type=int, default=5, help="wrong TOTP codes before a lockout"),
    Setting(key="review.lockout_s", type=float, default=15 * 60.0,
            help="the first lockout; each further one doubles, up to a day"),
    Setting(key="review.disguise", type=str, default=DISGUISE_OFF, check=_disguise,
            help="voice disguise of what FetchClip streams: `off`, `pitch_formant` or `pitch_formant_strong` (more "
                 "anonymity, fewer words kept; needs the audio extra; docs/voice-disguise.md)"),
    Setting(key="review.disguise_locales", type=str, default=None, check=_disguise_locales, default_text="none",
            help="per locale or language, e.g. `en-US=off,de=pitch_formant`; wins over `review.disguise`"),
    Setting(key="review.require_transform", type=bool, default=False,
            help="refuse a fetch whose clip cannot be disguised or watermarked (`AUDIO_FORMAT_UNSUPPORTED`) "
                 "instead of serving it unchanged"),
    Setting(key="review.watermark", type=str, default=None, check=_on_off,
            default_text="`on` with the audio extra, else `off`",
            help="`on`: every processable clip a reviewer fetches carries a forensic watermark naming that fetch "
                 "(docs/watermark.md)"),
    Setting(key="retention.default_days", type=float, default=180.0, attr="retention_days",
            help="clip lifetime"),
    Setting(key="retention.accidental_hours", type=float, default=24.0, attr="accidental_retention_hours",
            help="lifetime of a clip without the wake word (an accidental activation)"),
    Setting(key="retention.purge_interval_s", type=float, default=300.0, attr="purge_interval_s",
            help="how often expired clips are purged"),
    Setting(key="audit.checkpoint_every_entries", type=int, default=1000,
            help="a signed checkpoint after this many entries ..."),
    Setting(key="audit.checkpoint_every_s", type=float, default=60.0, help="... or this many seconds"),
    Setting(key="audit.tiles", type=str, default=None, default_text="unset (off)",
            help="publish the log as C2SP tlog-tiles to a directory or `s3://bucket/prefix`"),
    Setting(key="audit.tiles_retain_days", type=int, default=None,
            help="S3 Object Lock (compliance) retention of each published object, in days; needs `audit.tiles` on `s3://`"),
    Setting(key="audit.witnesses", type=str, default=(), check=_witnesses, default_text="none",
            help="comma-separated `URL VERIFIER-KEY` witnesses that cosign checkpoints"),
    Setting(key="audit.witness_quorum", type=int, default=None, default_text="all",
            help="cosignatures needed before a checkpoint is published"),
    Setting(key="audit.publish_every_s", type=float, default=5.0, help="publishing cadence"),
    Setting(key="audit.report_checkpoint_min_interval_s", type=float, default=1.0, zero_ok=True,
            help="access reports share checkpoints: a new one is signed and sent to the witnesses for them at most "
                 "once per this interval (reports asked meanwhile wait for it; 0: no spacing)"),
    Setting(key="audit.denial_summary_s", type=float, default=60.0, attr="denial_summary_s",
            help="refused calls are counted: one `auth.deny_summary` entry per peer (anonymous) or principal "
                 "per interval"),
    Setting(key="audit.denials_per_principal", type=int, default=10, attr="denials_per_principal",
            help="a principal's first N refusals per interval (credentials, roles and the domain's own, "
                 "together) are appended one by one; the rest are counted into its summary entry"),
    Setting(key="metrics.listen", type=str, default=None, check=_metrics_listen, default_text="unset (off)",
            help="Prometheus endpoint, loopback only"),
    Setting(key="server.max_workers", type=int, default=64,
            help="threads serving RPCs (health and reflection have their own few)"),
    Setting(key="server.max_calls_per_principal", type=int, default=24,
            help="calls one principal may have in flight (`TOO_MANY_CALLS` beyond); below `server.max_workers`"),
    Setting(key="server.max_identify_leak_calls", type=int, default=2,
            help="IdentifyLeak calls in flight on the server, whoever calls (`IDENTIFY_LEAK_BUSY` beyond): each "
                 "buffers up to 64 MiB of audio"),
    Setting(key="server.max_streams_per_connection", type=int, default=100,
            help="HTTP/2 concurrent streams on one connection"),
    Setting(key="server.request_body_timeout_s", type=float, default=10.0,
            help="a call's message must arrive within this"),
    Setting(key="server.stream_max_s", type=float, default=300.0,
            help="a streaming call (PutClip, FetchClip, health Watch, reflection) may last this long "
                 "(`STREAM_TOO_LONG`, or cancelled if stalled)"),
    Setting(key="server.keepalive_s", type=float, default=60.0, help="ping an idle connection this often ..."),
    Setting(key="server.keepalive_timeout_s", type=float, default=20.0,
            help="... and drop it if the ping is not answered in this time"),
    Setting(key="server.max_connection_idle_s", type=float, default=300.0,
            help="close a connection without calls after this long"),
    Setting(key="server.max_connection_age_s", type=float, default=3600.0,
            help="then ask the client to reconnect (rebalances; calls in flight get `server.stream_max_s`)"),
)
BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
# CLIPSTORE_* variables that are not settings: the config file's path, the CLI's credentials and target, tests.
OTHER_ENV = frozenset({"CLIPSTORE_CONFIG", "CLIPSTORE_API_KEY", "CLIPSTORE_SERVER", "CLIPSTORE_ENROLMENT_CODE",
                       "CLIPSTORE_TEST_PG"})


def unknown_env(env: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """CLIPSTORE_* variables that name no setting (a typo such as CLIPSTORE_S3_BUKET would otherwise leave the
    embedded default in force without a word), each with the setting variable it most resembles, if any."""
    import difflib
    env = os.environ if env is None else env
    known = [s.env for s in SETTINGS]
    return [(name, next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.8)), None))
            for name in sorted(env) if name.startswith("CLIPSTORE_") and name not in OTHER_ENV
            and name not in known]


def default(key: str) -> Any:
    """The default of one setting, for code that needs it without a Config (clients, benches)."""
    return BY_KEY[key].default


# -- the typed view the service reads ---------------------------------------------------------------------
# No defaults here: every value comes from SETTINGS through `load_config`.

@dataclass(frozen=True, kw_only=True)
class S3Config:
    bucket: str
    endpoint_url: str | None
    region: str | None
    prefix: str
    profile: str | None
    sse_kms_key_id: str | None


@dataclass(frozen=True, kw_only=True)
class KmsConfig:
    key_id: str
    endpoint_url: str | None
    region: str | None


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None
    crl_file: Path | None  # revoked client certificates; needs client_ca_file


@dataclass(frozen=True, kw_only=True)
class ServingConfig:
    """How much of the server one caller may hold, and for how long (keys `server.*`)."""

    max_workers: int
    max_calls_per_principal: int
    max_identify_leak_calls: int
    max_streams_per_connection: int
    request_body_timeout_s: float
    stream_max_s: float
    keepalive_s: float
    keepalive_timeout_s: float
    max_connection_idle_s: float
    max_connection_age_s: float


@dataclass(frozen=True, kw_only=True)
class Config:
    data_dir: Path
    listen: str
    database_url: str | None
    s3: S3Config | None
    kms: KmsConfig | None
    tls: TlsConfig | None
    max_message_bytes: int
    shutdown_grace_s: float
    audit_checkpoint_every_entries: int
    audit_checkpoint_every_s: float
    retention_days: float
    accidental_retention_hours: float
    review_default_allow: bool
    purge_interval_s: float
    review_sample_rate: float
    review_daily_cap: int
    review_grant_ttl_s: int
    review_session_lifetime_s: float
    review_session_idle_s: float
    review_max_failed_codes: int
    review_lockout_s: float
    review_disguise: str
    review_disguise_locales: str | None
    review_require_transform: bool
    review_watermark: str  # "on" or "off"; unset means on when the audio extra is installed
    metrics_listen: str | None
    audit_tiles: str | None  # a directory or s3://bucket/prefix for the C2SP tlog-tiles
    audit_tiles_retain_days: int | None  # S3 Object Lock (compliance) retention per object
    audit_witnesses: tuple[str, ...]  # "URL VERIFIER-KEY" per witness
    audit_witness_quorum: int
    audit_publish_every_s: float
    audit_report_checkpoint_min_interval_s: float
    log_level: str
    trust_domain: str
    key_overlap_s: float
    enrolment_code_ttl_s: float
    serving: ServingConfig
    denial_summary_s: float  # anonymous denials: one audit entry per peer per this interval
    denials_per_principal: int  # identified denials appended one by one per interval; the rest counted

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'clipstore.db'}"

    @property
    def root_key_file(self) -> Path:
        return self.data_dir / "root.key"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"


# Key prefix -> (Config field, dataclass, present only when one of its keys is given).
SECTIONS: dict[str, tuple[str, type[Any], bool]] = {
    "s3": ("s3", S3Config, True),
    "kms": ("kms", KmsConfig, True),
    "tls": ("tls", TlsConfig, True),
    "server": ("serving", ServingConfig, False),
}


def attribute(setting: Setting) -> str:
    """Where a Config keeps the setting: `retention_days`, `serving.max_workers`, `s3.bucket`."""
    if setting.attr:
        return setting.attr
    if setting.section in SECTIONS:
        return f"{SECTIONS[setting.section][0]}.{setting.key.partition('.')[2]}"
    return setting.key.replace(".", "_")


def value_of(config: Config, setting: Setting) -> Any:
    """The setting's value in a built Config (None when unset or its section is absent)."""
    value: Any = config
    for name in attribute(setting).split("."):
        value = getattr(value, name) if value is not None else None
    return value


# -- loading ------------------------------------------------------------------------------------------------

def default_data_dir(env: Mapping[str, str]) -> Path:
    """`$XDG_DATA_HOME/clipstore`, else ~/.local/share/clipstore."""
    base = Path(env["XDG_DATA_HOME"]) if env.get("XDG_DATA_HOME") else Path.home() / ".local" / "share"
    return base / "clipstore"


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def _coerce(setting: Setting, value: Any) -> Any:
    key, want = setting.key, setting.type
    got = "" if setting.secret else f", got {value!r}"
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(key, f"must be true or false{got}")
    if want in (str, Path):
        if isinstance(value, os.PathLike) and want is Path:
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(key, "must be a non-empty string")
        return want(value)
    if isinstance(value, bool):
        raise ConfigError(key, f"must be a number{got}")
    try:
        number = want(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be a number{got}") from None
    if not math.isfinite(number):
        raise ConfigError(key, f"must be a finite number{got}")
    if number < 0 or (number == 0 and not setting.zero_ok):
        raise ConfigError(key, f"must be {'0 or more' if setting.zero_ok else 'positive'}{got}")
    return number


def _parse(setting: Setting, value: Any) -> Any:
    value = _coerce(setting, value)
    if setting.check is None:
        return value
    try:
        return setting.check(value)
    except ValueError as exc:
        raise ConfigError(setting.key, "is malformed" if setting.secret else str(exc)) from None


@dataclass(frozen=True)
class Loaded:
    config: Config
    sources: Mapping[str, str]  # key -> "file PATH", "env VAR" or "flag"; a key not here has its default


def load(*, config_file: Path | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Loaded:
    """Merge the sources and validate, remembering where each value came from; raises `ConfigError` on the
    first problem."""
    env = os.environ if env is None else env
    given: dict[str, tuple[Any, str]] = {}
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
            if key not in BY_KEY:
                raise ConfigError(key, f"unknown key in {config_file}; known keys: {', '.join(sorted(BY_KEY))}")
            given[key] = (value, f"file {config_file}")
    for setting in SETTINGS:
        if setting.env in env:
            given[setting.key] = (env[setting.env], f"env {setting.env}")
    for key, value in (overrides or {}).items():
        if key not in BY_KEY:
            raise ConfigError(key, "unknown setting")
        if value is not None:
            given[key] = (value, "flag")
    values = {key: _parse(BY_KEY[key], value) for key, (value, _) in given.items()}
    return Loaded(_build(values, env), {key: source for key, (_, source) in given.items()})


def load_config(*, config_file: Path | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Merge the sources and validate; raises `ConfigError` on the first problem."""
    return load(config_file=config_file, env=env, overrides=overrides).config


def _build(given: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    values = {s.key: given.get(s.key, s.default) for s in SETTINGS}
    top: dict[str, Any] = {}
    for prefix, (name, cls, optional) in SECTIONS.items():
        members = [s for s in SETTINGS if s.section == prefix]
        if optional and not any(s.key in given for s in members):
            top[name] = None
            continue
        for s in members:
            if s.required and values[s.key] is None:
                raise ConfigError(s.key, f"is required when any {prefix}.* key is set")
        top[name] = cls(**{attribute(s).partition(".")[2]: values[s.key] for s in members})
    top.update({attribute(s): values[s.key] for s in SETTINGS if s.section not in SECTIONS})
    if top["data_dir"] is None:
        top["data_dir"] = default_data_dir(env)
    if top["review_watermark"] is None:
        top["review_watermark"] = "on" if audio_extra_installed() else "off"
    if top["audit_witness_quorum"] is None:
        top["audit_witness_quorum"] = len(top["audit_witnesses"])
    config = Config(**top)
    _check_together(config)
    return config


def _check_together(config: Config) -> None:
    """The rules that tie settings to each other."""
    if config.tls is None and not is_loopback(config.listen):  # also here so --print-config refuses it as serve does
        raise ConfigError("listen", f"{config.listen} is not a loopback address and TLS is not "
                                    "configured; set tls.cert_file and tls.key_file or bind 127.0.0.1")
    if config.audit_tiles_retain_days is not None and not (config.audit_tiles or "").startswith("s3://"):
        raise ConfigError("audit.tiles_retain_days", "is S3 Object Lock retention, so it needs audit.tiles = "
                                                     "\"s3://bucket/prefix\"; a directory's files are not locked")
    if config.tls is not None and config.tls.crl_file is not None and config.tls.client_ca_file is None:
        raise ConfigError("tls.crl_file", "revokes client certificates, so it needs tls.client_ca_file")
    serving = config.serving
    if serving.max_calls_per_principal >= serving.max_workers:
        raise ConfigError("server.max_calls_per_principal", f"must be below server.max_workers "
                                                            f"({serving.max_workers}) so one principal cannot "
                                                            f"hold every worker")
    disguised = {config.review_disguise, *parse_disguise_locales(config.review_disguise_locales or "").values()}
    if disguised - {DISGUISE_OFF} and not audio_extra_installed():
        raise ConfigError("review.disguise", "needs the audio extra: pip install 'clipstore[audio]'")
    if config.review_watermark == "on" and not audio_extra_installed():
        raise ConfigError("review.watermark", "needs the audio extra: pip install 'clipstore[audio]'")
    if config.audit_witness_quorum > len(config.audit_witnesses):
        raise ConfigError("audit.witness_quorum", f"is {config.audit_witness_quorum} but only "
                                                  f"{len(config.audit_witnesses)} witnesses are configured")


# -- what the registry tells people: --print-config and the README table -----------------------------------

REDACTED = "<redacted>"
_URL_USERINFO = re.compile(r"(?<=://)([^/?#\s]*)@")  # greedy: up to the last '@' of the authority
_PASSWORD_PARAM = re.compile(r"(?i)(password=)[^&\s\"]*")


def scrub(text: str) -> str:
    """`text` without the password of any URL in it (`user:<redacted>@host`, `?password=<redacted>`)."""
    def userinfo(match: re.Match[str]) -> str:
        user, colon, _ = match.group(1).partition(":")
        return f"{user}:{REDACTED}@" if colon else match.group(0)
    return _PASSWORD_PARAM.sub(rf"\g<1>{REDACTED}", _URL_USERINFO.sub(userinfo, text))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        value = ", ".join(value)
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string


def describe(loaded: Loaded) -> str:
    """Every setting as a TOML line: its effective value (secrets and URL passwords redacted) and, after '#',
    where it came from. Unset settings are comments."""
    lines = ["# clipstore: effective configuration (secrets redacted); after '#': default, file, env or flag"]
    for s in SETTINGS:
        source = loaded.sources.get(s.key, "default")
        value = value_of(loaded.config, s)
        if value is None or value == ():
            lines.append(f"# {s.key} = (unset)  # {source}")
            continue
        text = json.dumps(REDACTED) if s.secret else scrub(_toml(value))
        lines.append(f"{s.key} = {text}  # {source}")
    return "\n".join(lines) + "\n"


def _readme_default(s: Setting) -> str:
    if s.default_text is not None:
        return s.default_text
    value = s.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return f"`{value}`" if isinstance(value, str) else str(value)


def settings_table_markdown() -> str:
    """The README's settings table, one row per setting (tests keep the README equal to this)."""
    rows = ["| key (TOML) | environment | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{s.key}` | `{s.env}`{f' (`{s.flag}`)' if s.flag else ''} | {_readme_default(s)} | {s.help} |"
             for s in SETTINGS]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m clipstore.config README.md: regenerate the table in place
    from clipstore.readme import rewrite_main

    rewrite_main(settings_table_markdown)
