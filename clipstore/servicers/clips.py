"""ClipService (roles ingest, admin): PutClip, GetClip, ListClips, DeleteClip."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from clipstore.clips import ClipLibrary, NewClip
from clipstore.errors import Cancelled, InvalidArgument
from clipstore.interceptors import current_actor
from clipstore.locales import canonical_locale
from clipstore.rows import ClipRow
from clipstore.servicers.common import (
    LOCALE_RE,
    MAX_ID_CHARS,
    MAX_SHORT_CHARS,
    next_token,
    optional_instant,
    page_after,
    page_limit,
    text,
    timestamp,
)
from clipstore.v1 import clip_pb2, clip_pb2_grpc

PUT_CLIP_METHOD = "/clipstore.v1.ClipService/PutClip"
_AUDIO_CHUNK_TAG = 0x12  # PutClipRequest field 2 (audio_chunk), wire type 2 (length-delimited)
_LENGTH_VARINT_BYTES = 5  # upb reads a length in at most 5 bytes (minimal or not); longer is corrupt to it
CONTENT_TYPES = frozenset({"audio/ogg", "audio/opus", "audio/wav", "audio/flac", "audio/mpeg", "audio/webm",
                           "audio/L16", "audio/pcm"})
MAX_DURATION_MS = 24 * 3600 * 1000


def parse_put_clip_request(raw: bytes) -> clip_pb2.PutClipRequest | memoryview:
    """`PutClipRequest.FromString`, except that a message holding nothing but an audio chunk comes back
    as a read-only view of the chunk inside `raw`.

    Such a message is one field on the wire: tag 0x12, the chunk's length as a varint, the chunk, up to
    the end. upb would copy the chunk into its arena and again on the read of the field: two copies of
    every audio byte, into fresh memory (5 MiB in 1 MiB messages, parsed, hashed and sealed in-process:
    9.6 -> 5.9 ms CPU). Anything else (metadata, trailer, a chunk with other fields beside it, a length
    upb would refuse) goes to protobuf, which decides it as before; the bytes on the wire are the same.
    """
    if len(raw) > 2 and raw[0] == _AUDIO_CHUNK_TAG:
        length, shift, pos = 0, 0, 1
        while pos < min(len(raw), 1 + _LENGTH_VARINT_BYTES):
            byte = raw[pos]
            length |= (byte & 0x7F) << shift
            pos += 1
            if byte < 0x80:
                if pos + length == len(raw):
                    return memoryview(raw)[pos:]  # read-only: a view of bytes
                break
            shift += 7
    return clip_pb2.PutClipRequest.FromString(raw)


def parse_metadata(meta: clip_pb2.ClipMetadata) -> NewClip:
    """Check every field at the boundary; the error names the field."""
    locale = text("metadata.locale", meta.locale, max_chars=35, required=True)
    if not LOCALE_RE.match(locale):
        raise InvalidArgument("metadata.locale", "must be a BCP 47 tag such as en-US")
    locale = canonical_locale(locale)  # `en-us` is `en-US`: the reviewers enrolled for it must get it
    if meta.content_type not in CONTENT_TYPES:
        raise InvalidArgument("metadata.content_type", f"must be one of {', '.join(sorted(CONTENT_TYPES))}")
    if meta.duration_ms > MAX_DURATION_MS:
        raise InvalidArgument("metadata.duration_ms", f"at most {MAX_DURATION_MS}")
    return NewClip(
        account_id=text("metadata.identity.account_id", meta.identity.account_id, max_chars=MAX_ID_CHARS,
                         required=True),
        device_serial=text("metadata.identity.device_serial", meta.identity.device_serial,
                            max_chars=MAX_ID_CHARS, required=False),
        device_type=text("metadata.device_type", meta.device_type, max_chars=MAX_SHORT_CHARS, required=False),
        locale=locale,
        captured_at=optional_instant("metadata.captured_at", meta.HasField("captured_at"), meta.captured_at),
        wake_word=meta.wake_word_detected,
        content_type=meta.content_type,
        idempotency_key=text("metadata.idempotency_key", meta.idempotency_key, max_chars=128, required=True),
        duration_ms=meta.duration_ms,
    )


def _ts(seconds: float | None) -> Timestamp | None:
    return None if seconds is None else timestamp(seconds)


def clip_message(clip: ClipRow, identity: dict[str, str] | None) -> clip_pb2.Clip:
    msg = clip_pb2.Clip(clip_id=clip.clip_id, size_bytes=clip.size_bytes, content_type=clip.content_type,
                        locale=canonical_locale(clip.locale),  # a row stored before may be `en-us`
                        wake_word_detected=clip.wake_word, duration_ms=clip.duration_ms,
                        captured_at=_ts(clip.captured_at), expires_at=_ts(clip.expires_at))
    if identity is not None:
        msg.identity.CopyFrom(clip_pb2.ClipIdentity(**identity))
    return msg


class _Upload:
    """A PutClip stream's audio (`clipstore.clips.Upload`): the chunks, then the SHA-256 the trailer matched."""

    def __init__(self, rest: Iterator[clip_pb2.PutClipRequest | memoryview], context: grpc.ServicerContext) -> None:
        self._sha256: bytes | None = None
        self._chunks = _audio(rest, context, self._ended)

    def __iter__(self) -> Iterator[bytes | memoryview]:
        return self._chunks

    def _ended(self, sha256: bytes) -> None:
        self._sha256 = sha256

    def sha256(self) -> bytes:
        if self._sha256 is None:
            raise RuntimeError("the upload's SHA-256 is known only once its chunks ended at a matching trailer")
        return self._sha256


def _audio(rest: Iterator[clip_pb2.PutClipRequest | memoryview], context: grpc.ServicerContext,
           ended: Callable[[bytes], None]) -> Iterator[bytes | memoryview]:
    """The audio chunks of a PutClip stream, ending only at a trailer that matches them (`ended` gets their
    SHA-256 then).

    This runs inside the blob store's write, so raising here aborts the upload before the object is
    finalised: a stream cut short by a cancel (grpcio may end the request iterator normally when the
    client cancels) or a dropped connection is never stored as a clip.
    """
    digest, size = hashlib.sha256(), 0
    try:
        for request in rest:
            if isinstance(request, memoryview):  # an audio chunk, as parse_put_clip_request hands it on
                digest.update(request)
                size += len(request)
                yield request
                continue
            part = request.WhichOneof("part")
            if part == "audio_chunk":
                chunk = request.audio_chunk  # each read of a bytes field copies it (upb): read it once
                digest.update(chunk)
                size += len(chunk)
                yield chunk
            elif part == "trailer":
                sha256 = digest.digest()
                _check_trailer(request.trailer, size=size, sha256=sha256)
                if next(rest, None) is not None:
                    raise InvalidArgument("trailer", "must be the last message; send nothing after it")
                ended(sha256)
                return
            elif part == "metadata":
                raise InvalidArgument("metadata", "only the first message may carry metadata; send audio_chunk next")
            else:  # an empty message, or only fields this version does not know
                raise InvalidArgument("part", "this message carries neither audio_chunk nor trailer; after the "
                                      "metadata send audio_chunk messages, then the trailer")
    except grpc.RpcError:  # the request iterator raises this once the call is cancelled
        raise Cancelled("the call was cancelled; nothing was stored") from None
    if not context.is_active():
        raise Cancelled("the call was cancelled; nothing was stored")
    raise InvalidArgument("trailer", "the stream ended without a trailer; send ClipTrailer(size_bytes, sha256) "
                          "as the last message", reason="CLIP_TRAILER_MISSING")


def _check_trailer(trailer: clip_pb2.ClipTrailer, *, size: int, sha256: bytes) -> None:
    if trailer.size_bytes != size:
        raise InvalidArgument("trailer.size_bytes", f"declares {trailer.size_bytes} bytes, {size} arrived; "
                              "nothing was stored, resend the whole clip", reason="CLIP_SIZE_MISMATCH")
    if not hmac.compare_digest(trailer.sha256, sha256):
        raise InvalidArgument("trailer.sha256", "does not match the SHA-256 of the audio that arrived; "
                              "nothing was stored, resend the whole clip", reason="CLIP_DIGEST_MISMATCH")


class ClipServicer(clip_pb2_grpc.ClipServiceServicer):
    def __init__(self, library: ClipLibrary) -> None:
        self._library = library

    def PutClip(self, request_iterator: Iterator[clip_pb2.PutClipRequest | memoryview],
                context: grpc.ServicerContext) -> clip_pb2.PutClipResponse:
        try:
            first = next(request_iterator, None)
        except grpc.RpcError:
            raise Cancelled("the call was cancelled; nothing was stored") from None
        if first is None or isinstance(first, memoryview) or first.WhichOneof("part") != "metadata":
            raise InvalidArgument("metadata", "the first message must carry the clip metadata")
        new = parse_metadata(first.metadata)
        clip = self._library.ingest(new, _Upload(request_iterator, context), current_actor(),
                                    active=context.is_active)
        return clip_pb2.PutClipResponse(clip=clip_message(clip, None))

    def GetClip(self, request: clip_pb2.GetClipRequest, context: grpc.ServicerContext) -> clip_pb2.GetClipResponse:
        text("clip_id", request.clip_id, max_chars=MAX_SHORT_CHARS, required=True)
        clip = self._library.get(request.clip_id)
        # Only ingest and admin reach this service (see auth.METHOD_ROLES): they may see identity.
        [identity] = self._library.identities([clip], current_actor())
        return clip_pb2.GetClipResponse(clip=clip_message(clip, identity))

    def ListClips(self, request: clip_pb2.ListClipsRequest,
                  context: grpc.ServicerContext) -> clip_pb2.ListClipsResponse:
        account_id = text("account_id", request.account_id, max_chars=MAX_ID_CHARS, required=True)
        limit = page_limit(request.page_size)
        clips = self._library.list(account_id, after=page_after(request.page_token), limit=limit)
        token = next_token([c.clip_id for c in clips], limit)
        # Identity only on request: each one returned costs an audit entry and ties a clip to a person.
        identities: list[dict[str, str] | None] = [None] * len(clips)
        if request.include_identity:
            identities = [*self._library.identities(clips, current_actor())]
        return clip_pb2.ListClipsResponse(clips=[clip_message(c, i) for c, i in zip(clips, identities, strict=True)],
                                          next_page_token=token)

    def DeleteClip(self, request: clip_pb2.DeleteClipRequest,
                   context: grpc.ServicerContext) -> clip_pb2.DeleteClipResponse:
        text("clip_id", request.clip_id, max_chars=MAX_SHORT_CHARS, required=True)
        self._library.delete(request.clip_id, current_actor())
        return clip_pb2.DeleteClipResponse()
