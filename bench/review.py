"""Review benchmark (not a test): the review workflow through the real server, against a floor, same run.

  python bench/review.py [--rate 30] [--open-seconds 20] [--closed-reviews 1600] [--database-url …]

`clipstore serve` (subprocess; S3 on a moto server subprocess; SQLite unless
--database-url) with sampling at 100 %. Reviewers are created by an admin,
redeem their enrolment codes and start MFA sessions with real TOTP codes; one review is NextAssignment → RequestGrant
→ FetchClip (32 KiB) → CompleteAssignment. RequestGrant times are server-side,
from the server's access log.

0. One reviewer, one RPC at a time: commits per RPC, from
   `clipstore_db_commits_total` on the metrics endpoint read before and after
   (1.0: each RPC's checks, change and audit entry are one transaction; under
   concurrency group commit makes it less, shown for phases 1 and 2).
1. Open loop: reviews arrive at --rate per second (Poisson arrivals, as from
   ~1,000 independent reviewers), each taken by one of 16 reviewers whatever
   the server's pace, for --open-seconds.
2. Closed loop: 8 reviewers review back to back (saturation: reviews/s).
3. Floor, same run and concurrency: bench/_floor.py, a gRPC server built like
   ours whose only method reads its request (inside its timer, as ours reads
   every request) and does one group-committed audit append, called back
   to back by 8 clients. Rounds of 2 and 3 alternate, so both see the same
   neighbours; `grant_p99_vs_floor` = RequestGrant p99 ÷ the floor's p99.
4. The floor in open loop, twice: beside phase 1, at the grant rate (--rate calls/s, Poisson
   arrivals of their own, 16 clients), so it sees the same machine (our server, moto and the
   reviewers' client busy on 2 cores): `floor_p99_open_loop_loaded_ms`, and
   `grant_p99_open_loop_vs_floor` = phase 1's RequestGrant p99 ÷ this one; and alone, at phase
   1's RPC rate (--rate × 4): what one durable RPC's p99 is here with nothing else to do (wake-ups
   of idle threads, the fsync's own tail): `floor_p99_open_loop_ms`.

`server_cpu_ms_per_review`: the server process's CPU time (user + system) in
phase 2 per review; on this shared machine it moves less between runs than
the latencies do. bench/review_units.py says where a review's database work goes.
"""

from __future__ import annotations

import argparse
import base64
import queue
import random
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import psutil  # noqa: E402

from bench._floor import METHOD as FLOOR_METHOD  # noqa: E402
from bench._servers import clipstore_server, floor_server, moto_server, put_requests  # noqa: E402
from clipstore.totp import code_at  # noqa: E402
from clipstore.v1 import (  # noqa: E402
    account_pb2,
    account_pb2_grpc,
    clip_pb2,
    clip_pb2_grpc,
    enrolment_pb2,
    enrolment_pb2_grpc,
    review_pb2,
    review_pb2_grpc,
    reviewer_admin_pb2,
    reviewer_admin_pb2_grpc,
)

CLIP_BYTES = 32 * 1024
OPEN_REVIEWERS = 16
CLOSED_REVIEWERS = 8
ROUNDS = 4  # closed-loop rounds of ours and of the floor, alternating (a p99 wants many samples)
RPCS_PER_REVIEW = 4
SEQUENTIAL_REVIEWS = 25
Reviewer = tuple[review_pb2_grpc.ReviewServiceStub, tuple[tuple[str, str], ...], str]
W = TypeVar("W")


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def ingest(channel: grpc.Channel, md: tuple[tuple[str, str], ...], count: int) -> None:
    account_pb2_grpc.AccountServiceStub(channel).SetReviewPreference(
        account_pb2.SetReviewPreferenceRequest(account_id="bench-account", allow_human_review=True), metadata=md)
    clips = clip_pb2_grpc.ClipServiceStub(channel)
    audio = secrets.token_bytes(CLIP_BYTES)
    meta = {"identity": clip_pb2.ClipIdentity(account_id="bench-account", device_serial="S1"),
            "locale": "en-US", "content_type": "audio/opus", "wake_word_detected": True}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: clips.PutClip(put_requests(
            clip_pb2.ClipMetadata(**meta, idempotency_key=f"k{i}"), [audio]), metadata=md), range(count)))


def enrol(channel: grpc.Channel, md: tuple[tuple[str, str], ...], n: int) -> list[Reviewer]:
    admin = reviewer_admin_pb2_grpc.ReviewerAdminServiceStub(channel)
    reviewers = []
    for i in range(n):
        created = admin.CreateReviewer(reviewer_admin_pb2.CreateReviewerRequest(name=f"r{i}", locales=["en-US"]),
                                       metadata=md)
        enrolled = enrolment_pb2_grpc.EnrolmentServiceStub(channel).RedeemEnrolmentCode(  # the reviewer's own step
            enrolment_pb2.RedeemEnrolmentCodeRequest(reviewer_id=created.reviewer_id, code=created.enrolment.code))
        secret = base64.b32decode(enrolled.totp_secret + "=" * (-len(enrolled.totp_secret) % 8))
        rmd = (("authorization", f"Bearer {enrolled.api_key}"),)
        stub = review_pb2_grpc.ReviewServiceStub(channel)
        token = stub.StartReviewSession(review_pb2.StartReviewSessionRequest(
            totp_code=code_at(secret, time.time())), metadata=rmd).session_token
        reviewers.append((stub, rmd, token))
    return reviewers


def review_one(reviewer: Reviewer) -> None:
    stub, md, token = reviewer
    a = stub.NextAssignment(review_pb2.NextAssignmentRequest(session_token=token), metadata=md)
    g = stub.RequestGrant(review_pb2.RequestGrantRequest(session_token=token, assignment_id=a.assignment_id),
                          metadata=md)
    got = sum(len(m.audio_chunk) for m in stub.FetchClip(review_pb2.FetchClipRequest(
        session_token=token, grant=g.grant, review_clip_id=g.review_clip_id), metadata=md))
    assert got == CLIP_BYTES
    stub.CompleteAssignment(review_pb2.CompleteAssignmentRequest(
        session_token=token, assignment_id=a.assignment_id, label="ok"), metadata=md)


def open_loop(workers: list[W], rate: float, seconds: float, call: Callable[[W], object], *, seed: int = 13
              ) -> tuple[int, float, list[float]]:
    """Poisson arrivals at `rate`/s for `seconds`, each served by `call` on an idle worker; returns
    arrivals, achieved rate, and how long arrivals waited for an idle worker (s)."""
    arrivals = random.Random(seed)  # the same schedule every run
    idle: queue.SimpleQueue[W] = queue.SimpleQueue()
    for w in workers:
        idle.put(w)
    waited: list[float] = []

    def one(due: float) -> None:
        w = idle.get()
        waited.append(time.perf_counter() - due)
        try:
            call(w)
        finally:
            idle.put(w)

    n, start = 0, time.perf_counter()
    with ThreadPoolExecutor(len(workers)) as pool:
        due = start
        while (due := due + arrivals.expovariate(rate)) - start < seconds:
            time.sleep(max(0.0, due - time.perf_counter()))
            pool.submit(one, due)
            n += 1
    return n, n / (time.perf_counter() - start), waited


def closed_loop(n: int, clients: int, call: Callable[[int], object]) -> float:
    """`clients` threads calling `call(i)` back to back, `n` calls in all; returns calls/s."""
    counter = iter(range(n))
    lock = threading.Lock()

    def worker(i: int) -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            call(i)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=30.0, help="open-loop offered load, reviews/s")
    parser.add_argument("--open-seconds", type=float, default=20.0)
    parser.add_argument("--closed-reviews", type=int, default=1600, help="closed-loop reviews (and floor calls)")
    parser.add_argument("--database-url", help="postgresql://… (an empty database or schema); default SQLite")
    args = parser.parse_args()
    settings = {"CLIPSTORE_REVIEW_SAMPLE_RATE": "1", "CLIPSTORE_REVIEW_DAILY_CAP": "100000",
                "CLIPSTORE_REVIEW_DEFAULT_ALLOW": "true", "CLIPSTORE_METRICS_LISTEN": "127.0.0.1:0"}
    if args.database_url:
        settings["CLIPSTORE_DATABASE_URL"] = args.database_url
    closed_per_round = args.closed_reviews // ROUNDS
    with moto_server() as endpoint, clipstore_server(endpoint, **settings) as server, floor_server() as floor:
        channel = grpc.insecure_channel(server.address)
        ingest(channel, (("authorization", f"Bearer {server.keys['ingest']}"),),
               int(args.rate * args.open_seconds * 1.3) + args.closed_reviews + OPEN_REVIEWERS + SEQUENTIAL_REVIEWS)
        reviewers = enrol(channel, (("authorization", f"Bearer {server.keys['admin']}"),), OPEN_REVIEWERS)
        for r in reviewers:  # warm up: each reviewer's first review
            review_one(r)

        def commits() -> float:
            server.mark()  # calls that have answered have committed
            return server.metric("clipstore_db_commits_total")

        # 0. one reviewer, one RPC at a time: every RPC is one commit
        before = commits()
        for _ in range(SEQUENTIAL_REVIEWS):
            review_one(reviewers[0])
        alone = (commits() - before) / (SEQUENTIAL_REVIEWS * RPCS_PER_REVIEW)

        # 1. open loop; beside it, the floor at the grant rate (arrivals of their own), under the same load
        floor_stub = grpc.insecure_channel(floor.address).unary_unary(FLOOR_METHOD)
        mark, before, floor_mark = server.mark(), commits(), floor.mark()
        beside = threading.Thread(target=open_loop, args=([floor_stub] * OPEN_REVIEWERS, args.rate, args.open_seconds,
                                                          lambda stub: stub(b"")), kwargs={"seed": 31})
        beside.start()
        reviews, achieved, waited = open_loop(reviewers, args.rate, args.open_seconds, review_one)
        beside.join()
        open_commits = (commits() - before) / (reviews * RPCS_PER_REVIEW)
        open_grant = server.rpc_ms("/RequestGrant", mark, server.mark())
        floor_loaded_ms = floor.rpc_ms(FLOOR_METHOD, floor_mark, floor.mark())

        # 2 and 3, alternating: 8 reviewers back to back, then the floor under 8 clients
        closed_grant: list[float] = []
        floor_ms: list[float] = []
        rates: list[float] = []
        closed_commits = 0.0
        server_cpu_s = 0.0
        server_process = psutil.Process(server.proc.pid)
        for _ in range(ROUNDS):
            mark, before = server.mark(), commits()
            cpu_before = sum(server_process.cpu_times()[:2])
            rates.append(closed_loop(closed_per_round, CLOSED_REVIEWERS, lambda i: review_one(reviewers[i])))
            server_cpu_s += sum(server_process.cpu_times()[:2]) - cpu_before
            closed_grant += server.rpc_ms("/RequestGrant", mark, server.mark())
            closed_commits += commits() - before
            mark = floor.mark()
            closed_loop(closed_per_round, CLOSED_REVIEWERS, lambda i: floor_stub(b""))
            floor_ms += floor.rpc_ms(FLOOR_METHOD, mark, floor.mark())
        closed_rpcs = ROUNDS * closed_per_round * RPCS_PER_REVIEW

        # 4. the floor in open loop, at the offered load's RPC rate (each of our RPCs commits once, as each
        # floor call does), from as many clients: the least a durable RPC's p99 can be here at that load
        mark = floor.mark()
        open_loop([floor_stub] * OPEN_REVIEWERS, args.rate * RPCS_PER_REVIEW, args.open_seconds,
                  lambda stub: stub(b""))
        floor_open_ms = floor.rpc_ms(FLOOR_METHOD, mark, floor.mark())

    saturation = statistics.median(rates)
    server_cpu_ms = server_cpu_s * 1000 / (ROUNDS * closed_per_round)
    print(f"{'RequestGrant, server-side':<52} {'n':>5} {'p50 ms':>8} {'p99 ms':>8}")
    for name, samples in [(f"open loop, {args.rate:g} reviews/s offered", open_grant),
                          (f"closed loop, {CLOSED_REVIEWERS} reviewers", closed_grant),
                          (f"floor: one group-committed append, {CLOSED_REVIEWERS} clients", floor_ms),
                          (f"floor, open loop beside phase 1: {args.rate:g} calls/s", floor_loaded_ms),
                          (f"floor, open loop alone: {args.rate * RPCS_PER_REVIEW:g} calls/s", floor_open_ms)]:
        print(f"{name:<52} {len(samples):>5} {statistics.median(samples):>8.2f} {pct(samples, 99):>8.2f}")
    print(f"open loop: {reviews} reviews at {achieved:.1f}/s achieved; arrivals waited for a free reviewer "
          f"p99 {pct(waited, 99) * 1000:.1f} ms; {open_commits:.2f} commits per RPC")
    print(f"closed loop, {CLOSED_REVIEWERS} reviewers: {saturation:.1f} reviews/s; "
          f"{closed_commits / closed_rpcs:.2f} commits per RPC (group commit); "
          f"server CPU {server_cpu_ms:.1f} ms per review")
    print("goals: open-loop p99 < 5 ms; p99 vs floor ≤ 2.0; commits per RPC 1.0")
    print(f"grant_p99_open_loop_ms={pct(open_grant, 99):.2f}")
    print(f"grant_p99_vs_floor={pct(closed_grant, 99) / pct(floor_ms, 99):.2f}")
    print(f"floor_p99_open_loop_ms={pct(floor_open_ms, 99):.2f}")
    print(f"floor_p99_open_loop_loaded_ms={pct(floor_loaded_ms, 99):.2f}")
    print(f"grant_p99_open_loop_vs_floor={pct(open_grant, 99) / pct(floor_loaded_ms, 99):.2f}")
    print(f"reviews_per_s_saturation={saturation:.1f}")
    print(f"commits_per_rpc={alone:.2f}")
    print(f"server_cpu_ms_per_review={server_cpu_ms:.2f}")


if __name__ == "__main__":
    main()
