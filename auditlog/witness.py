"""A C2SP tlog-witness: `POST /add-checkpoint`, cosignatures, a durable state file.

The witness keeps, per log origin, the size and root of the last checkpoint
it cosigned, and cosigns a new checkpoint only if it is signed by a trusted
key of that log and proved consistent with what it cosigned before. So a log
operator cannot show one history to the witness and another to anyone else
(a fork), nor take entries back (a rollback), without the witness refusing.

Request (tlog-witness): `old <size>\\n`, at most 63 base64 consistency-proof
lines, an empty line, the signed checkpoint. Answers, in the spec's order:
400 malformed (or old > checkpoint size), 404 unknown origin, 403 no trusted
log signature, 409 old size is not the last cosigned size (or equal sizes with
different roots; body: that size, Content-Type text/x.tlog.size), 422 bad
proof, 200 with the cosignature line(s). Check and persist happen under one
lock; the state file is replaced atomically (temp file, fsync, rename, fsync
of the directory) before the cosignature leaves the process.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from auditlog._files import write_durably
from auditlog.checkpoint import Checkpoint
from auditlog.cosignature import CosignatureSigner
from auditlog.errors import CheckpointError, NoteError, ProofError
from auditlog.merkle import HASH_BYTES, root_hash, verify_consistency
from auditlog.note import NoteVerifier, verify_note

__all__ = ["MAX_PROOF_LINES", "SIZE_CONTENT_TYPE", "Answer", "Witness", "WitnessServer"]

MAX_PROOF_LINES = 63  # tlog-witness: a client MUST NOT send more
MAX_REQUEST_BYTES = 64 << 10  # a checkpoint with many signatures and 63 proof lines fits easily
SIZE_CONTENT_TYPE = "text/x.tlog.size"
_EMPTY_ROOT = root_hash([])


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


def _canonical_size(text: str) -> int | None:
    if not text.isdigit() or not text.isascii() or (text.startswith("0") and text != "0") or len(text) > 19:
        return None
    return int(text)


def _parse_request(body: bytes) -> tuple[int, list[bytes], str] | None:
    """(old size, proof, signed checkpoint) or None when the framing is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    head, sep, note = text.partition("\n\n")
    if not sep:
        return None
    lines = head.split("\n")
    if not lines[0].startswith("old ") or len(lines) - 1 > MAX_PROOF_LINES:
        return None
    old = _canonical_size(lines[0][4:])
    if old is None:
        return None
    proof = []
    for line in lines[1:]:
        try:
            value = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(value) != HASH_BYTES:
            return None
        proof.append(value)
    return old, proof, note


class _State:
    """origin -> (size, root) of the last cosigned checkpoint, in a JSON file replaced atomically."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self.logs: dict[str, tuple[int, bytes]] = {}
        if path.exists():
            raw = json.loads(path.read_text())
            self.logs = {o: (int(v["size"]), base64.b64decode(v["root"])) for o, v in raw["logs"].items()}

    def persist(self) -> None:
        data = {"logs": {o: {"size": s, "root": base64.b64encode(r).decode()} for o, (s, r) in self.logs.items()}}
        write_durably(self._path, json.dumps(data, sort_keys=True).encode(), mode=0o600)


class Witness:
    """The add-checkpoint logic, without HTTP: `add_checkpoint(body) -> Answer`."""

    def __init__(self, signer: CosignatureSigner, logs: Mapping[str, Sequence[NoteVerifier]], state_file: Path, *,
                 clock: Callable[[], float] = time.time) -> None:
        if not logs:
            raise ValueError("a witness needs at least one log key to trust")
        self.signer = signer
        self._logs = {origin: list(keys) for origin, keys in logs.items()}
        self._state = _State(state_file)
        self._clock = clock
        self._lock = threading.Lock()

    @classmethod
    def for_log_keys(cls, signer: CosignatureSigner, log_keys: Sequence[NoteVerifier], state_file: Path,
                     **kwargs: Callable[[], float]) -> Witness:
        """Each log is named by its key: origin = key name (as clipstore's checkpoints are)."""
        logs: dict[str, list[NoteVerifier]] = {}
        for key in log_keys:
            logs.setdefault(key.name, []).append(key)
        return cls(signer, logs, state_file, **kwargs)

    def cosigned_size(self, origin: str) -> int:
        with self._lock:
            return self._state.logs.get(origin, (0, _EMPTY_ROOT))[0]

    def add_checkpoint(self, body: bytes) -> Answer:
        parsed = _parse_request(body)
        if parsed is None:
            return Answer(400, b"malformed request: want 'old N', at most 63 base64 hashes, an empty line, "
                               b"a signed checkpoint\n")
        old, proof, note = parsed
        try:
            text, _ = verify_note(note, [])  # framing only: which log it claims to be
            checkpoint = Checkpoint.parse(text)
        except (NoteError, CheckpointError) as exc:
            return Answer(400, f"malformed checkpoint: {exc}\n".encode())
        keys = self._logs.get(checkpoint.origin)
        if keys is None:
            return Answer(404, b"unknown log origin\n")
        try:
            _, verified = verify_note(note, keys)
        except NoteError:
            verified = []
        if not verified:
            return Answer(403, b"no valid signature by a trusted key of this log\n")
        if old > checkpoint.size:
            return Answer(400, b"old size is larger than the checkpoint size\n")
        with self._lock:
            size, root = self._state.logs.get(checkpoint.origin, (0, _EMPTY_ROOT))
            if old != size:
                return Answer(409, f"{size}\n".encode(), SIZE_CONTENT_TYPE)
            if checkpoint.size == 0 and checkpoint.root != _EMPTY_ROOT:
                return Answer(422, b"an empty tree has the root SHA-256 of nothing\n")
            if old == 0 and proof:
                return Answer(422, b"the proof must be empty when the old size is 0\n")
            if old == checkpoint.size:
                if proof:
                    return Answer(422, b"the proof must be empty between equal sizes\n")
                if checkpoint.root != root:
                    return Answer(409, f"{size}\n".encode(), SIZE_CONTENT_TYPE)
            elif old > 0:
                try:
                    verify_consistency(old, checkpoint.size, root, checkpoint.root, proof)
                except ProofError:
                    return Answer(422, b"the consistency proof does not verify\n")
            self._state.logs[checkpoint.origin] = (checkpoint.size, checkpoint.root)
            try:
                self._state.persist()
            except OSError:
                self._state.logs[checkpoint.origin] = (size, root)  # memory matches disk again
                return Answer(500, b"the witness could not persist its state\n")
            line = self.signer.cosign(text, int(self._clock()))
        return Answer(200, line.encode())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the spec asks
    server: WitnessServer

    def _send(self, answer: Answer) -> None:
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/").rsplit("/", 1)[-1] != "add-checkpoint":
            self._send(Answer(404, b"not found\n"))
            return
        length = self.headers.get("Content-Length", "")
        decimal = length.isascii() and length.isdigit()  # str.isdigit() alone takes '²', which int() refuses
        if not decimal or int(length) > MAX_REQUEST_BYTES:
            self.close_connection = True
            self._send(Answer(413 if decimal else 400, b"need a Content-Length up to 64 KiB\n"))
            return
        self._send(self.server.witness.add_checkpoint(self.rfile.read(int(length))))

    def do_GET(self) -> None:  # noqa: N802
        self._send(Answer(405, b"POST /add-checkpoint\n"))

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        sys.stderr.write(f"witness: {self.address_string()} {format % args}\n")


class WitnessServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a log and its replicas submit in bursts

    def __init__(self, address: tuple[str, int], witness: Witness, *, quiet: bool = False) -> None:
        self.witness = witness
        handler = type("QuietHandler", (_Handler,), {"log_message": lambda *a: None}) if quiet else _Handler
        super().__init__(address, handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        assert isinstance(host, str)  # an AF_INET/AF_INET6 address: text, never bytes
        return f"http://{host}:{port}"

    def __enter__(self) -> WitnessServer:
        threading.Thread(target=self.serve_forever, name="witness-http", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.shutdown()
        self.server_close()
