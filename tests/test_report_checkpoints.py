"""Access-report checkpoints are coalesced: one sign+cosign round serves every report waiting, rounds are
spaced by the minimum interval, a held checkpoint covering the head is reused, and a failed round fails
only its own waiters."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from clipstore.audit import AuditUnavailable
from clipstore.audit.report_checkpoints import COSIGN_FAILED, ReportCheckpoints


class _Log:
    def __init__(self) -> None:
        self.size, self.signed, self.cosigned, self.fail = 0, 0, 0, False
        self.lock = threading.Lock()

    def append(self) -> int:
        with self.lock:
            self.size += 1
            return self.size - 1

    def checkpoint(self) -> tuple[int, str]:
        with self.lock:
            self.signed += 1
            return self.size, f"note {self.size}"

    def cosign(self, note: str) -> str:
        self.cosigned += 1
        if self.fail:
            raise RuntimeError("quorum not reached")
        return note + " cosigned"


def _rounds(log: _Log, interval_s: float, sleeps: list[float] | None = None) -> ReportCheckpoints:
    return ReportCheckpoints(checkpoint=log.checkpoint, cosign=log.cosign, min_interval_s=interval_s,
                             sleep=sleeps.append if sleeps is not None else threading.Event().wait)


def test_a_held_checkpoint_covering_the_head_is_reused_without_signing() -> None:
    log = _Log()
    rounds = _rounds(log, 0)
    first = log.append()
    assert rounds.covering(first) == "note 1 cosigned"
    assert rounds.covering(first) == "note 1 cosigned" and (log.signed, log.cosigned) == (1, 1)
    assert rounds.covering(log.append()) == "note 2 cosigned" and log.signed == 2


def test_a_round_waits_out_the_minimum_interval_and_the_first_does_not() -> None:
    log, sleeps = _Log(), []
    clock = [100.0]
    rounds = ReportCheckpoints(checkpoint=log.checkpoint, cosign=log.cosign, min_interval_s=1.0,
                               monotonic=lambda: clock[0], sleep=sleeps.append)
    rounds.covering(log.append())
    clock[0] += 0.25
    rounds.covering(log.append())
    clock[0] += 5
    rounds.covering(log.append())
    assert sleeps == [0.75]


def test_concurrent_reports_share_rounds() -> None:
    log = _Log()
    rounds = _rounds(log, 0.2)

    def report(_: int) -> tuple[int, str]:
        head = log.append()
        return head, rounds.covering(head)
    with ThreadPoolExecutor(24) as pool:
        notes = list(pool.map(report, range(24)))
    assert all(int(note.split()[1]) > head for head, note in notes)
    assert log.signed <= 3, log.signed


def test_a_failed_round_fails_its_waiters_and_the_next_round_works() -> None:
    log = _Log()
    rounds = _rounds(log, 0, sleeps=[])
    log.fail = True
    with pytest.raises(AuditUnavailable, match=COSIGN_FAILED):
        rounds.covering(log.append())
    log.fail = False
    assert rounds.covering(log.append()) == "note 2 cosigned"


def test_a_round_refused_because_the_publisher_cosigned_a_newer_checkpoint_answers_with_that_one() -> None:
    # The publishing loop (or another replica's) had the witnesses cosign a larger tree between this round's
    # signing and its cosigning; a witness then refuses the older checkpoint (409, its size is ahead), the
    # round fails, and the report failed AUDIT_UNAVAILABLE though a cosigned checkpoint covering it was held.
    log = _Log()
    published: list[tuple[int, str]] = []

    def cosign(note: str) -> str:
        published.append((log.size + 5, f"note {log.size + 5} cosigned by the publisher"))
        raise RuntimeError("quorum not reached: a witness is ahead")
    rounds = ReportCheckpoints(checkpoint=log.checkpoint, cosign=cosign, min_interval_s=0,
                               known=lambda: published[-1] if published else None)
    head = log.append()
    assert rounds.covering(head) == f"note {head + 6} cosigned by the publisher"
