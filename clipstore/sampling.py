"""Which clips a human may ever hear: a small random share of eligible clips."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from clipstore.ports import ReviewQueue
from clipstore.rows import ClipRow


def _uniform() -> float:
    return secrets.randbelow(1 << 53) / (1 << 53)


class ReviewSampler:
    def __init__(self, *, rate: float, random: Callable[[], float] = _uniform) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"sample rate must be within [0, 1], got {rate}")
        self._rate, self._random = rate, random

    def offer(self, rows: ReviewQueue, clip: ClipRow, *, allow_review: bool, now: float) -> bool:
        """Queue the clip if it is eligible and sampled. Never: opted-out accounts, accidental
        activations (no wake word), expired clips."""
        eligible = allow_review and clip.wake_word and clip.expires_at > now
        if not eligible or self._random() >= self._rate:
            return False
        rows.enqueue(clip.clip_id, "rc_" + secrets.token_hex(10), clip.account_ref, clip.locale, now)
        return True
