"""Collect witness cosignatures (C2SP tlog-witness) and publish, off the append path.

A background thread takes each new signed checkpoint, sends it to every
configured witness with a consistency proof from the size that witness last
cosigned (learning that size from a 409 `text/x.tlog.size` answer and
retrying), keeps only cosignatures that verify under the configured keys,
and publishes tiles plus the cosigned checkpoint only once `quorum` witnesses
have cosigned. Appends never wait for any of this.
"""

from __future__ import annotations

import base64
import http.client
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from auditlog.checkpoint import Checkpoint
from auditlog.cosignature import CosignatureVerifier, open_cosigned_checkpoint
from auditlog.note import NoteVerifier, open_note
from auditlog.witness import SIZE_CONTENT_TYPE
from clipstore.audit.publish import Publisher
from clipstore.audit.reader import AuditReader
from clipstore.logs import get_logger

WITNESS_TIMEOUT_S = 10.0
MAX_CONFLICT_RETRIES = 3  # a 409 teaches the witness's size; more than a few means it keeps moving
log = get_logger("clipstore.audit.witnessing")


class QuorumNotReached(Exception):
    pass


@dataclass
class WitnessEndpoint:
    url: str  # the submission prefix; requests go to <url>/add-checkpoint
    verifier: CosignatureVerifier
    last_size: int = 0  # what this witness last cosigned for us, as far as we know

    @classmethod
    def parse(cls, spec: str) -> WitnessEndpoint:
        """`URL VKEY`, as in the `audit.witnesses` setting."""
        url, _, vkey = spec.strip().partition(" ")
        if not url.startswith(("http://", "https://")) or not vkey.strip():
            raise ValueError(f"a witness is 'URL VERIFIER-KEY', got {spec.strip()[:80]!r}")
        return cls(url.rstrip("/"), CosignatureVerifier.from_key_string(vkey.strip()))


def _post(url: str, body: bytes) -> tuple[int, str, bytes]:
    parts = urllib.parse.urlsplit(url)
    conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_type(parts.netloc, timeout=WITNESS_TIMEOUT_S)
    try:
        conn.request("POST", parts.path, body=body, headers={"Content-Type": "text/plain; charset=utf-8"})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read(64 << 10)
    finally:
        conn.close()


class Cosigner:
    def __init__(self, log_key: NoteVerifier, witnesses: Sequence[WitnessEndpoint], quorum: int,
                 proof: Callable[[int, int], list[bytes]]) -> None:
        if not 0 <= quorum <= len(witnesses):
            raise ValueError(f"witness quorum {quorum} needs at least as many witnesses, have {len(witnesses)}")
        self._log_key, self.witnesses, self.quorum, self._proof = log_key, list(witnesses), quorum, proof
        self._pool = ThreadPoolExecutor(max_workers=max(len(witnesses), 1), thread_name_prefix="witness")

    def _ask(self, witness: WitnessEndpoint, note: str, size: int) -> str | None:
        old = min(witness.last_size, size)
        for _ in range(MAX_CONFLICT_RETRIES + 1):
            proof = self._proof(old, size) if 0 < old < size else []
            body = ("".join([f"old {old}\n", *(base64.b64encode(h).decode() + "\n" for h in proof), "\n"])
                    + note).encode()
            try:
                status, ctype, answer = _post(f"{witness.url}/add-checkpoint", body)
            except OSError as exc:
                log.warning("audit.witness_unreachable", witness=witness.verifier.name, exc_type=type(exc).__name__)
                return None
            if status == 409 and ctype.split(";")[0].strip() == SIZE_CONTENT_TYPE:
                reported = answer.decode(errors="replace").strip()
                if not (reported.isascii() and reported.isdigit()) or int(reported) > size:
                    # The witness has cosigned a larger tree of ours than we have: a fork or a rollback.
                    log.error("audit.witness_ahead", witness=witness.verifier.name, reported=reported[:20], size=size)
                    return None
                if int(reported) == old:
                    log.error("audit.witness_conflict", witness=witness.verifier.name, size=size)
                    return None  # same size, another root: the witness saw a different history
                old = int(reported)
                continue
            if status != 200:
                log.error("audit.witness_refused", witness=witness.verifier.name, status=status)
                return None
            lines = answer.decode(errors="replace")
            try:
                open_cosigned_checkpoint(note + lines, self._log_key, [witness.verifier], 1)
            except Exception as exc:  # anything else is a witness we cannot count
                log.error("audit.witness_bad_cosignature", witness=witness.verifier.name, exc_type=type(exc).__name__)
                return None
            witness.last_size = size
            prefix = f"\u2014 {witness.verifier.name} "
            return "".join(line + "\n" for line in lines.splitlines() if line.startswith(prefix))
        return None

    def cosign(self, note: str) -> str:
        """The note with the cosignatures of every witness that cosigned; raises below quorum."""
        size = Checkpoint.parse(open_note(note, [self._log_key])).size
        answers = list(self._pool.map(lambda w: self._ask(w, note, size), self.witnesses))
        got = [a for a in answers if a]
        if len(got) < self.quorum:
            raise QuorumNotReached(f"{len(got)} of {self.quorum} witness cosignatures for size {size}")
        cosigned = note + "".join(got)
        open_cosigned_checkpoint(cosigned, self._log_key, [w.verifier for w in self.witnesses], self.quorum)
        return cosigned

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class PublishLoop:
    """The background thread: cosign (when witnesses are configured), then publish."""

    reader: AuditReader
    log_key: NoteVerifier
    publisher: Publisher | None
    cosigner: Cosigner | None
    interval_s: float  # audit.publish_every_s
    latest: tuple[int, str] | None = None  # the last published (cosigned) checkpoint
    _stop: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _rounds: threading.Lock = field(default_factory=threading.Lock)  # one witness round at a time
    _cosigned: tuple[str, str] | None = None  # the last (note, cosigned note): not sent to the witnesses twice

    def start(self) -> None:
        if self.publisher is not None:
            self.latest = self.publisher.published()
        self._thread = threading.Thread(target=self._run, name="audit-publish", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def step(self) -> bool:
        """One round; True when something new was published."""
        current = self.reader.latest_checkpoint()
        if current is None or (self.latest is not None and current[0] <= self.latest[0]):
            return False
        size, note = current
        note = self.cosign(note)
        if self.publisher is not None:
            keys = [self.log_key, *(w.verifier for w in self.cosigner.witnesses)] if self.cosigner else [self.log_key]
            self.publisher.publish(note, keys)
        self.latest = (size, note)
        log.info("audit.published", size=size)
        return True

    def cosign(self, note: str) -> str:
        """The note with a quorum of witness cosignatures (unchanged without witnesses); raises
        `QuorumNotReached`. Exports use it too, so they carry what is published."""
        if self.cosigner is None:
            return note
        with self._rounds:
            if self._cosigned is not None and self._cosigned[0] == note:  # e.g. an access report's, then here
                return self._cosigned[1]
            cosigned = self.cosigner.cosign(note)
            self._cosigned = (note, cosigned)
            return cosigned

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as exc:  # retried next round; publishing never blocks appends
                log.error("audit.publish_failed", exc_type=type(exc).__name__, detail=str(exc)[:200])
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.cosigner is not None:
            self.cosigner.close()
