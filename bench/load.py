"""Load benchmark (not a test): a bounded mixed workload against real processes on loopback.

  python bench/load.py [--clients 8] [--seconds 20] [--max-ops 5000] [--crash]

`clipstore serve` (subprocess; file blob store and SQLite, the embedded default)
takes N concurrent clients for at most --seconds and --max-ops: ingest
(PutClip of 8-64 KiB), review (NextAssignment → RequestGrant → FetchClip →
CompleteAssignment) and audit reads (GetCheckpoint, ListEntries). With
--crash the server is SIGKILLed halfway and restarted, and the clients carry on.
At the end the server is stopped and its data opened directly: every
acknowledged clip must be present and decrypt, the audit log must verify
with `auditlog`, and it must hold an entry for every acknowledged ingest and fetch.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from auditlog.__main__ import verify_dir  # noqa: E402
from bench._servers import put_requests  # noqa: E402
from clipstore.app import App  # noqa: E402
from clipstore.audit.export import export_log  # noqa: E402
from clipstore.config import load_config  # noqa: E402
from clipstore.totp import code_at  # noqa: E402
from clipstore.v1 import (  # noqa: E402
    account_pb2,
    account_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    clip_pb2,
    clip_pb2_grpc,
    enrolment_pb2,
    enrolment_pb2_grpc,
    review_pb2,
    review_pb2_grpc,
    reviewer_admin_pb2,
    reviewer_admin_pb2_grpc,
)

REPO = Path(__file__).resolve().parent.parent


class Target:
    """The server process; restartable on the same data dir and port."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env, self.proc = env, None  # type: ignore[var-annotated]
        self.address = ""
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "clipstore", "serve"], env=self.env,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO)
        started = json.loads(self.proc.stderr.readline())
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        self.address = f"127.0.0.1:{started['port']}"
        self.env["CLIPSTORE_LISTEN"] = self.address  # a restart comes back on the same port

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-ops", type=int, default=5000)
    parser.add_argument("--crash", action="store_true", help="SIGKILL and restart the server halfway")
    args = parser.parse_args()
    data = tempfile.mkdtemp(prefix="clipstore-load-")
    env = {**os.environ, "CLIPSTORE_DATA_DIR": data, "CLIPSTORE_LISTEN": "127.0.0.1:0",
           "CLIPSTORE_REVIEW_SAMPLE_RATE": "0.5", "CLIPSTORE_REVIEW_DAILY_CAP": "100000",
           "CLIPSTORE_REVIEW_WATERMARK": "off"}  # the clips are random bytes, not audio
    keys = {}
    for role in ("ingest", "admin", "auditor"):
        out = subprocess.run([sys.executable, "-m", "clipstore", "principals", "create", "--role", role, "--name",
                              f"load-{role}"], env=env, capture_output=True, text=True, check=True, cwd=REPO)
        keys[role] = (("authorization", "Bearer " + out.stdout.split("api_key=")[1].split()[0]),)
    target = Target(env)
    channel = grpc.insecure_channel(target.address)
    account_pb2_grpc.AccountServiceStub(channel).SetReviewPreference(
        account_pb2.SetReviewPreferenceRequest(account_id="load-account", allow_human_review=True),
        metadata=keys["ingest"])
    reviewers = []
    for n in range(max(1, args.clients // 4)):
        created = reviewer_admin_pb2_grpc.ReviewerAdminServiceStub(channel).CreateReviewer(
            reviewer_admin_pb2.CreateReviewerRequest(name=f"load-reviewer-{n}"), metadata=keys["admin"])
        enrolled = enrolment_pb2_grpc.EnrolmentServiceStub(channel).RedeemEnrolmentCode(
            enrolment_pb2.RedeemEnrolmentCodeRequest(reviewer_id=created.reviewer_id, code=created.enrolment.code))
        secret = base64.b32decode(enrolled.totp_secret + "=" * (-len(enrolled.totp_secret) % 8))
        reviewers.append({"md": (("authorization", f"Bearer {enrolled.api_key}"),), "secret": secret,
                          "token": None, "lock": threading.Lock()})

    latencies: dict[str, list[float]] = defaultdict(list)
    acked: dict[str, int] = {}
    fetched = [0]
    errors: dict[str, int] = defaultdict(int)
    lock, ops = threading.Lock(), [0]
    start = time.monotonic()
    deadline = start + args.seconds

    def timed(name: str, call, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        t0 = time.perf_counter()
        result = call(*a, **kw)
        with lock:
            latencies[name].append((time.perf_counter() - t0) * 1000)
        return result

    def ingest(ch: grpc.Channel) -> None:
        audio = secrets.token_bytes(random.randint(8, 64) * 1024)
        meta = clip_pb2.ClipMetadata(identity=clip_pb2.ClipIdentity(account_id="load-account", device_serial="S"),
                                     locale="en-US", content_type="audio/opus", wake_word_detected=True,
                                     idempotency_key=secrets.token_hex(8))
        reqs = put_requests(meta, (audio[i:i + 32768] for i in range(0, len(audio), 32768)))
        clip = timed("PutClip", clip_pb2_grpc.ClipServiceStub(ch).PutClip, reqs, metadata=keys["ingest"],
                     timeout=30).clip
        with lock:
            acked[clip.clip_id] = len(audio)

    def review(ch: grpc.Channel, r: dict) -> None:  # type: ignore[type-arg]
        stub = review_pb2_grpc.ReviewServiceStub(ch)
        with r["lock"]:
            if r["token"] is None:
                r["token"] = timed("StartReviewSession", stub.StartReviewSession, review_pb2.StartReviewSessionRequest(
                    totp_code=code_at(r["secret"], time.time())), metadata=r["md"], timeout=30).session_token
            token = r["token"]
            a = timed("NextAssignment", stub.NextAssignment, review_pb2.NextAssignmentRequest(session_token=token),
                      metadata=r["md"], timeout=30)
            g = timed("RequestGrant", stub.RequestGrant, review_pb2.RequestGrantRequest(
                session_token=token, assignment_id=a.assignment_id), metadata=r["md"], timeout=30)
            t0 = time.perf_counter()
            got = sum(len(m.audio_chunk) for m in stub.FetchClip(review_pb2.FetchClipRequest(
                session_token=token, grant=g.grant, review_clip_id=g.review_clip_id), metadata=r["md"], timeout=30))
            with lock:
                latencies["FetchClip"].append((time.perf_counter() - t0) * 1000)
                fetched[0] += 1
            assert got > 0
            timed("CompleteAssignment", stub.CompleteAssignment, review_pb2.CompleteAssignmentRequest(
                session_token=token, assignment_id=a.assignment_id, label="ok"), metadata=r["md"], timeout=30)

    def audit_read(ch: grpc.Channel) -> None:
        stub = audit_pb2_grpc.AuditServiceStub(ch)
        cp = timed("GetCheckpoint", stub.GetCheckpoint, audit_pb2.GetCheckpointRequest(), metadata=keys["auditor"],
                   timeout=30)
        timed("ListEntries", stub.ListEntries, audit_pb2.ListEntriesRequest(
            start_index=max(0, cp.tree_size - 100), page_size=100), metadata=keys["auditor"], timeout=30)

    crashed = threading.Event()

    def client(n: int) -> None:
        ch = grpc.insecure_channel(target.address)
        rng = random.Random(n)
        while time.monotonic() < deadline:
            with lock:
                if ops[0] >= args.max_ops:
                    return
                ops[0] += 1
            kind = rng.choices(["ingest", "review", "audit"], weights=[5, 3, 1])[0]
            try:
                if kind == "ingest":
                    ingest(ch)
                elif kind == "review":
                    review(ch, reviewers[n % len(reviewers)])
                else:
                    audit_read(ch)
            except grpc.RpcError as exc:
                with lock:
                    errors[f"{kind}:{exc.code().name}"] += 1
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    time.sleep(0.2)  # the server is restarting
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED and kind == "review":
                    reviewers[n % len(reviewers)]["token"] = None

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for t in threads:
        t.start()
    if args.crash:
        time.sleep(args.seconds / 2)
        target.kill()
        crashed.set()
        target.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    target.stop()

    app = App(load_config(env={"CLIPSTORE_DATA_DIR": data}))
    try:
        lost = 0
        for clip_id, size in acked.items():
            row = app.clips.find(clip_id)
            if row is None or len(b"".join(app.clips.audio(row))) != size:
                lost += 1
        entries = [json.loads(e) for e in app.audit.reader.entries(0, app.audit.reader.size())]
        ingests = {e["target"]["clip_id"] for e in entries if e["action"] == "clip.ingest"
                   and e["outcome"]["result"] == "ok"}
        fetch_entries = sum(1 for e in entries if e["action"] == "clip.fetch")
        export = Path(data) / "export"
        export_log(app.audit, export, actor_id="load", actor_role="auditor")
        code, line = verify_dir(export, app.audit.signer.verifier.key_string(), None)
    finally:
        app.close()
    verified = code == 0 and set(acked) <= ingests and fetch_entries >= fetched[0]
    total = sum(len(v) for v in latencies.values())
    print(f"{args.clients} clients, {elapsed:.1f} s, {total} RPCs, {total / elapsed:.0f} RPC/s"
          f"{', server SIGKILLed and restarted once' if args.crash else ''}")
    print(f"{'rpc':<20} {'count':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for name, samples in sorted(latencies.items()):
        ordered = sorted(samples)
        print(f"{name:<20} {len(samples):>6} {statistics.median(samples):>8.1f} "
              f"{ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]:>8.1f}")
    print(f"acknowledged clips {len(acked)}, fetches {fetched[0]}, errors {dict(errors)}")
    print(f"audit: {line}; ingest entries cover every acknowledged clip: {set(acked) <= ingests}; "
          f"fetch entries {fetch_entries} >= fetches {fetched[0]}")
    print(f"load_lost_clips={lost} audit_verified={'true' if verified else 'false'}")


if __name__ == "__main__":
    main()
