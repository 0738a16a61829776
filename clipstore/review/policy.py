"""The limits of human review, in one place."""

from __future__ import annotations

from dataclasses import dataclass

DAY_S = 86400
MAX_GRANTS_PER_ASSIGNMENT = 3  # a reviewer may replay a clip a little, not pass it around
# NextAssignment reads the oldest few free queue entries and claims the first still eligible (the others
# are withdrawn as it passes them). Units run one at a time (one writer thread; replicas serialise on the
# audit head), so the first eligible one is always won: 20 rows a read cost ~130 us on the writer thread
# where 4 cost ~56 us. Up to 100 entries are still passed over in one call, as before.
CANDIDATES_PER_CLAIM = 4
CLAIM_ROUNDS = 25
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
