"""`auditlog verify DIR --key VKEY [--trusted-checkpoint FILE] [--strict]`.

DIR is an export: `entries.jsonl` (one canonical entry per line; a final
empty line is ignored, as Go's line readers and `jq` ignore it),
`checkpoint` (a signed note) and, for reference, `verifier.key`. Always pass
--key from a copy you obtained independently of the export.

Exit 0 and `OK size=<n> root=<hex> unsigned_trailing=<k>` (k entries follow the
checkpoint: chained, but no signature covers them; `--strict` fails on them);
exit 1 and `FAIL entry <i>: <reason>` or `FAIL checkpoint: <reason>`; exit 2
for unusable arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from auditlog.errors import EntryError, VerificationError
from auditlog.note import NoteVerifier
from auditlog.verify import verify_log

ENTRIES_FILE = "entries.jsonl"
CHECKPOINT_FILE = "checkpoint"
VERIFIER_KEY_FILE = "verifier.key"


def _read_key(value: str) -> str:
    path = Path(value)
    return path.read_text().strip() if "+" not in value and path.is_file() else value


def _entries(path: Path) -> Iterator[bytes]:
    """One entry per line. An empty line is held back: at the end of the file it is the
    tolerated trailing blank line; anywhere else it is an entry, and fails as malformed."""
    held = 0
    with path.open("rb") as fh:
        for line in fh:
            data = line[:-1] if line.endswith(b"\n") else line
            if not data:
                held += 1
                continue
            while held:
                held -= 1
                yield b""
            yield data
    if held > 1:
        yield b""  # two or more blank lines at the end: not a trailing newline slip


def verify_dir(export: Path, vkey: str, trusted: Path | None, *, strict: bool = False) -> tuple[int, str]:
    """Run the verifier; returns (exit code, the one line to print)."""
    try:
        verifier = NoteVerifier.from_key_string(_read_key(vkey))
        checkpoint = (export / CHECKPOINT_FILE).read_bytes()
        trusted_note = trusted.read_bytes() if trusted else None
    except OSError as exc:
        return 2, f"ERROR cannot read {exc.filename}: {exc.strerror}"
    except VerificationError as exc:
        return 2, f"ERROR bad --key: {exc}"
    try:
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
    return 0, f"OK size={result.size} root={result.root.hex()} unsigned_trailing={result.unsigned_trailing}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="auditlog", description="Verify a clipstore audit log export")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="verify an export directory")
    verify.add_argument("export", type=Path, help=f"directory with {ENTRIES_FILE} and {CHECKPOINT_FILE}")
    verify.add_argument("--key", required=True, help="verifier key string name+hash+key, or a file holding it")
    verify.add_argument("--trusted-checkpoint", type=Path,
                        help="a checkpoint saved earlier; fails on rollback or fork relative to it")
    verify.add_argument("--strict", action="store_true",
                        help="fail when entries follow the checkpoint (no signature covers them)")
    args = parser.parse_args(argv)
    code, line = verify_dir(args.export, args.key, args.trusted_checkpoint, strict=args.strict)
    print(line, file=sys.stderr if code == 2 else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
