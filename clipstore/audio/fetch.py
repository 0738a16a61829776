"""What FetchClip does to the audio of one grant: the plan (decided and audited in the redeeming unit)
and its execution (decode, transforms, encode) as the plaintext streams out.

This module imports no numpy: the service runs without the `audio` extra
while no transform is configured; `apply` imports the codecs only when a plan
asks for them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from clipstore.errors import FailedPrecondition
from clipstore.locales import canonical_locale

if TYPE_CHECKING:
    from clipstore.audio.transform import Transform

# What FetchClip can decode and re-encode (clipstore.audio.codecs.CONTENT_TYPES; a test holds them equal).
PROCESSABLE_TYPES = frozenset({"audio/wav", "audio/flac", "audio/ogg", "audio/opus", "audio/L16", "audio/pcm"})
DISGUISE_OFF = "off"
DISGUISE_SKIPPED = "skipped"  # a policy asked for it, the content type cannot be processed, none was required
# clipstore.audio.disguise.POLICIES, plus off (a test holds them equal)
DISGUISE_NAMES = frozenset({DISGUISE_OFF, "pitch_formant", "pitch_formant_strong"})
_LOCALE = re.compile(r"[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*")


def parse_disguise_locales(text: str) -> dict[str, str]:
    """`review.disguise_locales`: "en-US=off, de=pitch_formant" -> {"en-US": "off", "de": "pitch_formant"};
    `ValueError` naming the first bad entry."""
    locales: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        locale, sep, name = (x.strip() for x in item.partition("="))
        if not sep or not _LOCALE.fullmatch(locale):
            raise ValueError(f"expected LOCALE=POLICY entries, got {item!r}")
        if name not in DISGUISE_NAMES:
            raise ValueError(f"unknown disguise {name!r} for {locale}; one of {', '.join(sorted(DISGUISE_NAMES))}")
        locales[canonical_locale(locale)] = name
    return locales


@dataclass(frozen=True, kw_only=True)
class FetchAudioPolicy:
    """`review.disguise`, `review.disguise_locales`, `review.require_transform`."""

    disguise: str = DISGUISE_OFF
    disguise_locales: Mapping[str, str] = field(default_factory=dict)  # locale or language -> policy name
    require_transform: bool = False

    def __post_init__(self) -> None:
        for name in (self.disguise, *self.disguise_locales.values()):
            if name not in DISGUISE_NAMES:
                raise ValueError(f"unknown disguise {name!r}; one of {', '.join(sorted(DISGUISE_NAMES))}")
        # Tags are case-insensitive: `en-us=…` is the setting of clips stored as `en-US`, and the reverse.
        object.__setattr__(self, "disguise_locales",
                           {canonical_locale(k): v for k, v in self.disguise_locales.items()})

    @classmethod
    def from_settings(cls, *, disguise: str, locales: str | None, require_transform: bool) -> FetchAudioPolicy:
        """From `review.disguise`, `review.disguise_locales` (text) and `review.require_transform`."""
        return cls(disguise=disguise, disguise_locales=parse_disguise_locales(locales or ""),
                   require_transform=require_transform)

    def disguise_for(self, locale: str) -> str:
        """The locale's own setting, else its language's (`en` for `en-GB`), else the deployment's."""
        locale = canonical_locale(locale)  # a row stored before tags were canonicalised may be `en-us`
        language = locale.split("-", 1)[0]
        return self.disguise_locales.get(locale, self.disguise_locales.get(language, self.disguise))


@dataclass(frozen=True)
class WatermarkPlan:
    watermark_id: str  # recorded in the clip.fetch entry; says who received this copy
    make: Callable[[int, int], Transform]  # (rate, channels) -> the embedder for this fetch


class WatermarkSource(Protocol):
    """The port the forensic watermark plugs into: one mark per fetch."""

    def for_fetch(self, *, grant_id: str, reviewer_id: str) -> WatermarkPlan: ...


@dataclass(frozen=True)
class FetchPlan:
    """What one fetch applies; `audit_fields` go into its clip.fetch entry."""

    disguise: str
    watermark: WatermarkPlan | None = None
    pitch_seed: int = 0

    @property
    def transforms_audio(self) -> bool:
        return self.disguise not in (DISGUISE_OFF, DISGUISE_SKIPPED) or self.watermark is not None

    def audit_fields(self) -> dict[str, str]:
        return {"disguise": self.disguise, "watermark": self.watermark.watermark_id if self.watermark else ""}

    def transforms(self, rate: int, channels: int) -> Sequence[Transform]:
        """The pipeline for a clip of this rate and channel count: disguise first, then the watermark
        (so the mark is not smeared by the vocoder)."""
        out: list[Transform] = []
        if self.disguise not in (DISGUISE_OFF, DISGUISE_SKIPPED):
            from clipstore.audio.disguise import POLICIES

            out.append(POLICIES[self.disguise].transform(rate=rate, channels=channels,
                                                         rng=random.Random(self.pitch_seed)))  # noqa: S311  seeded by SystemRandom
        if self.watermark is not None:
            out.append(self.watermark.make(rate, channels))
        return out


class FetchAudio:
    """Plans each fetch from the deployment's policy and the optional watermark port."""

    def __init__(self, policy: FetchAudioPolicy | None = None, *, watermark: WatermarkSource | None = None,
                 rng: random.Random | None = None) -> None:
        self.policy = policy or FetchAudioPolicy()
        self._watermark = watermark
        self._rng = rng or random.SystemRandom()

    def plan(self, *, locale: str, content_type: str, grant_id: str, reviewer_id: str) -> FetchPlan:
        """Decide in the redeeming unit; raises `FailedPrecondition(AUDIO_FORMAT_UNSUPPORTED)` when a
        transform is required and the content type cannot be processed."""
        disguise = self.policy.disguise_for(locale)
        wanted = disguise != DISGUISE_OFF or self._watermark is not None
        if not wanted:
            return FetchPlan(DISGUISE_OFF)
        if content_type not in PROCESSABLE_TYPES:
            if self.policy.require_transform:
                raise FailedPrecondition(f"{content_type} clips cannot be disguised or watermarked, and "
                                         "review.require_transform is on", reason="AUDIO_FORMAT_UNSUPPORTED")
            return FetchPlan(DISGUISE_SKIPPED if disguise != DISGUISE_OFF else DISGUISE_OFF)
        mark = self._watermark.for_fetch(grant_id=grant_id, reviewer_id=reviewer_id) if self._watermark else None
        return FetchPlan(disguise, mark, self._rng.getrandbits(63))

    @staticmethod
    def apply(plan: FetchPlan, content_type: str, open_plaintext: Callable[[], Iterator[bytes]], *,
              size_bytes: int, declared_ms: int = 0) -> Iterator[bytes]:
        """The bytes the reviewer receives. `UnsupportedAudio` (clipstore.audio.errors) if a clip that
        should be transformed does not decode: never the untransformed audio instead; `AudioTooLong` if it
        decodes to more than its declared duration (`declared_ms`, 0 for none) or its size allows."""
        if not plan.transforms_audio:
            yield from open_plaintext()
            return
        from clipstore.audio.codecs import decode, encode
        from clipstore.audio.transform import Pipeline

        decoded = decode(content_type, open_plaintext, size_bytes=size_bytes, declared_ms=declared_ms)
        fmt, blocks = decoded.format, decoded.blocks
        if fmt.channels > 1:
            # A transformed copy is mono: the reviewer needs the words, not the room. Stereo would double the
            # vocoder's, the watermark's and the encoder's CPU (a 48 kHz stereo Opus clip was over the
            # fetch budget), and the channels' differences carry where the speaker stood. The bitrate
            # follows the stored clip per channel.
            fmt = replace(fmt, channels=1, bitrate=fmt.bitrate // fmt.channels if fmt.bitrate else None)
            blocks = (block.mean(axis=1, keepdims=True) for block in blocks)
        pipeline = Pipeline(plan.transforms(fmt.rate, fmt.channels))
        yield from encode(fmt, pipeline.run(blocks), frames=decoded.frames)
