"""Ingest benchmark (not a test): PutClip through our server vs raw boto3 put_object.

  python bench/ingest.py [--rounds 15] [--small-per-round 64] [--large-per-round 16]

One moto server (subprocess, loopback) serves both in the same run. Ours:
`clipstore serve` as a subprocess with the S3 backend; 8 client threads send
PutClip streams (messages of the client library's size). Peer: 8 threads of
boto3 put_object of the same bytes to the same moto server, with boto3's
default configuration (a backend without clipstore). Clips go to 64 accounts
that already hold clips (steady state: an account's first clip also creates
its key and its row, two more commits, outside the measured rounds).

Measurement: per size, one discarded warm-up round of each (connection pools,
worker threads, caches), then `--rounds` rounds in which ours and the peer run
back to back, the order alternating (ABBA), so drift in the machine's load hits
both alike. A round's ratio is ours ÷ peer wall time; the figure is the median
over rounds, printed with its quartiles and extremes (the spread says how far to
trust it on a shared machine). The CPU time each process (client, server, moto)
spent per clip is printed for both sides, with `putclip_cpu_ratio_*`: when the
cores are saturated (2 here, shared) wall time follows it, and it moves less
between runs; when other jobs compete, ours, with more runnable threads, gets a
larger share of the machine than the peer, which flatters its wall ratio. Then
RSS growth of the server process while it ingests one 50 MiB clip (upload
buffers kept for reuse are already there after the rounds).
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3  # noqa: E402
import grpc  # noqa: E402
import psutil  # noqa: E402

from bench._servers import clipstore_server, moto_server, put_requests  # noqa: E402
from clipstore.client._wire import AUDIO_CHUNK_BYTES  # noqa: E402
from clipstore.v1 import clip_pb2, clip_pb2_grpc  # noqa: E402

CLIENTS = 8
CHUNK = AUDIO_CHUNK_BYTES  # what the client library sends per message
ACCOUNTS = 64


def _meta(account: int | None = None) -> clip_pb2.ClipMetadata:
    account = random.randrange(ACCOUNTS) if account is None else account
    return clip_pb2.ClipMetadata(identity=clip_pb2.ClipIdentity(account_id=f"acct-{account}",
                                                                device_serial="SERIAL1"),
                                 locale="en-US", content_type="audio/opus", wake_word_detected=True,
                                 idempotency_key=uuid.uuid4().hex)


def _requests(audio: bytes, account: int | None = None) -> list[clip_pb2.PutClipRequest]:
    return list(put_requests(_meta(account), (audio[i:i + CHUNK] for i in range(0, len(audio), CHUNK))))


def _timed(count: int, one: Callable[[int], None]) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, range(count)))
    return time.perf_counter() - start


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


@dataclass(frozen=True)
class Round:
    """One side's part of a round: its wall time, and the CPU time each process spent in it."""

    wall_s: float
    cpu_s: dict[str, float]


class Meter:
    """Runs a side's round and reads the CPU clocks of the processes doing the work. On a machine whose
    cores are busy (other jobs, or the two sides' own processes) wall time follows the CPU spent, so
    the CPU per clip says where a ratio comes from, and moves less between runs than wall time does."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self.processes = processes

    def run(self, count: int, one: Callable[[int], None]) -> Round:
        before = {name: _cpu_s(p) for name, p in self.processes.items()}
        wall = _timed(count, one)
        return Round(wall, {name: _cpu_s(p) - before[name] for name, p in self.processes.items()})


@dataclass(frozen=True)
class Comparison:
    """Ours and the peer, round by round (each round runs both, back to back)."""

    ours: list[Round]
    peer: list[Round]
    per_round: int

    @property
    def ratios(self) -> list[float]:
        return [o.wall_s / p.wall_s for o, p in zip(self.ours, self.peer, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    def spread(self) -> tuple[float, float, float, float]:
        """Minimum, first quartile, third quartile and maximum of the per-round ratios."""
        ratios = sorted(self.ratios)
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        return ratios[0], q1, q3, ratios[-1]

    @property
    def cpu_ratio(self) -> float:
        """Median over rounds of all CPU spent for ours ÷ for the peer."""
        return statistics.median(sum(o.cpu_s.values()) / sum(p.cpu_s.values())
                                 for o, p in zip(self.ours, self.peer, strict=True))

    def cpu_ms_per_clip(self, side: list[Round]) -> dict[str, float]:
        """Median CPU milliseconds per clip, by process."""
        return {name: statistics.median(r.cpu_s[name] for r in side) * 1000 / self.per_round
                for name in side[0].cpu_s}


def compare(meter: Meter, ours: Callable[[int], None], peer: Callable[[int], None], *, per_round: int,
            rounds: int) -> Comparison:
    """One discarded warm-up round of each, then `rounds` rounds in ABBA order."""
    meter.run(per_round, ours)
    meter.run(per_round, peer)
    ours_r, peer_r = [], []
    for r in range(rounds):
        if r % 2 == 0:
            ours_r.append(meter.run(per_round, ours))
            peer_r.append(meter.run(per_round, peer))
        else:
            peer_r.append(meter.run(per_round, peer))
            ours_r.append(meter.run(per_round, ours))
    return Comparison(ours_r, peer_r, per_round)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15, help="measured rounds per size (after one warm-up)")
    parser.add_argument("--small-per-round", type=int, default=64, help="32 KiB clips per round and side")
    parser.add_argument("--large-per-round", type=int, default=16, help="5 MiB clips per round and side")
    parser.add_argument("--only", choices=("32k", "5m"), help="measure one size (profiling)")
    args = parser.parse_args()
    cases = [("32k", 32 * 1024, args.small_per_round), ("5m", 5 * 1024 * 1024, args.large_per_round)]
    cases = [c for c in cases if args.only in (None, c[0])]
    with moto_server() as endpoint, clipstore_server(endpoint) as server:
        address, proc, keys = server.address, server.proc, server.keys
        print(f"server pid {proc.pid}", flush=True)
        bench = psutil.Process()
        moto = next(c for c in bench.children() if "moto.server" in c.cmdline())
        meter = Meter({"client": bench, "server": psutil.Process(proc.pid), "moto": moto})
        s3 = boto3.client("s3", endpoint_url=endpoint)
        raw_bucket = f"raw-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=raw_bucket)
        channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 8 << 20)])
        stub = clip_pb2_grpc.ClipServiceStub(channel)
        md = (("authorization", f"Bearer {keys['ingest']}"),)
        for account in range(ACCOUNTS):  # each account's first clip, with its key and row
            stub.PutClip(iter(_requests(b"warm", account)), metadata=md, timeout=120)
        results: dict[str, Comparison] = {}
        print(f"{'clip':>5} {'per round':>9} {'ours s':>7} {'boto3 s':>7} {'ours/boto3':>10} "
              f"{'min':>5} {'q1':>5} {'q3':>5} {'max':>5}  (medians of {args.rounds} ABBA rounds)")
        for name, size, per_round in cases:
            audio = secrets.token_bytes(size)

            def ours(i: int, audio: bytes = audio) -> None:
                stub.PutClip(iter(_requests(audio)), metadata=md, timeout=120)

            def raw(i: int, audio: bytes = audio) -> None:
                s3.put_object(Bucket=raw_bucket, Key=uuid.uuid4().hex, Body=audio)

            result = results[name] = compare(meter, ours, raw, per_round=per_round, rounds=args.rounds)
            low, q1, q3, high = result.spread()
            print(f"{name:>5} {per_round:>9} {statistics.median(r.wall_s for r in result.ours):>7.2f} "
                  f"{statistics.median(r.wall_s for r in result.peer):>7.2f} {result.ratio:>10.2f} "
                  f"{low:>5.2f} {q1:>5.2f} {q3:>5.2f} {high:>5.2f}", flush=True)
        print(f"\nCPU ms per clip (medians over rounds)  {'client':>7} {'server':>7} {'moto':>7} {'total':>7} "
              f"{'ours/boto3':>10}")
        for name, result in results.items():
            for side, rounds in (("ours", result.ours), ("boto3", result.peer)):
                ms = result.cpu_ms_per_clip(rounds)
                ratio = f"{result.cpu_ratio:>10.2f}" if side == "ours" else ""
                print(f"{name:>5} {side:<32} {ms['client']:>7.2f} {ms['server']:>7.2f} {ms['moto']:>7.2f} "
                      f"{sum(ms.values()):>7.2f} {ratio}")
        if args.only:
            return
        server = psutil.Process(proc.pid)
        base, peak, stop = server.memory_info().rss, [0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], server.memory_info().rss)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        big = secrets.token_bytes(CHUNK)
        stub.PutClip(put_requests(_meta(), [big] * (50 * 1024 * 1024 // CHUNK)), metadata=md, timeout=600)
        stop.set()
        sampler.join()
        growth = (peak[0] - base) / (1 << 20)
        print(f"server RSS growth while ingesting one 50 MiB clip: {growth:.1f} MiB (goal < 32)")
        print(f"putclip_rss_growth_mib={growth:.1f}")
        print("goals: ours/boto3 ≤ 1.10 at 32 KiB, ≤ 1.30 at 5 MiB; RSS growth < 32 MiB")
        for name, result in results.items():
            _, q1, q3, _ = result.spread()
            print(f"putclip_overhead_ratio_{name}={result.ratio:.2f}")
            print(f"putclip_overhead_ratio_{name}_iqr={q1:.2f}-{q3:.2f}")
            print(f"putclip_cpu_ratio_{name}={result.cpu_ratio:.2f}")


if __name__ == "__main__":
    main()
