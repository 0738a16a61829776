"""`auditlog verify DIR --key VKEY [--trusted-checkpoint FILE] [--strict]`.

DIR is an export: `entries.jsonl` (one canonical entry per line, at most
16 KiB, MAX_ENTRY_BYTES: a longer line fails where it starts and is never read
whole; a final empty line is ignored, as Go's line readers and `jq` ignore it),
`checkpoint` (a signed note) and, for reference, `verifier.key`. Always pass
--key from a copy you obtained independently of the export.

Exit 0 and `OK size=<n> root=<hex> unsigned_trailing=<k>` (k entries follow the
checkpoint: chained, but no signature covers them; `--strict` fails on them);
exit 1 and `FAIL entry <i>: <reason>` or `FAIL checkpoint: <reason>`; exit 2
for unusable arguments.

`auditlog verify --tiles DIR|https://…|s3://bucket/prefix --key VKEY
[--witness WKEY … --quorum N] [--state FILE] [--format json]` verifies the
log published as C2SP tlog-tiles. With --state, the last verified checkpoint
is remembered, with each account's access-chain head, and the next run checks
only the new entries (their account chains continuing from those heads) and
that the old tree is a prefix of the new one (`FAIL checkpoint: rolled
back…`/`forked…`). A state file that is not what an earlier run wrote (edited, truncated,
its checkpoint not signed by --key for its size and root) is `ERROR the
state file … is unusable: …` (exit 2), never read as a fault of the log.
Also `FAIL tile <path>: <reason>`. Progress goes to stderr on long runs.

`auditlog verify-report FILE --key VKEY [--witness WKEY … --quorum N]
[--account-id ID] [--nonce N] [--format json]` verifies an account's access
report (docs/access-report.md): exit 0, `OK account=… accesses=…` and a table
(when, what, which clip and its capture time, who as a per-account pseudonym);
exit 1 and `FAIL <part>: <reason>`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import json
import os
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from auditlog.cosignature import Cosignature, CosignatureVerifier, open_cosigned_checkpoint
from auditlog.entry import MAX_ENTRY_BYTES
from auditlog.errors import EntryError, NoteError, VerificationError
from auditlog.note import MAX_NOTE_BYTES, NoteVerifier
from auditlog.tiles import TileError
from auditlog.verify import StateFileError, TileState, verify_log, verify_tiles

ENTRIES_FILE = "entries.jsonl"
CHECKPOINT_FILE = "checkpoint"
VERIFIER_KEY_FILE = "verifier.key"
# one byte past the longest entry: its newline, or the byte that proves the line too long; bounds each read
MAX_LINE_BYTES = MAX_ENTRY_BYTES + 1
MAX_KEY_FILE_BYTES = 4096  # a key string is under 200 bytes; never read a huge file whole


def _read_key(value: str) -> str:
    """A key string, or the text of the file it names. A file that is not a short UTF-8 text is a
    `NoteError` (the caller's "bad --key"), not a traceback."""
    path = Path(value)
    if "+" in value or not path.is_file():
        return value
    with path.open("rb") as fh:
        data = fh.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise NoteError(f"key file {path} is larger than {MAX_KEY_FILE_BYTES} bytes; pass the key string")
    try:
        return data.decode().strip()
    except UnicodeDecodeError:
        raise NoteError(f"key file {path} is not UTF-8 text; pass the key string") from None


def _verifiers(vkey: str, witnesses: Sequence[str]) -> tuple[NoteVerifier, list[CosignatureVerifier]]:
    """The log's verifier and the witnesses', from key strings or the files naming them (`_read_key`)."""
    return (NoteVerifier.from_key_string(_read_key(vkey)),
            [CosignatureVerifier.from_key_string(_read_key(w)) for w in witnesses])


def _open_file(path: Path) -> BinaryIO:
    """`path` opened for reading if it is a regular file; `OSError` otherwise. A FIFO or a device in an
    export (or given as a checkpoint) would block the verifier, or feed it forever, instead of failing."""
    # a FIFO blocks open() itself until a writer comes (Windows has neither FIFOs in paths nor the flag)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return os.fdopen(fd, "rb")  # O_NONBLOCK means nothing to a regular file
    except BaseException:
        os.close(fd)
        raise


def _read_note(path: Path) -> bytes:
    """A checkpoint file: one byte past the note limit is enough to refuse it; never read a huge file whole."""
    with _open_file(path) as fh:
        return fh.read(MAX_NOTE_BYTES + 1)


def _entries(path: Path) -> Iterator[bytes]:
    """One entry per line. An empty line is held back: at the end of the file it is the
    tolerated trailing blank line; anywhere else it is an entry, and fails as malformed.

    A line is read to one byte past the longest entry: a longer one is refused where it starts
    (`EntryError` at its index), never buffered whole."""
    held = index = 0
    with _open_file(path) as fh:
        while line := fh.readline(MAX_LINE_BYTES):
            data = line[:-1] if line.endswith(b"\n") else line
            if len(data) > MAX_ENTRY_BYTES:
                raise EntryError(index + held, f"malformed: the line is longer than {MAX_ENTRY_BYTES} bytes, the "
                                               "most an entry may be; not read further")
            if not data:
                held += 1
                continue
            while held:
                held -= 1
                index += 1
                yield b""
            index += 1
            yield data
    if held > 1:
        yield b""  # two or more blank lines at the end: not a trailing newline slip


def witness_quorum(quorum: int | None, witnesses: Sequence[str]) -> int:
    """--quorum, or every --witness when it is not given: a caller who names witnesses and forgets --quorum
    must not get OK for a checkpoint no witness cosigned (as the service's audit.witness_quorum, all)."""
    return len(witnesses) if quorum is None else quorum


def _times(cosigs: Sequence[Cosignature]) -> str:
    return ",".join(f"{c.witness}@{dt.datetime.fromtimestamp(c.timestamp, dt.UTC):%Y-%m-%dT%H:%M:%SZ}"
                    for c in cosigs)


def verify_dir(export: Path, vkey: str, trusted: Path | None, *, strict: bool = False,
               witnesses: Sequence[str] = (), quorum: int = 0) -> tuple[int, str]:
    """Run the verifier; returns (exit code, the one line to print)."""
    try:
        verifier, wkeys = _verifiers(vkey, witnesses)
        checkpoint = _read_note(export / CHECKPOINT_FILE)
        trusted_note = _read_note(trusted) if trusted else None
    except OSError as exc:
        return 2, f"ERROR cannot read {exc.filename}: {exc.strerror}"
    except VerificationError as exc:
        return 2, f"ERROR bad --key or --witness: {exc}"
    cosigs: list[Cosignature] = []
    try:
        if wkeys or quorum:
            _, cosigs = open_cosigned_checkpoint(checkpoint, verifier, wkeys, quorum)
        result = verify_log(lambda: _entries(export / ENTRIES_FILE), checkpoint, verifier, trusted_note)
    except EntryError as exc:
        return 1, f"FAIL entry {exc.index}: {exc.reason}"
    except VerificationError as exc:
        return 1, f"FAIL checkpoint: {exc}"
    except OSError as exc:
        return 2, f"ERROR cannot read {exc.filename}: {exc.strerror}"
    if strict and result.unsigned_trailing:
        return 1, (f"FAIL entry {result.size}: unsigned: {result.unsigned_trailing} entries follow the "
                   f"checkpoint (size {result.size}) and no signature covers them")
    line = f"OK size={result.size} root={result.root.hex()} unsigned_trailing={result.unsigned_trailing}"
    return 0, line + (f" witnesses={_times(cosigs)}" if cosigs else "")


class _Progress:
    """At most one stderr line a second, and only once a run has taken two seconds."""

    def __init__(self) -> None:
        self._start, self._last = time.monotonic(), 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self._start >= 2 and now - self._last >= 1:
            self._last = now
            print(f"verified {done:,} new entries", file=sys.stderr, flush=True)


def verify_tiles_at(location: str, vkey: str, *, witnesses: Sequence[str] = (), quorum: int = 0,
                    state: Path | None = None) -> tuple[int, dict[str, object]]:
    """Verify the tiles at `location`; returns (exit code, the result as a JSON-able dict)."""
    from auditlog.sources import open_source
    try:
        verifier, wkeys = _verifiers(vkey, witnesses)
        try:
            read = open_source(location)
        except OSError as exc:
            return 2, {"result": "ERROR", "reason": f"cannot read {location}: {exc.strerror}"}
        old = TileState.load(state) if state else None
    except StateFileError as exc:
        return 2, {"result": "ERROR", "reason": str(exc)}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return 2, {"result": "ERROR", "reason": f"cannot read arguments: {exc}"}
    except VerificationError as exc:
        return 2, {"result": "ERROR", "reason": f"bad --key or --witness: {exc}"}
    progress = _Progress()
    try:
        result = verify_tiles(read, verifier, witnesses=wkeys, quorum=quorum, state=old, progress=progress)
    except StateFileError as exc:
        return 2, {"result": "ERROR", "reason": f"the state file {state} is unusable: {exc}"}
    except EntryError as exc:
        return 1, {"result": "FAIL", "where": f"entry {exc.index}", "reason": exc.reason}
    except TileError as exc:
        return 1, {"result": "FAIL", "where": f"tile {exc.path}", "reason": exc.reason}
    except VerificationError as exc:
        return 1, {"result": "FAIL", "where": "checkpoint", "reason": str(exc)}
    except OSError as exc:
        return 2, {"result": "ERROR", "reason": f"cannot read {location}: {exc}"}
    if state is not None:
        TileState(origin=result.checkpoint.origin, size=result.size, root=result.root,
                  last_leaf=result.last_leaf, note=result.note, chains=result.chains).save(state)
    return 0, {"result": "OK", "size": result.size, "root": result.root.hex(), "unsigned_trailing": 0,
               "verified_from": result.old_size, "entries_verified": result.size - result.old_size,
               "account_chains": "checked" if result.chains is not None else "unchecked",
               "cosignatures": [{"witness": c.witness, "time": c.timestamp} for c in result.cosignatures]}


def _text(code: int, result: dict[str, object]) -> str:
    if result["result"] == "OK":
        cosigs = [Cosignature(c["witness"], c["time"]) for c in result["cosignatures"]]  # type: ignore[attr-defined]
        line = (f"OK size={result['size']} root={result['root']} unsigned_trailing=0 "
                f"verified_from={result['verified_from']}")
        if result.get("account_chains") == "unchecked":  # a --state file from before it held the chains' heads
            line += " account_chains=unchecked"
        return line + (f" witnesses={_times(cosigs)}" if cosigs else "")
    if result["result"] == "FAIL":
        return f"FAIL {result['where']}: {result['reason']}"
    return f"ERROR {result['reason']}"


_ACTIONS = {"grant.issue": "granted a listen", "clip.fetch": "listened", "clip.flag": "flagged to safety team",
            "escalation.read": "safety team read flag", "escalation.resolve": "safety team resolved flag",
            "clip.identity_read": "read who recorded it", "account.access_report": "report requested"}


def verify_report_file(path: Path, vkey: str, *, witnesses: Sequence[str] = (), quorum: int = 0,
                       account_id: str | None = None, nonce: str | None = None) -> tuple[int, dict[str, object]]:
    """Verify an access report; returns (exit code, the result as a JSON-able dict)."""
    from auditlog.report import MAX_REPORT_BYTES, ReportError, verify_report
    try:
        verifier, wkeys = _verifiers(vkey, witnesses)
        with _open_file(path) as fh:  # one byte past the limit is enough to refuse it: never read a huge file whole
            data = fh.read(MAX_REPORT_BYTES + 1)
    except OSError as exc:
        return 2, {"result": "ERROR", "reason": f"cannot read {exc.filename}: {exc.strerror}"}
    except VerificationError as exc:
        return 2, {"result": "ERROR", "reason": f"bad --key or --witness: {exc}"}
    try:
        report = verify_report(data, verifier, witnesses=wkeys, quorum=quorum, account_id=account_id, nonce=nonce)
    except ReportError as exc:
        return 1, {"result": "FAIL", "where": exc.where, "reason": exc.reason}
    return 0, {"result": "OK", "account_ref": report.account_ref, "account_id_checked": account_id is not None,
               "tree_size": report.checkpoint.size,
               "root": report.checkpoint.root.hex(), "complete_through": report.complete_through,
               "from_first_access": report.chain_start, "since": report.since, "until": report.until,
               "cosignatures": [{"witness": c.witness, "time": c.timestamp} for c in report.cosignatures],
               "accesses": [{"index": a.index, "time": a.time, "action": a.action, "result": a.result,
                             "reason": a.reason, "clip_id": a.clip_id, "captured_at": a.captured_at,
                             "who": a.who, "role": a.role} for a in report.accesses]}


def _report_text(result: dict[str, object]) -> str:
    if result["result"] != "OK":
        return _text(1, result) if result["result"] == "FAIL" else f"ERROR {result['reason']}"
    accesses: list[dict[str, str]] = result["accesses"]  # type: ignore[assignment]
    cosigs = [Cosignature(c["witness"], c["time"]) for c in result["cosignatures"]]  # type: ignore[attr-defined]
    lines = [f"OK account={result['account_ref']} accesses={len(accesses)} tree_size={result['tree_size']} "
             f"complete_through={result['complete_through']}"
             + "".join(f" {k}={result[k]}" for k in ("since", "until") if result[k])  # a window hides accesses
             + ("" if result["account_id_checked"] else " account_id=UNCHECKED(any account's report verifies; "
                                                         "pass --account-id)")
             + (f" witnesses={_times(cosigs)}" if cosigs else "")]
    rows = [("when", "what", "clip", "captured", "who")] + [
        (a["time"], _ACTIONS.get(a["action"], a["action"]) + ("" if a["result"] == "ok" else f" ({a['result']})"),
         a["clip_id"] or "-", a["captured_at"] or "-", f"{a['who']} ({a['role']})") for a in accesses]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def _witness_keygen(args: argparse.Namespace) -> int:
    from auditlog.cosignature import CosignatureSigner
    signer = CosignatureSigner.generate(args.name)
    try:
        fd = os.open(args.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"ERROR {args.key_file} exists; a witness key is never overwritten", file=sys.stderr)
        return 2
    with os.fdopen(fd, "w") as fh:
        fh.write(signer.key_string() + "\n")
    print(signer.verifier.key_string())
    return 0


def _witness_serve(args: argparse.Namespace) -> int:
    from auditlog.cosignature import CosignatureSigner
    from auditlog.witness import Witness, WitnessServer
    try:
        signer = CosignatureSigner.from_key_string(args.key_file.read_text())
        logs = [NoteVerifier.from_key_string(_read_key(k)) for k in args.log]
        witness = Witness.for_log_keys(signer, logs, args.state)
        host, _, port = args.listen.rpartition(":")
        server = WitnessServer((host.strip("[]"), int(port)), witness)
    except (OSError, ValueError, VerificationError) as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return 2
    print(f"witness {signer.verifier.key_string()} listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="auditlog", description="Verify a clipstore audit log; run a witness")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="verify an export directory, or the published tiles")
    verify.add_argument("export", type=Path, nargs="?", help=f"directory with {ENTRIES_FILE} and {CHECKPOINT_FILE}")
    verify.add_argument("--tiles", help="verify the C2SP tlog-tiles at DIR, https://host/prefix or s3://bucket/prefix")
    verify.add_argument("--state", type=Path, help="with --tiles: remember the verified checkpoint; next run checks "
                                                   "only new entries and fails on rollback or fork")
    verify.add_argument("--witness", action="append", default=[],
                        help="a witness's verifier key (name+id+key, or a file); repeatable")
    verify.add_argument("--quorum", type=int, default=None,
                        help="valid cosignatures required from the --witness keys (default: all of them)")
    verify.add_argument("--format", choices=("text", "json"), default="text")
    verify.add_argument("--key", required=True, help="verifier key string name+hash+key, or a file holding it")
    verify.add_argument("--trusted-checkpoint", type=Path,
                        help="a checkpoint saved earlier; fails on rollback or fork relative to it")
    verify.add_argument("--strict", action="store_true",
                        help="fail when entries follow the checkpoint (no signature covers them)")
    report = sub.add_parser("verify-report", help="verify an account's access report (docs/access-report.md)")
    report.add_argument("report", type=Path, help="the report file (JSON) GetAccessReport returned")
    report.add_argument("--key", required=True, help="the log's verifier key string, or a file holding it")
    report.add_argument("--witness", action="append", default=[], help="a witness's verifier key; repeatable")
    report.add_argument("--quorum", type=int, default=None,
                        help="valid cosignatures required from the --witness keys (default: all of them)")
    report.add_argument("--account-id", help="fail unless the report is bound to this account id")
    report.add_argument("--nonce", help="fail unless the report's request carries this nonce (freshness)")
    report.add_argument("--format", choices=("text", "json"), default="text")
    witness = sub.add_parser("witness", help="run a C2SP tlog-witness for clipstore logs")
    wsub = witness.add_subparsers(dest="witness_command", required=True)
    keygen = wsub.add_parser("keygen", help="create a witness key file (0600); prints the verifier key")
    keygen.add_argument("--name", required=True, help="the witness name, e.g. witness.example.com/w1")
    keygen.add_argument("--key-file", type=Path, required=True)
    keygen.set_defaults(func=_witness_keygen)
    serve = wsub.add_parser("serve", help="serve POST /add-checkpoint")
    serve.add_argument("--key-file", type=Path, required=True, help="written by 'auditlog witness keygen'")
    serve.add_argument("--state", type=Path, required=True, help="durable state: last cosigned size per log")
    serve.add_argument("--log", action="append", required=True,
                       help="a log's verifier key (its name is the log's origin); repeatable")
    serve.add_argument("--listen", default="127.0.0.1:7380", help="HOST:PORT (port 0: any free port)")
    serve.set_defaults(func=_witness_serve)
    args = parser.parse_args(argv)
    if args.command == "witness":
        code: int = args.func(args)
        return code
    args.quorum = witness_quorum(args.quorum, args.witness)
    if args.quorum > len(args.witness) or args.quorum < 0:
        parser.error(f"--quorum {args.quorum}: give a number from 0 to the {len(args.witness)} --witness keys")
    if args.command == "verify-report":
        code, result = verify_report_file(args.report, args.key, witnesses=args.witness, quorum=args.quorum,
                                          account_id=args.account_id, nonce=args.nonce)
        out = json.dumps(result, sort_keys=True) if args.format == "json" else _report_text(result)
        print(out, file=sys.stderr if code == 2 else sys.stdout)
        return code
    if (args.export is None) == (args.tiles is None):
        parser.error("give an export DIR or --tiles LOCATION")
    if args.state is not None and args.tiles is None:  # was ignored: no rollback check, no state written
        parser.error("--state works with --tiles; for an export DIR pass --trusted-checkpoint FILE")
    if args.trusted_checkpoint is not None and args.tiles is not None:  # was ignored likewise
        parser.error("--trusted-checkpoint works with an export DIR; with --tiles pass --state FILE")
    if args.tiles is not None:
        code, result = verify_tiles_at(args.tiles, args.key, witnesses=args.witness, quorum=args.quorum,
                                       state=args.state)
        out = json.dumps(result, sort_keys=True) if args.format == "json" else _text(code, result)
    else:
        code, out = verify_dir(args.export, args.key, args.trusted_checkpoint, strict=args.strict,
                               witnesses=args.witness, quorum=args.quorum)
        if args.format == "json":
            result = {"result": out.split(" ")[0]}
            result.update({k: int(v) if v.isdigit() else v for k, v in (kv.split("=", 1) for kv in out.split(" ")[1:]
                                                                     if "=" in kv)} if code == 0 else
                          {"reason": out.split(" ", 1)[1] if " " in out else out})  # numbers as in --tiles
            out = json.dumps(result, sort_keys=True)
    print(out, file=sys.stderr if code == 2 else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
