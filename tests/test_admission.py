"""The call watchdog: a limit fires once its time (and at most the slack) has passed; a disarmed one never."""

from __future__ import annotations

import threading
import time

from clipstore.admission import Watchdog

SLACK_S = 0.05
WAIT_S = 5.0  # far above any scheduling delay on a loaded machine; the test ends as soon as the timer fires


def test_an_armed_limit_cancels_its_call_after_its_time_and_within_the_slack() -> None:
    dog = Watchdog(slack_s=SLACK_S)
    cancelled = threading.Event()
    try:
        armed_at = time.monotonic()
        timer = dog.arm(0.1, "request_body_timeout_s", cancelled.set)
        assert cancelled.wait(WAIT_S)
        assert time.monotonic() - armed_at >= 0.1
        assert timer.fired
    finally:
        dog.close()


def test_a_disarmed_limit_never_cancels_and_the_timers_due_together_are_taken_in_one_wake() -> None:
    dog = Watchdog(slack_s=SLACK_S)
    fired: list[int] = []
    last = threading.Event()
    try:
        disarmed = [dog.arm(0.05, "request_body_timeout_s", lambda: fired.append(-1)) for _ in range(50)]
        for timer in disarmed:
            Watchdog.disarm(timer)
        for i in range(5):  # due within the slack of each other
            dog.arm(0.06 + i * 0.001, "stream_max_s", lambda i=i: fired.append(i))
        dog.arm(0.07, "stream_max_s", last.set)
        assert last.wait(WAIT_S)
        assert fired == [0, 1, 2, 3, 4]
        assert not any(timer.fired for timer in disarmed)
    finally:
        dog.close()


def test_a_sooner_limit_armed_while_the_watchdog_sleeps_towards_a_later_one_wakes_it() -> None:
    dog = Watchdog(slack_s=SLACK_S)
    soon = threading.Event()
    try:
        dog.arm(60, "stream_max_s", lambda: None)
        time.sleep(0.05)  # the thread now sleeps towards the 60 s limit
        armed_at = time.monotonic()
        dog.arm(0.05, "request_body_timeout_s", soon.set)
        assert soon.wait(WAIT_S)
        assert time.monotonic() - armed_at < 30  # not at the 60 s limit's wake
    finally:
        dog.close()
