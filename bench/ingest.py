"""Ingest benchmark (not a test): PutClip through our server vs raw boto3 put_object.

  python bench/ingest.py [--small-count 400] [--large-count 32]

One moto server (subprocess, loopback) serves both in the same run. Ours:
`clipstore serve` as a subprocess with the S3 backend; 8 client threads send
PutClip streams (64 KiB messages). Peer: 8 threads of boto3 put_object of the
same bytes to the same moto server. Clips go to 64 accounts that already hold
clips (steady state: an account's first clip also creates its key and its row,
two more commits, outside the measured rounds). Rounds of ours and the peer alternate; a
ratio is ours ÷ peer wall time within a round, the figure the median over
rounds. Then RSS growth of the server process while it ingests one 50 MiB clip.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3  # noqa: E402
import grpc  # noqa: E402
import psutil  # noqa: E402

from bench._servers import clipstore_server, moto_server, put_requests  # noqa: E402
from clipstore.v1 import clip_pb2, clip_pb2_grpc  # noqa: E402

CLIENTS = 8
CHUNK = 64 * 1024
ROUNDS = 4
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small-count", type=int, default=400)
    parser.add_argument("--large-count", type=int, default=32)
    args = parser.parse_args()
    cases = [("32k", 32 * 1024, args.small_count), ("5m", 5 * 1024 * 1024, args.large_count)]
    with moto_server() as endpoint, clipstore_server(endpoint) as server:
        address, proc, keys = server.address, server.proc, server.keys
        s3 = boto3.client("s3", endpoint_url=endpoint)
        raw_bucket = f"raw-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=raw_bucket)
        channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 8 << 20)])
        stub = clip_pb2_grpc.ClipServiceStub(channel)
        md = (("authorization", f"Bearer {keys['ingest']}"),)
        for account in range(ACCOUNTS):  # each account's first clip, with its key and row
            stub.PutClip(iter(_requests(b"warm", account)), metadata=md, timeout=120)
        ratios: dict[str, float] = {}
        print(f"{'clip':>7} {'count':>6} {'ours s':>8} {'boto3 s':>8} {'ours/boto3':>10}  (medians of {ROUNDS} rounds)")
        for name, size, count in cases:
            audio = secrets.token_bytes(size)

            def ours(i: int, audio: bytes = audio) -> None:
                stub.PutClip(iter(_requests(audio)), metadata=md, timeout=120)

            def raw(i: int, audio: bytes = audio) -> None:
                s3.put_object(Bucket=raw_bucket, Key=uuid.uuid4().hex, Body=audio)

            ours(-1)  # warm up both
            raw(-1)
            rounds = []
            for r in range(ROUNDS):
                pair = [(ours, 0), (raw, 1)] if r % 2 == 0 else [(raw, 1), (ours, 0)]
                times = [0.0, 0.0]
                for fn, slot in pair:
                    times[slot] = _timed(count // ROUNDS, fn)
                rounds.append(times)
            ours_s = statistics.median(t[0] for t in rounds)
            raw_s = statistics.median(t[1] for t in rounds)
            ratios[name] = statistics.median(t[0] / t[1] for t in rounds)
            print(f"{name:>7} {count:>6} {ours_s:>8.2f} {raw_s:>8.2f} {ratios[name]:>10.2f}")
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
        print(f"putclip_overhead_ratio_32k={ratios['32k']:.2f}")
        print(f"putclip_overhead_ratio_5m={ratios['5m']:.2f}")


if __name__ == "__main__":
    main()
