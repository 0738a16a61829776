"""ClipService (roles ingest, admin): PutClip, GetClip, ListClips, DeleteClip."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from clipstore.clips import ClipLibrary, NewClip
from clipstore.errors import InvalidArgument
from clipstore.interceptors import current_actor
from clipstore.store.clips import ClipRow
from clipstore.v1 import clip_pb2, clip_pb2_grpc

CONTENT_TYPES = frozenset({"audio/ogg", "audio/opus", "audio/wav", "audio/flac", "audio/mpeg", "audio/webm",
                           "audio/L16", "audio/pcm"})
_LOCALE_RE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}$")
MAX_ID_CHARS = 256
MAX_SHORT_CHARS = 64
MAX_DURATION_MS = 24 * 3600 * 1000
DEFAULT_PAGE, MAX_PAGE = 100, 1000


def _text(field: str, value: str, *, max_chars: int, required: bool) -> str:
    if required and not value:
        raise InvalidArgument(field, "is required")
    if len(value) > max_chars:
        raise InvalidArgument(field, f"at most {max_chars} characters, got {len(value)}")
    if any(not c.isprintable() for c in value):
        raise InvalidArgument(field, "must not contain control characters")
    return value


def parse_metadata(meta: clip_pb2.ClipMetadata) -> NewClip:
    """Check every field at the boundary; the error names the field."""
    locale = _text("metadata.locale", meta.locale, max_chars=35, required=True)
    if not _LOCALE_RE.match(locale):
        raise InvalidArgument("metadata.locale", "must be a BCP 47 tag such as en-US")
    if meta.content_type not in CONTENT_TYPES:
        raise InvalidArgument("metadata.content_type", f"must be one of {', '.join(sorted(CONTENT_TYPES))}")
    if meta.duration_ms > MAX_DURATION_MS:
        raise InvalidArgument("metadata.duration_ms", f"at most {MAX_DURATION_MS}")
    return NewClip(
        account_id=_text("metadata.identity.account_id", meta.identity.account_id, max_chars=MAX_ID_CHARS,
                         required=True),
        device_serial=_text("metadata.identity.device_serial", meta.identity.device_serial,
                            max_chars=MAX_ID_CHARS, required=False),
        device_type=_text("metadata.device_type", meta.device_type, max_chars=MAX_SHORT_CHARS, required=False),
        locale=locale,
        captured_at=meta.captured_at.ToNanoseconds() / 1e9 if meta.HasField("captured_at") else None,
        wake_word=meta.wake_word_detected,
        content_type=meta.content_type,
        idempotency_key=_text("metadata.idempotency_key", meta.idempotency_key, max_chars=128, required=True),
        duration_ms=meta.duration_ms,
    )


def _ts(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def clip_message(clip: ClipRow, identity: dict[str, str] | None) -> clip_pb2.Clip:
    msg = clip_pb2.Clip(clip_id=clip.clip_id, size_bytes=clip.size_bytes, content_type=clip.content_type,
                        locale=clip.locale, wake_word_detected=clip.wake_word, duration_ms=clip.duration_ms,
                        captured_at=_ts(clip.captured_at), expires_at=_ts(clip.expires_at))
    if identity is not None:
        msg.identity.CopyFrom(clip_pb2.ClipIdentity(**identity))
    return msg


def _audio(first_rest: Iterator[clip_pb2.PutClipRequest]) -> Iterator[bytes]:
    for request in first_rest:
        if request.WhichOneof("part") != "audio_chunk":
            raise InvalidArgument("metadata", "only the first message may carry metadata; send audio_chunk next")
        yield request.audio_chunk


class ClipServicer(clip_pb2_grpc.ClipServiceServicer):
    def __init__(self, library: ClipLibrary) -> None:
        self._library = library

    def PutClip(self, request_iterator: Iterator[clip_pb2.PutClipRequest],
                context: grpc.ServicerContext) -> clip_pb2.PutClipResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "metadata":
            raise InvalidArgument("metadata", "the first message must carry the clip metadata")
        new = parse_metadata(first.metadata)
        clip = self._library.ingest(new, _audio(request_iterator), current_actor())
        return clip_pb2.PutClipResponse(clip=clip_message(clip, None))

    def GetClip(self, request: clip_pb2.GetClipRequest, context: grpc.ServicerContext) -> clip_pb2.GetClipResponse:
        _text("clip_id", request.clip_id, max_chars=MAX_SHORT_CHARS, required=True)
        clip = self._library.get(request.clip_id)
        # Only ingest and admin reach this service (see auth.METHOD_ROLES): they may see identity.
        return clip_pb2.GetClipResponse(clip=clip_message(clip, self._library.identity(clip)))

    def ListClips(self, request: clip_pb2.ListClipsRequest,
                  context: grpc.ServicerContext) -> clip_pb2.ListClipsResponse:
        account_id = _text("account_id", request.account_id, max_chars=MAX_ID_CHARS, required=True)
        if request.page_size > MAX_PAGE:
            raise InvalidArgument("page_size", f"at most {MAX_PAGE}, got {request.page_size}")
        try:
            after = base64.urlsafe_b64decode(request.page_token.encode()).decode() if request.page_token else ""
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidArgument("page_token", "not a token this service issued; start without one") from None
        limit = request.page_size or DEFAULT_PAGE
        clips = self._library.list(account_id, after=after, limit=limit)
        token = base64.urlsafe_b64encode(clips[-1].clip_id.encode()).decode() if len(clips) == limit else ""
        return clip_pb2.ListClipsResponse(clips=[clip_message(c, self._library.identity(c)) for c in clips],
                                          next_page_token=token)

    def DeleteClip(self, request: clip_pb2.DeleteClipRequest,
                   context: grpc.ServicerContext) -> clip_pb2.DeleteClipResponse:
        _text("clip_id", request.clip_id, max_chars=MAX_SHORT_CHARS, required=True)
        self._library.delete(request.clip_id, current_actor())
        return clip_pb2.DeleteClipResponse()
