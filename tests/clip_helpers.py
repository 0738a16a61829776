"""Building PutClip streams and reading what the service stored."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Iterator

from clipstore.v1 import clip_pb2

ACCOUNT_ID = "amzn1.account.AF3XYZEXAMPLE42"
SERIAL = "G090LF1183940QWE"


def metadata(**overrides: object) -> clip_pb2.ClipMetadata:
    fields: dict[str, object] = {
        "identity": clip_pb2.ClipIdentity(account_id=ACCOUNT_ID, device_serial=SERIAL),
        "device_type": "echo-dot-5", "locale": "en-US", "wake_word_detected": True,
        "content_type": "audio/opus", "idempotency_key": secrets.token_hex(8), "duration_ms": 2300,
    }
    fields.update(overrides)
    return clip_pb2.ClipMetadata(**fields)  # type: ignore[arg-type]


def trailer(audio: bytes) -> clip_pb2.PutClipRequest:
    """The last message of a PutClip stream: what the client sent, so the server can tell a whole clip."""
    return clip_pb2.PutClipRequest(trailer=clip_pb2.ClipTrailer(size_bytes=len(audio),
                                                                sha256=hashlib.sha256(audio).digest()))


def put_requests(meta: clip_pb2.ClipMetadata, audio: bytes, chunk: int = 64 * 1024
                 ) -> Iterator[clip_pb2.PutClipRequest]:
    yield clip_pb2.PutClipRequest(metadata=meta)
    for i in range(0, len(audio), chunk):
        yield clip_pb2.PutClipRequest(audio_chunk=audio[i:i + chunk])
    yield trailer(audio)


class Chunks:
    """An upload made in-process (`clipstore.clips.Upload`): the chunks given, then their SHA-256."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks, self._digest, self._ended = chunks, hashlib.sha256(), False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self._digest.update(chunk)
            yield chunk
        self._ended = True

    def sha256(self) -> bytes:
        if not self._ended:
            raise RuntimeError("read the chunks first")
        return self._digest.digest()
