"""What the sync and asyncio clients share: channel settings, credentials, audio framing, retries."""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, cast

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from clipstore import __version__
from clipstore.config import default, is_loopback
from clipstore.v1 import clip_pb2, common_pb2, enrolment_pb2

#: The published gRPC service config: a deadline for every method, and retries (on UNAVAILABLE: "nothing
#: was done") only for methods that are safe to repeat. PutClip is retried by the client, with its key.
SERVICE_CONFIG_JSON = resources.files(__package__).joinpath("service_config.json").read_text()
SERVICE_CONFIG: dict[str, Any] = json.loads(SERVICE_CONFIG_JSON)

# Audio per PutClip message: the most the server takes (clipstore.clips.MAX_CHUNK_BYTES). Each message costs
# both processes a fixed toll (a thread hand-off on each side of grpcio's sync API, framing, a parse); a 5 MiB
# clip in 1 MiB messages took ~4 ms of server and ~3 ms of client CPU on loopback, in 64 KiB messages 8-11
# and 7-13 ms. The server seals whole segments of a large message in place, without copying them.
AUDIO_CHUNK_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_STREAM_TIMEOUT_S = 600.0
MAX_MESSAGE_BYTES: int = default("max_message_bytes")  # as the server's default
AudioInput = bytes | bytearray | memoryview | BinaryIO | Iterable[bytes]


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter, as gRPC's own retry policy."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    @classmethod
    def published(cls) -> RetryPolicy:
        """The retry policy of the published service config, so PutClip backs off like the rest."""
        policy = next(c["retryPolicy"] for c in SERVICE_CONFIG["methodConfig"] if "retryPolicy" in c)
        return cls(max_attempts=policy["maxAttempts"], initial_backoff_s=float(policy["initialBackoff"][:-1]),
                   max_backoff_s=float(policy["maxBackoff"][:-1]), multiplier=float(policy["backoffMultiplier"]))

    def backoff_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return secrets.SystemRandom().uniform(0, ceiling)


@dataclass(frozen=True)
class Transport:
    """Channel credentials (None: plaintext), options and per-call metadata for one target."""

    target: str
    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, Any], ...]
    auth: tuple[tuple[str, str], ...]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Credentials plus a fresh request id, so every error carries one even if the server never answered."""
        return (*self.auth, ("x-request-id", uuid.uuid4().hex))


def _local(target: str) -> bool:
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    return is_loopback(target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:"))


def transport(target: str, *, api_key: str | None, ca_file: str | Path | None, cert_file: str | Path | None,
              key_file: str | Path | None, options: Iterable[tuple[str, Any]]) -> Transport:
    if (cert_file is None) != (key_file is None):
        raise ValueError("mTLS needs both cert_file and key_file")
    credentials = None
    if ca_file is not None or cert_file is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(ca_file).read_bytes() if ca_file is not None else None,
            private_key=Path(key_file).read_bytes() if key_file is not None else None,
            certificate_chain=Path(cert_file).read_bytes() if cert_file is not None else None)
    elif api_key is not None and not _local(target):
        raise ValueError(f"refusing to send an API key in plaintext to {target}: give ca_file (TLS) or use a "
                         "loopback address")
    if api_key is not None and not api_key.startswith("csk_"):
        raise ValueError("api_key must be a clipstore key (csk_…)")
    settings = {
        "grpc.service_config": SERVICE_CONFIG_JSON,
        "grpc.enable_retries": 1,
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.primary_user_agent": f"clipstore-python/{__version__}",
        # Below the server's default minimum ping interval (5 min), which answers faster pings with GOAWAY.
        "grpc.keepalive_time_ms": 300_000,
        "grpc.keepalive_timeout_ms": 20_000,
    }
    settings.update(dict(options))
    auth = (("authorization", f"Bearer {api_key}"),) if api_key is not None else ()
    return Transport(target, credentials, tuple(settings.items()), auth)


# -- PutClip -----------------------------------------------------------------------------------------

def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def timestamp(value: datetime | float | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("captured_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
        ts.FromDatetime(value)
    else:
        ts.FromNanoseconds(int(value * 1e9))
    return ts


def clip_metadata(*, account_id: str, locale: str, content_type: str, wake_word_detected: bool,
                  device_serial: str, device_type: str, captured_at: datetime | float | None, duration_ms: int,
                  idempotency_key: str | None) -> clip_pb2.ClipMetadata:
    return clip_pb2.ClipMetadata(
        identity=clip_pb2.ClipIdentity(account_id=account_id, device_serial=device_serial),
        device_type=device_type, locale=locale, captured_at=timestamp(captured_at),
        wake_word_detected=wake_word_detected, content_type=content_type,
        idempotency_key=idempotency_key or new_idempotency_key(), duration_ms=duration_ms)


def split(chunk: bytes) -> Iterator[bytes]:
    """A caller's chunk as messages of at most AUDIO_CHUNK_BYTES; empty chunks are dropped."""
    for i in range(0, len(chunk), AUDIO_CHUNK_BYTES):
        yield bytes(chunk[i:i + AUDIO_CHUNK_BYTES])


class Audio:
    """The audio of one put_clip: bytes, a binary file or an iterable of bytes.

    `replayable` says whether a retry can send it again: bytes always, a file when
    seekable; an iterator only once (a retry would need the whole clip in memory).
    """

    def __init__(self, audio: AudioInput) -> None:
        self._bytes: bytes | None = None
        self._file: BinaryIO | None = None
        self._iterable: Iterable[bytes] | None = None
        if isinstance(audio, bytes | bytearray | memoryview):
            self._bytes = bytes(audio)
            self.replayable = True
        elif hasattr(audio, "read"):
            self._file = file = cast(BinaryIO, audio)
            self.replayable = file.seekable()
            self._start = file.tell() if self.replayable else 0
            self._lock = threading.Lock()
        elif isinstance(audio, Iterable) and not isinstance(audio, str):
            self._iterable = audio
            self.replayable = False
        else:
            raise TypeError(f"audio must be bytes, a binary file or an iterable of bytes, not {type(audio).__name__}")
        self._sent = False

    def chunks(self) -> Iterator[bytes]:
        if self._sent and not self.replayable:
            raise RuntimeError("this audio was already sent once and cannot be sent again")
        self._sent = True
        if self._bytes is not None:
            return split(self._bytes)
        if self._file is not None:
            return self._read_file()
        assert self._iterable is not None
        return (part for chunk in self._iterable for part in split(chunk))

    def _read_file(self) -> Iterator[bytes]:
        # gRPC reads requests on its own thread, and a failed attempt's reader may still be mid-read when a
        # retry starts: each reader keeps its own offset and seeks under a lock before every read.
        assert self._file is not None
        offset = self._start if self.replayable else None
        while True:
            with self._lock:
                if offset is not None:
                    self._file.seek(offset)
                chunk = self._file.read(AUDIO_CHUNK_BYTES)
            if not chunk:
                return
            if offset is not None:
                offset += len(chunk)
            yield chunk


class Trailer:
    """Counts and hashes the audio as it is sent, for the ClipTrailer the server checks."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._size = 0

    def audio(self, chunk: bytes) -> clip_pb2.PutClipRequest:
        self._digest.update(chunk)
        self._size += len(chunk)
        return clip_pb2.PutClipRequest(audio_chunk=chunk)

    def message(self) -> clip_pb2.PutClipRequest:
        return clip_pb2.PutClipRequest(trailer=clip_pb2.ClipTrailer(size_bytes=self._size,
                                                                    sha256=self._digest.digest()))


def put_requests(meta: clip_pb2.ClipMetadata, chunks: Iterator[bytes]) -> Iterator[clip_pb2.PutClipRequest]:
    """Metadata first, then the audio, then the trailer with its size and SHA-256."""
    yield clip_pb2.PutClipRequest(metadata=meta)
    trailer = Trailer()
    for chunk in chunks:
        yield trailer.audio(chunk)
    yield trailer.message()


def role(value: str | int) -> int:
    """`"ingest"`, `"reviewer"`, `"safety"`, `"auditor"`, `"admin"` or the enum value."""
    if isinstance(value, str):
        try:
            return common_pb2.Role.Value(f"ROLE_{value.upper()}")
        except ValueError:
            raise ValueError(f"unknown role {value!r}") from None
    return value


def enrolment_purpose(value: str | int) -> int:
    """`"enrol"`, `"rotate_totp"`, `"rotate_api_key"` or the enum value."""
    if isinstance(value, str):
        try:
            return enrolment_pb2.EnrolmentPurpose.Value(f"ENROLMENT_PURPOSE_{value.upper()}")
        except ValueError:
            raise ValueError(f"unknown enrolment purpose {value!r}") from None
    return value


def duration(seconds: float | None) -> Duration | None:
    if seconds is None:
        return None
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def flag_category(category: str | int) -> int:
    """`"possible_crime"`, `"distress"`, `"sensitive"`, `"accidental_activation"` or the enum value."""
    if isinstance(category, str):
        try:
            return common_pb2.FlagCategory.Value(f"FLAG_CATEGORY_{category.upper()}")
        except ValueError:
            raise ValueError(f"unknown flag category {category!r}") from None
    return category
