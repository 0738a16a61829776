"""Injected time: tests of expiry, lockout and retention need no sleeps."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

# The range google.protobuf.Timestamp and RFC 3339 (four-digit years) can show: 0001-01-01 to 9999-12-31.
MIN_TIMESTAMP_S = -62_135_596_800  # 0001-01-01T00:00:00Z
MAX_TIMESTAMP_S = 253_402_300_799  # 9999-12-31T23:59:59Z, the end of google.protobuf.Timestamp's range
# The latest instant kept as given: a float this large holds about 30 us, so 23:59:59.9999995 and later became
# 253402300800.0, year 10000, which neither a Timestamp nor rfc3339 can show. Later times are kept as this one.
MAX_INSTANT = MAX_TIMESTAMP_S + 0.999


def clamp_instant(ts: float) -> float:
    """`ts` inside what a Timestamp and rfc3339 can show. Input is checked at the boundary, but rows stored
    before that check (a captured_at or expires_at past year 9999) must still be shown, not fail the whole
    answer as INTERNAL: they are shown as the last (or first) instant there is."""
    if ts != ts:  # NaN: no instant at all; the earliest, so nothing is kept longer for it
        return float(MIN_TIMESTAMP_S)
    return min(max(ts, float(MIN_TIMESTAMP_S)), MAX_INSTANT)


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()


def rfc3339(ts: float) -> str:
    """UTC with millisecond precision, e.g. 2026-11-26T05:00:00.123Z."""
    return datetime.fromtimestamp(clamp_instant(ts), UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
