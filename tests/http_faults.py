"""An HTTP relay in front of moto's server that fails chosen requests the way S3 and KMS fail: a 500, a
503 SlowDown, a connection cut before the answer or half-way through its body, a body shorter than its
Content-Length."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # with the query
    headers: dict[str, str]
    body: bytes

    @property
    def target(self) -> str:
        """`kms:<Operation>` for KMS (the X-Amz-Target header), else `s3:<METHOD> <path>`."""
        target = self.headers.get("x-amz-target", "")
        return f"kms:{target.split('.')[-1]}" if target else f"s3:{self.method} {self.path}"


# What to do with a request: None passes it, else one of the FAULTS.
Rule = Callable[[Request], str | None]
FAULTS = ("500", "503", "cut_before_answer", "cut_mid_body", "short_body")


class FaultyRelay:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rule: Rule = lambda request: None
        self.seen: list[tuple[str, str]] = []  # (target, what was done)
        self._lock = threading.Lock()
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                fault = relay.rule(request)
                with relay._lock:
                    relay.seen.append((request.target, fault or "pass"))
                if fault == "cut_before_answer":
                    self._cut()
                    return
                if fault in ("500", "503"):
                    code = "InternalError" if fault == "500" else "SlowDown"
                    self._answer(int(fault), f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                                 f"<Message>injected</Message></Error>".encode(), {"Content-Type": "application/xml"})
                    return
                status, headers, answer = relay._forward(request)
                if fault == "cut_mid_body" and len(answer) > 1:
                    self._answer(status, answer[:len(answer) // 2], headers, length=len(answer))
                    self._cut()
                    return
                if fault == "short_body" and len(answer) > 1:
                    self._answer(status, answer[:-1], headers, length=len(answer))
                    self._cut()
                    return
                self._answer(status, answer, headers, length=int(headers.get("Content-Length") or 0)
                             if request.method == "HEAD" else None)

            def _answer(self, status: int, body: bytes, headers: dict[str, str], length: int | None = None) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def _cut(self) -> None:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _forward(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(*self._upstream, timeout=30)
        try:
            headers = {k: v for k, v in request.headers.items() if k not in ("connection",)}
            conn.request(request.method, request.path, body=request.body or None, headers=headers)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
