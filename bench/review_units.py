"""Where a review cycle's database work goes (a probe, not a test): per RPC, statements and writer time.

  python bench/review_units.py [--reviews 200] [--database-url …]

An in-process server (S3 on a moto server subprocess; SQLite unless --database-url), one reviewer, one
RPC at a time: NextAssignment → RequestGrant → FetchClip (32 KiB) → CompleteAssignment. For each RPC:

- statements: SQL statements the RPC ran, on the audit writer's connection (inside its unit, plus the
  writer's own: BEGIN, head, chain, COMMIT) and on read connections (SQLite's trace callback; on
  PostgreSQL only the writer's unit is timed and statements are not counted);
- unit µs: the median time inside the RPC's unit of work on the writer thread (it holds every other unit);
- batch µs: the median time of the writer's whole transaction for it (unit, chain, commit with its fsync).

Then --reviewers reviewers review back to back (--reviews in all): the time inside each unit (waits for the
GIL included: the writer holds every other unit meanwhile) and the share of wall time the writer thread
spent in its transactions.

Ends with `name=value` lines: `unit_us_<rpc>`, `statements_<rpc>`, `writer_busy`.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3  # noqa: E402
import grpc  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from bench._servers import moto_server  # noqa: E402
from bench.review import CLIP_BYTES, closed_loop, enrol, ingest, review_one  # noqa: E402
from clipstore.audit.log import AuditLog  # noqa: E402
from clipstore.auth import create_principal  # noqa: E402
from clipstore.config import load_config  # noqa: E402
from clipstore.logs import configure_logging  # noqa: E402
from clipstore.server import running_server  # noqa: E402
from clipstore.v1 import review_pb2  # noqa: E402

RPCS = ("NextAssignment", "RequestGrant", "FetchClip", "CompleteAssignment")
UNIT_RPC = {"Assignments.next.<locals>.unit": "NextAssignment", "Grants.issue.<locals>.unit": "RequestGrant",
            "Grants.redeem.<locals>.unit": "FetchClip", "Assignments.complete.<locals>.unit": "CompleteAssignment"}
WRITER_THREAD = "audit-sequencer"


class Probe:
    """Counts statements by RPC and connection kind, and times units and the writer's transactions."""

    def __init__(self) -> None:
        self.rpc = ""  # the RPC in flight (one at a time)
        self.statements: dict[tuple[str, str], int] = defaultdict(int)
        self.unit_s: dict[str, list[float]] = defaultdict(list)
        self.batch_s: dict[str, list[float]] = defaultdict(list)
        self.sql: dict[str, list[str]] = defaultdict(list)  # one cycle's statements, to print
        self.concurrent = False  # phase 2: units are told apart by their function, the writer's time summed
        self.busy_s = 0.0
        self.concurrent_unit_s: dict[str, list[float]] = defaultdict(list)

    def trace(self, sql: str) -> None:
        if not self.rpc:
            return
        where = "writer" if threading.current_thread().name == WRITER_THREAD else "read"
        self.statements[(self.rpc, where)] += 1
        self.sql[self.rpc].append(f"{where:>6}: {' '.join(sql.split())[:150]}")

    def install(self) -> None:
        probe = self

        def on_connect(dbapi_conn: Any, _record: Any) -> None:
            if hasattr(dbapi_conn, "set_trace_callback"):
                dbapi_conn.set_trace_callback(probe.trace)

        sa.event.listen(sa.pool.Pool, "connect", on_connect)
        submit, write = AuditLog.submit, AuditLog._write

        def timed_submit(log: AuditLog, unit: Callable[[Any], Any]) -> Any:
            rpc = probe.rpc

            def timed(tx: Any) -> Any:
                start = time.perf_counter()
                try:
                    return unit(tx)
                finally:
                    if rpc:
                        probe.unit_s[rpc].append(time.perf_counter() - start)
                    elif probe.concurrent and unit.__qualname__ in UNIT_RPC:
                        probe.concurrent_unit_s[UNIT_RPC[unit.__qualname__]].append(time.perf_counter() - start)
            return submit(log, timed)

        def timed_write(log: AuditLog, live: Any) -> Any:
            start = time.perf_counter()
            try:
                return write(log, live)
            finally:
                if probe.rpc:
                    probe.batch_s[probe.rpc].append(time.perf_counter() - start)
                elif probe.concurrent:
                    probe.busy_s += time.perf_counter() - start

        AuditLog.submit = timed_submit  # type: ignore[method-assign,assignment]
        AuditLog._write = timed_write  # type: ignore[method-assign,assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reviews", type=int, default=200)
    parser.add_argument("--database-url")
    parser.add_argument("--show-sql", action="store_true", help="print one cycle's statements")
    parser.add_argument("--reviewers", type=int, default=8, help="phase 2: reviewers back to back")
    args = parser.parse_args()
    configure_logging(io.StringIO())  # the access log is not what this measures
    probe = Probe()
    probe.install()
    with moto_server() as endpoint, tempfile.TemporaryDirectory() as data:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="probe")
        config = load_config(env={}, overrides={
            "data_dir": data, "listen": "127.0.0.1:0", "database_url": args.database_url,
            "s3.bucket": "probe", "s3.endpoint_url": endpoint, "review.watermark": "off",
            "review.sample_rate": 1.0, "review.daily_cap": 100000, "review.default_allow": True})
        with running_server(config) as server:
            keys = {role: create_principal(server.app.principals, server.app.audit, role=role, name=role)[1]
                    for role in ("ingest", "admin")}
            channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
            ingest(channel, (("authorization", f"Bearer {keys['ingest']}"),), 2 * args.reviews + 20)
            reviewers = enrol(channel, (("authorization", f"Bearer {keys['admin']}"),), args.reviewers)
            stub, md, token = reviewers[0]

            def cycle(record: bool) -> None:
                def call(name: str, fn: Callable[[], Any]) -> Any:
                    probe.rpc = name if record else ""
                    try:
                        return fn()
                    finally:
                        time.sleep(0.002)  # let the writer finish what it does after answering
                        probe.rpc = ""
                a = call("NextAssignment", lambda: stub.NextAssignment(
                    review_pb2.NextAssignmentRequest(session_token=token), metadata=md))
                g = call("RequestGrant", lambda: stub.RequestGrant(
                    review_pb2.RequestGrantRequest(session_token=token, assignment_id=a.assignment_id), metadata=md))
                got = call("FetchClip", lambda: sum(len(m.audio_chunk) for m in stub.FetchClip(
                    review_pb2.FetchClipRequest(session_token=token, grant=g.grant, review_clip_id=g.review_clip_id),
                    metadata=md)))
                assert got == CLIP_BYTES
                call("CompleteAssignment", lambda: stub.CompleteAssignment(review_pb2.CompleteAssignmentRequest(
                    session_token=token, assignment_id=a.assignment_id, label="ok"), metadata=md))

            for _ in range(10):
                cycle(record=False)
            probe.sql.clear()
            for _ in range(args.reviews):
                cycle(record=True)
                if args.show_sql and len(probe.unit_s["CompleteAssignment"]) == 1:
                    for rpc in RPCS:
                        print(f"-- {rpc}")
                        print("\n".join(probe.sql[rpc]))
            # 2. reviewers back to back: time inside units (GIL waits included) and how busy the writer is
            for r in reviewers:
                review_one(r)
            probe.concurrent = True
            started = time.perf_counter()
            closed_loop(args.reviews, args.reviewers, lambda i: review_one(reviewers[i]))
            wall = time.perf_counter() - started
            probe.concurrent = False
            channel.close()

    n = args.reviews
    print(f"{'RPC':<20} {'writer stmts':>12} {'read stmts':>10} {'unit µs p50':>12} {'unit µs p90':>12} "
          f"{'batch µs p50':>13}")
    for rpc in RPCS:
        units = sorted(probe.unit_s[rpc])
        print(f"{rpc:<20} {probe.statements[(rpc, 'writer')] / n:>12.1f} {probe.statements[(rpc, 'read')] / n:>10.1f} "
              f"{statistics.median(units) * 1e6:>12.0f} {units[int(0.9 * len(units))] * 1e6:>12.0f} "
              f"{statistics.median(probe.batch_s[rpc]) * 1e6:>13.0f}")
    print(f"\n{args.reviewers} reviewers back to back: the writer thread was busy {probe.busy_s / wall:.0%} of "
          f"the time; {probe.busy_s * 1e3 / args.reviews:.2f} ms of writer time per review")
    print(f"{'RPC':<20} {'unit µs p50':>12} {'unit µs p99':>12}")
    for rpc in RPCS:
        units = sorted(probe.concurrent_unit_s[rpc])
        print(f"{rpc:<20} {statistics.median(units) * 1e6:>12.0f} {units[int(0.99 * len(units))] * 1e6:>12.0f}")
    for rpc in RPCS:
        print(f"unit_us_{rpc}={statistics.median(probe.unit_s[rpc]) * 1e6:.0f}")
    for rpc in RPCS:
        print(f"statements_{rpc}={(probe.statements[(rpc, 'writer')] + probe.statements[(rpc, 'read')]) / n:.1f}")
    print(f"writer_busy={probe.busy_s / wall:.2f}")


if __name__ == "__main__":
    main()
