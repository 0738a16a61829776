"""The floor server for bench/review.py: the least a durable, audited RPC can cost here.

  python bench/_floor.py DATA_DIR

A gRPC server built like `clipstore serve` (same default thread pool size, SQLite with
synchronous=FULL through `Database`, the same `AuditLog` writer) whose one
method, /bench.Floor/Append, does nothing but read its request and one group-committed audit append.
Like the real server it writes one JSON access-log line per call to stderr
({"event": "rpc", "method", "duration_ms"}, timed around the handler), and
first a {"event": "server.started", "port": …} line. Like the real server, whose
interceptor registers every method as request-streaming so that it reads a request
body only after the caller is authenticated (clipstore/interceptors.py), it reads its
one message inside the handler, so both timers start at the same point: before
the body is received, which under 8 clients took up to ~9 ms at p99 (a floor
timed after gRPC had read its body left that wait out of its own figure only).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipstore.audit import AuditLog
from clipstore.audit.signing import load_or_create_signer  # noqa: E402
from clipstore.clock import SystemClock  # noqa: E402
from clipstore.config import default  # noqa: E402
from clipstore.store import Database  # noqa: E402
from clipstore.unit import AuditRecord
from kms import LocalKms  # noqa: E402

METHOD = "/bench.Floor/Append"
RECORD = AuditRecord(actor_id="p_0123456789abcdef", actor_role="reviewer", action="grant.issue",
                     clip_id="c_0123456789abcdef0123", account_ref="acct_0123456789abcdef", request_id="r" * 32)


def main() -> None:
    data = Path(sys.argv[1])
    db = Database(f"sqlite:///{data / 'floor.db'}")
    audit = AuditLog(db, load_or_create_signer(db, LocalKms.from_file(data / "root.key")), SystemClock(),
                     checkpoint_every_entries=1000, checkpoint_every_s=60)
    out = threading.Lock()

    def append(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        started = time.perf_counter()
        next(requests, None)  # the body, inside the timer, as the real server reads it
        audit.append(RECORD)
        line = json.dumps({"event": "rpc", "method": METHOD,
                           "duration_ms": round((time.perf_counter() - started) * 1000, 3)})
        with out:
            print(line, file=sys.stderr, flush=True)
        return b""

    handler = grpc.method_handlers_generic_handler("bench.Floor", {
        "Append": grpc.stream_unary_rpc_method_handler(append)})  # bytes in, bytes out: no (de)serialiser
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=default("server.max_workers")), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"event": "server.started", "port": port}), file=sys.stderr, flush=True)
    try:
        server.wait_for_termination()
    finally:
        audit.close()


if __name__ == "__main__":
    main()
