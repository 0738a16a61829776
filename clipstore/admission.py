"""Who may hold a worker thread, and for how long.

grpcio's sync server gives each call a thread for its whole life, including the time the
client takes to send its message or to read a stream. These two small parts bound that:
`PrincipalSlots` caps the calls one principal has in flight, and `Watchdog` cancels a call that
outlives its limit (a body that never comes, a stream past its maximum duration).
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from clipstore.logs import get_logger

log = get_logger("clipstore.admission")
WATCHDOG_SLACK_S = 0.1  # how late a limit may be enforced, so that the watchdog wakes at most 10 times a second


class PrincipalSlots:
    """At most `limit` concurrent calls per principal id, counted in this process."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, principal_id: str) -> bool:
        with self._lock:
            if self._held[principal_id] >= self._limit:
                return False
            self._held[principal_id] += 1
            return True

    def release(self, principal_id: str) -> None:
        with self._lock:
            self._held[principal_id] -= 1
            if not self._held[principal_id]:
                del self._held[principal_id]


def _nothing() -> None:
    pass


@dataclass(eq=False)
class Timer:
    """One armed limit; `fired` says whether the watchdog acted on it."""

    limit: str
    cancel: Callable[[], object]  # e.g. ServicerContext.cancel, which returns a bool
    armed: bool = True
    fired: bool = field(default=False, init=False)


class Watchdog:
    """Cancels calls past their limit: one thread and a heap of deadlines, not a thread per call.

    Disarming only marks a timer (and drops its call); it leaves the heap when its time comes,
    so arm and disarm stay O(log n) and O(1) on the hot path. The thread wakes at most once per
    `slack_s` and takes every timer due by then: almost every timer is disarmed long before its
    time, and waking once per timer (each unary call arms one) cost the server a GIL hand-off per
    call for nothing. A limit is enforced up to `slack_s` late; limits are seconds long."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, slack_s: float = WATCHDOG_SLACK_S) -> None:
        self._clock = clock
        self._slack_s = slack_s
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._sleeps_until = -math.inf  # when the thread will next wake by itself (under `_wake`)
        self._thread = threading.Thread(target=self._run, name="call-watchdog", daemon=True)
        self._thread.start()

    def arm(self, after_s: float, limit: str, cancel: Callable[[], object]) -> Timer:
        timer = Timer(limit, cancel)
        at = self._clock() + after_s
        with self._wake:
            heapq.heappush(self._heap, (at, next(self._order), timer))
            # sooner than what the thread sleeps towards (by more than the slack it allows itself)
            if self._heap[0][2] is timer and at + self._slack_s < self._sleeps_until:
                self._wake.notify()
        return timer

    @staticmethod
    def disarm(timer: Timer | None) -> None:
        if timer is not None:
            timer.armed = False
            # Let go of the call at once: the heap keeps the timer until its time comes, and a call
            # kept alive that long keeps its HTTP/2 stream counted against max_concurrent_streams.
            timer.cancel = _nothing

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (not self._heap or self._heap[0][0] > self._clock()):
                    # the next timer's time, and with it the others due within the slack
                    self._sleeps_until = self._heap[0][0] + self._slack_s if self._heap else math.inf
                    self._wake.wait(self._sleeps_until - self._clock() if self._heap else None)
                self._sleeps_until = -math.inf  # awake: an arm() need not notify
                if self._closed:
                    return
                due: list[Timer] = []
                now = self._clock()
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[2])
            for timer in due:
                if timer.armed:
                    timer.fired = True
                    try:
                        timer.cancel()
                    except Exception as exc:  # the call may be gone already; the watchdog must live on
                        log.warning("watchdog.cancel_failed", limit=timer.limit, exc_type=type(exc).__name__)
