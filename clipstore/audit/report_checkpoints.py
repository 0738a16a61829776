"""Cosigned checkpoints for access reports, coalesced: one sign+cosign round serves every report waiting.

A report must prove against a cosigned checkpoint whose size is greater than its head (the index of
its own request entry). Signing a checkpoint and asking every witness to cosign it per report made a
checkpoint row and a witness round trip per call, at request rate: a third party's witness would
throttle us, and then every report failed. Here:

- a checkpoint this process already holds (cosigned, by a report round or by the publishing loop)
  that covers the head is reused: nothing is signed or sent;
- otherwise the caller joins the round in flight if that round has not signed yet (it will sign a
  tree holding the caller's entry, durable before the caller got here), or starts one (single flight);
- a round starts at most once per `min_interval_s` (`audit.report_checkpoint_min_interval_s`): its
  leader waits out the rest of the interval before signing, and every report arriving meanwhile rides
  on it. A round after a quiet interval starts at once.

A failed round fails the reports waiting on it with AUDIT_UNAVAILABLE (retry); the next report starts
a new round.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from clipstore.audit.log import AuditUnavailable
from clipstore.logs import get_logger

COSIGN_FAILED = "the witnesses did not cosign a checkpoint covering this report; retry later"
NOT_COVERED = "the newest checkpoint does not cover this request yet; retry"
MAX_ROUNDS_PER_REPORT = 3  # rounds that should have covered a report before it gives up (they always do in one)
log = get_logger("clipstore.audit.report_checkpoints")


class _Round:
    __slots__ = ("done", "error", "note", "size")

    def __init__(self) -> None:
        self.size: int | None = None  # set once signed: the tree it covers
        self.note = ""
        self.error: str | None = None  # the message its waiters raise
        self.done = threading.Event()


class ReportCheckpoints:
    def __init__(self, *, checkpoint: Callable[[], tuple[int, str]], cosign: Callable[[str], str],
                 known: Callable[[], tuple[int, str] | None] = lambda: None, min_interval_s: float,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """`checkpoint` signs (and stores) one for the log as it is now; `cosign` adds a witness quorum;
        `known` is a cosigned (size, note) held elsewhere (the publishing loop's), or None."""
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}")
        self._checkpoint, self._cosign, self._known = checkpoint, cosign, known
        self._min_interval_s, self._monotonic, self._sleep = min_interval_s, monotonic, sleep
        self._lock = threading.Lock()
        self._latest: tuple[int, str] | None = None  # the newest cosigned checkpoint a round made
        self._round: _Round | None = None  # in flight
        self._last_start: float | None = None
        self.rounds = 0  # rounds started (metrics, tests)

    def covering(self, head: int) -> str:
        """A cosigned checkpoint note whose tree holds entry `head` (size > head); raises AuditUnavailable."""
        tries = 0
        while True:
            with self._lock:
                held = self._held(head)
                if held is not None:
                    return held
                current = self._round
                lead = current is None
                if current is None:
                    if tries == MAX_ROUNDS_PER_REPORT:
                        raise AuditUnavailable(NOT_COVERED)
                    current = self._round = _Round()
                    self.rounds += 1
                # A round that has not signed yet will sign a tree holding `head` (durable before this call):
                # it counts as a try. One that has signed a smaller tree is only waited out.
                tries += current.size is None or current.size > head
            if lead:
                self._lead(current)
            else:
                current.done.wait()
            if current.error is not None:
                with self._lock:
                    # A round refused because the witnesses already hold a larger tree of ours (the publishing
                    # loop's or another replica's, cosigned between this round's signing and its cosigning):
                    # that checkpoint, if this process holds it, covers the report as well.
                    held = self._held(head)
                if held is not None:
                    return held
            if current.size is not None and current.size > head:
                if current.error is not None:
                    raise AuditUnavailable(current.error)
                return current.note
            if current.error is not None and (lead or current.size is None):
                raise AuditUnavailable(current.error)

    def _held(self, head: int) -> str | None:
        for candidate in (self._latest, self._known()):
            if candidate is not None and candidate[0] > head:
                return candidate[1]
        return None

    def _lead(self, current: _Round) -> None:
        try:
            with self._lock:
                wait = 0.0 if self._last_start is None else \
                    self._last_start + self._min_interval_s - self._monotonic()
            if wait > 0:
                self._sleep(wait)  # reports arriving meanwhile join this round
            with self._lock:
                self._last_start = self._monotonic()
                # From here on a report joining this round may hold an entry after the tree signed below.
                # It sees `size` and starts the next round if it is not covered.
            try:
                size, note = self._checkpoint()
            except AuditUnavailable as exc:
                current.error = str(exc)
                return
            with self._lock:
                current.size = size
            try:
                cosigned = self._cosign(note)
            except Exception as exc:  # QuorumNotReached, a witness away: the callers retry
                log.warning("access_report.cosign_failed", exc_type=type(exc).__name__)
                current.error = COSIGN_FAILED
                return
            current.note = cosigned
            with self._lock:
                if self._latest is None or size > self._latest[0]:
                    self._latest = (size, cosigned)
        except Exception as exc:  # anything else: the waiters must not wait for ever
            log.error("access_report.checkpoint_failed", exc_type=type(exc).__name__)
            current.error = COSIGN_FAILED if current.size is not None else NOT_COVERED
        finally:
            with self._lock:
                if self._round is current:
                    self._round = None
            current.done.set()
