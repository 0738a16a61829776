"""Who leaked this copy: the forensic watermark of a fetched clip, traced back to its fetch.

`identify` finds the mark in a file (clipstore.audio.watermark, through the
`detect` port), looks its id up in the watermarks table and returns the fetch
it names: grant, reviewer pseudonym (principal id, never a name), time, clip.
Every request is audited as `forensics.identify`, found or not; the audio
itself is never logged or kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, Protocol

from clipstore.errors import ClipstoreError, FailedPrecondition, InvalidArgument, NotFound
from clipstore.review.ports import ReviewPorts
from clipstore.rows import WatermarkRow
from clipstore.unit import Actor, Tx

ACTION = "forensics.identify"


class Mark(Protocol):
    """What a detector reports (clipstore.audio.watermark.Detection)."""

    @property
    def payload(self) -> int: ...
    @property
    def confidence(self) -> float: ...


@dataclass(frozen=True, kw_only=True)
class LeakDetector:
    """The watermark port: `identify(file bytes)` -> the mark or None, `UnreadableAudio` for non-audio."""

    identify: Callable[[bytes], Mark | None]
    watermark_id: Callable[[int], str]  # payload -> the id recorded in the watermarks table
    unreadable: type[Exception]  # what `identify` raises for a file that is not audio


@dataclass(frozen=True, kw_only=True)
class Finding:
    fetch: WatermarkRow
    confidence: float


class Forensics:
    def __init__(self, ports: ReviewPorts, detector: LeakDetector | None) -> None:
        self._ports, self._detector = ports, detector

    def refuse_upload(self, actor: Actor, error: ClipstoreError) -> NoReturn:
        """An upload refused before it could be read (empty, over the size limit): audited like every outcome."""
        self._ports.deny(actor, ACTION, error)

    def identify(self, data: bytes, actor: Actor) -> Finding:
        """The fetch whose copy `data` is; each outcome is one `forensics.identify` entry."""
        detector = self._detector
        if detector is None:
            self._ports.deny(actor, ACTION, FailedPrecondition(
                "watermarking is not enabled on this service", reason="WATERMARK_UNAVAILABLE"))
        try:
            mark = detector.identify(data)
        except detector.unreadable:
            self._ports.deny(actor, ACTION, InvalidArgument(
                "audio_chunk", "the file is not WAV, FLAC, Ogg Vorbis or Ogg Opus audio",
                reason="LEAK_AUDIO_UNREADABLE"))
        if mark is None:
            self._ports.deny(actor, ACTION, NotFound(
                "no watermark of this service was found in the file", reason="WATERMARK_NOT_FOUND"))
        watermark_id = detector.watermark_id(mark.payload)

        def unit(tx: Tx) -> Finding:
            row = self._ports.bind(tx).watermark(watermark_id)
            if row is None:
                error = NotFound("the file carries a watermark of this service's key that no recorded fetch has",
                                 reason="WATERMARK_UNKNOWN")
                raise tx.deny(actor, ACTION, error, watermark=watermark_id)
            tx.audit(actor.record(ACTION, clip_id=row.clip_id, principal_id=row.reviewer_id,
                                  watermark=watermark_id))
            return Finding(fetch=row, confidence=mark.confidence)

        return self._ports.ledger.run(unit)
