"""Review benchmark (not a test): RequestGrant + FetchClip of a 32 KiB clip through the real server.

  python bench/review.py [--clips 400]

`clipstore serve` (subprocess, S3 backend on a moto server subprocess) with
sampling at 100 %. Reviewers enrol over gRPC and start MFA sessions with real
TOTP codes; each then loops NextAssignment → RequestGrant → FetchClip →
CompleteAssignment, first one reviewer alone, then 8 at once. Peer, same run:
a bare S3 GetObject of a sealed 32 KiB object plus `open_clip` (no checks, no
audit). Server-side RequestGrant time comes from the server's access log.
"""

from __future__ import annotations

import argparse
import base64
import secrets
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3  # noqa: E402
import grpc  # noqa: E402

from bench._servers import clipstore_server, moto_server  # noqa: E402
from clipstore.envelope import open_clip, seal_clip  # noqa: E402
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
REVIEWERS = 8


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--database-url", help="postgresql://… (an empty database or schema); default SQLite")
    args = parser.parse_args()
    settings = {"CLIPSTORE_REVIEW_SAMPLE_RATE": "1", "CLIPSTORE_REVIEW_DAILY_CAP": "100000",
                "CLIPSTORE_REVIEW_DEFAULT_ALLOW": "true"}
    if args.database_url:
        settings["CLIPSTORE_DATABASE_URL"] = args.database_url
    with moto_server() as endpoint, clipstore_server(endpoint, **settings) as server:
        channel = grpc.insecure_channel(server.address)
        ingest_md = (("authorization", f"Bearer {server.keys['ingest']}"),)
        admin_md = (("authorization", f"Bearer {server.keys['admin']}"),)
        account_pb2_grpc.AccountServiceStub(channel).SetReviewPreference(
            account_pb2.SetReviewPreferenceRequest(account_id="bench-account", allow_human_review=True),
            metadata=ingest_md)
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        audio = secrets.token_bytes(CLIP_BYTES)
        meta = {"identity": clip_pb2.ClipIdentity(account_id="bench-account", device_serial="S1"),
                "locale": "en-US", "content_type": "audio/opus", "wake_word_detected": True}
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: clips.PutClip(iter([
                clip_pb2.PutClipRequest(metadata=clip_pb2.ClipMetadata(**meta, idempotency_key=f"k{i}")),
                clip_pb2.PutClipRequest(audio_chunk=audio)]), metadata=ingest_md), range(args.clips)))

        admin = reviewer_admin_pb2_grpc.ReviewerAdminServiceStub(channel)
        reviewers = []
        for n in range(REVIEWERS):
            created = admin.CreateReviewer(reviewer_admin_pb2.CreateReviewerRequest(name=f"r{n}"), metadata=admin_md)
            enrolled = enrolment_pb2_grpc.EnrolmentServiceStub(channel).RedeemEnrolmentCode(
                enrolment_pb2.RedeemEnrolmentCodeRequest(reviewer_id=created.reviewer_id,
                                                         code=created.enrolment.code))
            secret = base64.b32decode(enrolled.totp_secret + "=" * (-len(enrolled.totp_secret) % 8))
            md = (("authorization", f"Bearer {enrolled.api_key}"),)
            stub = review_pb2_grpc.ReviewServiceStub(channel)
            token = stub.StartReviewSession(review_pb2.StartReviewSessionRequest(
                totp_code=code_at(secret, time.time())), metadata=md).session_token
            reviewers.append((stub, md, token))

        def review_one(reviewer: tuple[review_pb2_grpc.ReviewServiceStub, tuple, str]) -> tuple[float, float]:
            stub, md, token = reviewer
            a = stub.NextAssignment(review_pb2.NextAssignmentRequest(session_token=token), metadata=md)
            t0 = time.perf_counter()
            g = stub.RequestGrant(review_pb2.RequestGrantRequest(session_token=token, assignment_id=a.assignment_id),
                                  metadata=md)
            t1 = time.perf_counter()
            got = sum(len(m.audio_chunk) for m in stub.FetchClip(review_pb2.FetchClipRequest(
                session_token=token, grant=g.grant, review_clip_id=g.review_clip_id), metadata=md))
            t2 = time.perf_counter()
            assert got == CLIP_BYTES
            stub.CompleteAssignment(review_pb2.CompleteAssignmentRequest(
                session_token=token, assignment_id=a.assignment_id, label="ok"), metadata=md)
            return (t1 - t0) * 1000, (t2 - t1) * 1000

        sequential_n = args.clips // 4
        start = time.perf_counter()
        sequential = [review_one(reviewers[0]) for _ in range(sequential_n)]
        seq_rate = sequential_n / (time.perf_counter() - start)
        concurrent_n = args.clips - sequential_n - 8
        start = time.perf_counter()
        with ThreadPoolExecutor(REVIEWERS) as pool:
            concurrent = list(pool.map(lambda i: review_one(reviewers[i % REVIEWERS]), range(concurrent_n)))
        conc_rate = concurrent_n / (time.perf_counter() - start)

        # Peer: bare GetObject + decrypt of a sealed 32 KiB clip on the same moto server.
        s3 = boto3.client("s3", endpoint_url=endpoint)
        bucket = f"peer-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=bucket)
        dek = secrets.token_bytes(32)
        s3.put_object(Bucket=bucket, Key="clip", Body=b"".join(seal_clip(dek, [audio], clip_id="c_peer",
                                                                         account_ref="acct_peer")))
        peer = []
        for _ in range(sequential_n):
            t0 = time.perf_counter()
            body = s3.get_object(Bucket=bucket, Key="clip")["Body"].read()
            assert len(b"".join(open_clip(dek, [body], clip_id="c_peer", account_ref="acct_peer"))) == CLIP_BYTES
            peer.append((time.perf_counter() - t0) * 1000)

        time.sleep(0.5)  # let the server's last log lines arrive
        server_grant = server.rpc_ms("/RequestGrant")
        server_seq, server_conc = server_grant[:sequential_n], server_grant[sequential_n:]
        print(f"{'measure':<44} {'p50 ms':>8} {'p99 ms':>8}")
        for name, samples in [("RequestGrant, 1 reviewer (client)", [s[0] for s in sequential]),
                              ("FetchClip 32 KiB, 1 reviewer (client)", [s[1] for s in sequential]),
                              ("RequestGrant, 8 reviewers (client)", [c[0] for c in concurrent]),
                              ("FetchClip 32 KiB, 8 reviewers (client)", [c[1] for c in concurrent]),
                              ("bare GetObject + decrypt 32 KiB (peer)", peer),
                              ("RequestGrant server-side, 1 reviewer", server_seq),
                              ("RequestGrant server-side, 8 reviewers", server_conc)]:
            print(f"{name:<44} {statistics.median(samples):>8.2f} {pct(samples, 99):>8.2f}")
        print(f"reviews/s: 1 reviewer {seq_rate:.1f}, 8 reviewers {conc_rate:.1f}")
        fetch_p50 = statistics.median([s[1] for s in sequential])
        print(f"FetchClip p50 / bare GetObject+decrypt p50 = {fetch_p50 / statistics.median(peer):.2f}")
        print(f"grant_p99_ms={pct(server_grant, 99):.2f}")


if __name__ == "__main__":
    main()
