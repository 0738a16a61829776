"""The limits of human review, in one place."""

from __future__ import annotations

from dataclasses import dataclass

DAY_S = 86400
MAX_GRANTS_PER_ASSIGNMENT = 3  # a reviewer may replay a clip a little, not pass it around
CANDIDATES_PER_CLAIM = 20
CLAIM_ROUNDS = 5
SESSION_TOUCH_S = 60.0  # idle time is tracked to the minute: most RPCs need not write
MAX_LOCKOUT_S = 24 * 3600.0


@dataclass(frozen=True, kw_only=True)
class ReviewPolicy:
    """The configured limits (`review.*` settings: the app passes them in) and the fixed ones."""

    session_lifetime_s: float
    session_idle_s: float
    max_failed_codes: int
    lockout_s: float
    daily_cap: int
    grant_ttl_s: int
    assignment_ttl_s: float = 10 * 60  # not a setting: long enough to listen, short enough to free the clip

    def lockout_after(self, earlier_lockouts: int) -> float:
        """Each lockout since the last good code doubles the next one, up to a day."""
        return min(self.lockout_s * 2.0 ** min(earlier_lockouts, 16), MAX_LOCKOUT_S)
