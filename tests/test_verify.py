"""`auditlog verify` on exports: OK, and every kind of tampering pinpointed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from auditlog.__main__ import verify_dir
from auditlog.entry import MAX_ENTRY_BYTES, canonical_json, entry_hash
from auditlog.note import NoteSigner
from tests.auditlog_helpers import build_chained_entries, build_entries, checkpoint_for, write_export

SIGNER = NoteSigner.generate("clipstore-audit/test")
VKEY = SIGNER.verifier.key_string()
N = 20


@pytest.fixture
def entries() -> list[bytes]:
    return build_entries(N)


def _verify(tmp_path: Path, entries: list[bytes], checkpoint: str | None = None,
            trusted: str | None = None) -> tuple[int, str]:
    export = write_export(tmp_path / "export", entries, checkpoint or checkpoint_for(entries, SIGNER), SIGNER)
    trusted_path = None
    if trusted is not None:
        trusted_path = tmp_path / "trusted"
        trusted_path.write_text(trusted)
    return verify_dir(export, VKEY, trusted_path)


def _edit(entry: bytes, **changes: object) -> bytes:
    value = json.loads(entry)
    value.update(changes)
    return canonical_json(value)


def test_intact_export_verifies_via_the_cli(tmp_path: Path, entries: list[bytes]) -> None:
    export = write_export(tmp_path / "e", entries, checkpoint_for(entries, SIGNER), SIGNER)
    result = subprocess.run([sys.executable, "-m", "auditlog", "verify", str(export), "--key", VKEY],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"OK size={N} root=")


def test_key_may_be_given_as_a_file(tmp_path: Path, entries: list[bytes]) -> None:
    export = write_export(tmp_path / "e", entries, checkpoint_for(entries, SIGNER), SIGNER)
    code, line = verify_dir(export, str(export / "verifier.key"), None)
    assert code == 0, line


def test_edited_entry_is_pinpointed(tmp_path: Path, entries: list[bytes]) -> None:
    checkpoint = checkpoint_for(entries, SIGNER)
    entries[7] = _edit(entries[7], action="clip.delete")
    assert _verify(tmp_path, entries, checkpoint) == (1, "FAIL entry 7: edited: its hash no longer matches "
                                                         "entry 8's prev")


def test_edited_last_entry_fails_the_signed_root(tmp_path: Path, entries: list[bytes]) -> None:
    checkpoint = checkpoint_for(entries, SIGNER)
    entries[-1] = _edit(entries[-1], outcome={"result": "denied", "reason": "x"})
    code, line = _verify(tmp_path, entries, checkpoint)
    assert code == 1 and line.startswith(f"FAIL entry {N - 1}: the entries do not hash to the signed")


def test_rewritten_chain_fails_the_signed_root(tmp_path: Path, entries: list[bytes]) -> None:
    checkpoint = checkpoint_for(entries, SIGNER)
    forged = build_entries(N)
    forged[3] = _edit(forged[3], action="clip.fetch")
    # Re-link the rest so every prev matches: only the signed root can tell.
    for i in range(4, N):
        forged[i] = _edit(forged[i], prev=entry_hash(forged[i - 1]))
    code, line = _verify(tmp_path, forged, checkpoint)
    assert code == 1 and "do not hash to the signed checkpoint root" in line


def test_deleted_entry_is_pinpointed(tmp_path: Path, entries: list[bytes]) -> None:
    checkpoint = checkpoint_for(entries, SIGNER)
    del entries[5]
    code, line = _verify(tmp_path, entries, checkpoint)
    assert (code, line.split(":")[0]) == (1, "FAIL entry 5") and "deleted" in line


def test_reordered_entries_are_pinpointed(tmp_path: Path, entries: list[bytes]) -> None:
    checkpoint = checkpoint_for(entries, SIGNER)
    entries[9], entries[10] = entries[10], entries[9]
    code, line = _verify(tmp_path, entries, checkpoint)
    assert (code, line.split(":")[0]) == (1, "FAIL entry 9") and "reordered" in line


def test_inserted_entry_is_pinpointed(tmp_path: Path, entries: list[bytes]) -> None:
    checkpoint = checkpoint_for(entries, SIGNER)
    forged = _edit(entries[12], prev=entry_hash(entries[11]), action="clip.fetch", request_id="forged")
    entries.insert(12, forged)
    code, line = _verify(tmp_path, entries, checkpoint)
    assert (code, line.split(":")[0]) == (1, "FAIL entry 12") and "inserted" in line


def test_truncated_tail_is_pinpointed(tmp_path: Path, entries: list[bytes]) -> None:
    checkpoint = checkpoint_for(entries, SIGNER)
    code, line = _verify(tmp_path, entries[:15], checkpoint)
    assert (code, line.split(":")[0]) == (1, "FAIL entry 15") and "truncated" in line


def test_non_canonical_entry_is_pinpointed(tmp_path: Path, entries: list[bytes]) -> None:
    checkpoint = checkpoint_for(entries, SIGNER)
    entries[4] = entries[4].replace(b'","', b'", "', 1)
    code, line = _verify(tmp_path, entries, checkpoint)
    assert (code, line.split(":")[0]) == (1, "FAIL entry 4") and "canonical" in line


def test_bad_checkpoint_signature_fails(tmp_path: Path, entries: list[bytes]) -> None:
    checkpoint = checkpoint_for(entries, SIGNER)
    tampered = checkpoint.replace(f"\n{N}\n", f"\n{N - 1}\n")
    code, line = _verify(tmp_path, entries, tampered)
    assert code == 1 and line.startswith("FAIL checkpoint: invalid signature")


def test_checkpoint_signed_by_another_key_fails(tmp_path: Path, entries: list[bytes]) -> None:
    impostor = NoteSigner.generate(SIGNER.name)
    code, line = _verify(tmp_path, entries, checkpoint_for(entries, impostor))
    assert code == 1 and "no verifiable signatures" in line


def test_rollback_relative_to_trusted_checkpoint_fails(tmp_path: Path, entries: list[bytes]) -> None:
    trusted = checkpoint_for(entries, SIGNER)
    code, line = _verify(tmp_path, entries[:12], checkpoint_for(entries[:12], SIGNER), trusted=trusted)
    assert (code, line.split(":")[0]) == (1, "FAIL entry 12") and "rolled back" in line


def test_fork_relative_to_trusted_checkpoint_fails(tmp_path: Path, entries: list[bytes]) -> None:
    trusted = checkpoint_for(entries[:10], SIGNER)
    fork = build_entries(N)
    fork[2] = _edit(fork[2], action="clip.delete")
    for i in range(3, N):
        fork[i] = _edit(fork[i], prev=entry_hash(fork[i - 1]))
    code, line = _verify(tmp_path, fork, checkpoint_for(fork, SIGNER), trusted=trusted)
    assert (code, line.split(":")[0]) == (1, "FAIL entry 9") and "forked" in line


def test_growth_since_trusted_checkpoint_is_ok(tmp_path: Path, entries: list[bytes]) -> None:
    trusted = checkpoint_for(entries[:7], SIGNER)
    assert _verify(tmp_path, entries, trusted=trusted)[0] == 0


def test_missing_files_exit_2(tmp_path: Path) -> None:
    code, line = verify_dir(tmp_path / "nowhere", VKEY, None)
    assert code == 2 and line.startswith("ERROR cannot read")


def test_auditlog_imports_only_stdlib_and_cryptography() -> None:
    import ast
    root = Path(__file__).parent.parent / "auditlog"
    allowed = set(sys.stdlib_module_names) | {"cryptography", "auditlog"}
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
    probe = "import sys, auditlog.__main__, auditlog.verify; " \
            "bad = [m for m in sys.modules if m.split('.')[0] in ('clipstore', 'kms', 'grpc', 'boto3')]; " \
            "print(bad); sys.exit(1 if bad else 0)"
    assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0


# -- issue 11.15: unsigned trailing entries, malformed input, a trailing blank line ----------

def _forged_tail(entries: list[bytes]) -> bytes:
    """A correctly chained entry appended after the checkpoint: nobody signed it."""
    return _edit(entries[-1], seq=len(entries), prev=entry_hash(entries[-1]), action="clip.fetch",
                 request_id="forged")


def test_unsigned_trailing_entries_are_reported_not_silently_accepted(tmp_path: Path,
                                                                      entries: list[bytes]) -> None:
    checkpoint = checkpoint_for(entries, SIGNER)
    code, line = _verify(tmp_path, [*entries, _forged_tail(entries)], checkpoint)
    assert code == 0 and line.startswith(f"OK size={N} root=") and line.endswith(" unsigned_trailing=1"), line


def test_json_output_of_an_export_carries_numbers_as_for_tiles(tmp_path: Path, entries: list[bytes]) -> None:
    export = write_export(tmp_path / "e", entries, checkpoint_for(entries, SIGNER), SIGNER)
    result = subprocess.run([sys.executable, "-m", "auditlog", "verify", str(export), "--key", VKEY, "--format",
                             "json"], capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout) == {"result": "OK", "size": N, "root": _root(entries), "unsigned_trailing": 0}


@pytest.mark.parametrize(("flags", "says"), [
    (["--state", "s.json"], "--state works with --tiles; for an export DIR pass --trusted-checkpoint FILE"),
    (["--tiles", "t", "--trusted-checkpoint", "c"], "--trusted-checkpoint works with an export DIR; with --tiles "
                                                    "pass --state FILE"),
])
def test_a_rollback_flag_the_chosen_source_cannot_use_is_refused_not_ignored(
        tmp_path: Path, entries: list[bytes], flags: list[str], says: str) -> None:
    """`verify DIR --state FILE` answered OK and wrote no state, `--tiles --trusted-checkpoint` checked nothing
    against the checkpoint: the caller believed rollback was being detected."""
    export = write_export(tmp_path / "e", entries, checkpoint_for(entries, SIGNER), SIGNER)
    source = [] if "--tiles" in flags else [str(export)]
    result = subprocess.run([sys.executable, "-m", "auditlog", "verify", *source, "--key", VKEY, *flags],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().endswith(says) and result.stdout == "", result
    assert not (tmp_path / "s.json").exists()


def test_strict_fails_on_unsigned_trailing_entries_via_the_cli(tmp_path: Path, entries: list[bytes]) -> None:
    export = write_export(tmp_path / "e", [*entries, _forged_tail(entries)], checkpoint_for(entries, SIGNER), SIGNER)
    result = subprocess.run([sys.executable, "-m", "auditlog", "verify", str(export), "--key", VKEY, "--strict"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    assert result.stdout.startswith(f"FAIL entry {N}: unsigned: 1 entries follow the checkpoint"), result.stdout


def test_strict_passes_a_log_that_ends_at_its_checkpoint(tmp_path: Path, entries: list[bytes]) -> None:
    export = write_export(tmp_path / "e", entries, checkpoint_for(entries, SIGNER), SIGNER)
    assert verify_dir(export, VKEY, None, strict=True) == (0, f"OK size={N} root="
                                                               f"{_root(entries)} unsigned_trailing=0")


def _root(entries: list[bytes]) -> str:
    from auditlog.merkle import leaf_hash, root_hash
    return root_hash([leaf_hash(e) for e in entries]).hex()


MALFORMED = {
    "seq as a string": lambda e: e.replace(b'"seq":4,', b'"seq":"4",'),
    "lone surrogate": lambda e: e.replace(b'"action":"clip.ingest"', b'"action":"\\ud800"'),
    "invalid UTF-8": lambda e: e.replace(b"clip.ingest", b"clip.\xff"),
    "deep nesting": lambda e: b"[" * 5000 + b"]" * 5000,
    "huge integer": lambda e: e.replace(b'"seq":4,', b'"seq":' + b"9" * 5000 + b","),
    "not an object": lambda e: b'"just a string"',
    "empty line": lambda e: b"",
}


@pytest.mark.parametrize("how", sorted(MALFORMED))
def test_malformed_entry_fails_with_its_index_never_a_traceback(tmp_path: Path, entries: list[bytes],
                                                                how: str) -> None:
    checkpoint = checkpoint_for(entries, SIGNER)
    entries[4] = MALFORMED[how](entries[4])
    export = write_export(tmp_path / "e", entries, checkpoint, SIGNER)
    result = subprocess.run([sys.executable, "-m", "auditlog", "verify", str(export), "--key", VKEY],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout.startswith("FAIL entry 4: malformed"), result
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("bad", [b"clip.\xff", b"\xff\xfe"])
def test_an_entry_that_is_not_utf8_says_so(tmp_path: Path, entries: list[bytes], bad: bytes) -> None:
    """The README's 'malformed: … not UTF-8', not 'not valid JSON (UnicodeDecodeError)' (or, for a UTF-16
    byte-order mark, JSONDecodeError)."""
    checkpoint = checkpoint_for(entries, SIGNER)
    entries[4] = entries[4].replace(b"clip.ingest", bad)
    assert _verify(tmp_path, entries, checkpoint) == (1, "FAIL entry 4: malformed: not UTF-8")


@pytest.mark.parametrize("how", sorted(set(MALFORMED) - {"empty line"}))  # a final blank line is tolerated
def test_malformed_unsigned_trailing_entry_fails_too(tmp_path: Path, entries: list[bytes], how: str) -> None:
    checkpoint = checkpoint_for(entries, SIGNER)
    tail = MALFORMED[how](_edit(entries[-1], seq=4, prev=entry_hash(entries[-1])))  # seq 4: what MALFORMED edits
    code, line = _verify(tmp_path, [*entries, tail], checkpoint)
    assert code == 1 and line.startswith(f"FAIL entry {N}: malformed"), line


def test_one_trailing_empty_line_is_accepted(tmp_path: Path, entries: list[bytes]) -> None:
    export = write_export(tmp_path / "e", entries, checkpoint_for(entries, SIGNER), SIGNER)
    with (export / "entries.jsonl").open("ab") as fh:
        fh.write(b"\n")
    assert verify_dir(export, VKEY, None, strict=True)[0] == 0


def test_a_missing_final_newline_is_accepted(tmp_path: Path, entries: list[bytes]) -> None:
    export = write_export(tmp_path / "e", entries, checkpoint_for(entries, SIGNER), SIGNER)
    (export / "entries.jsonl").write_bytes(b"\n".join(entries))
    assert verify_dir(export, VKEY, None, strict=True)[0] == 0


def test_two_trailing_empty_lines_fail_as_a_malformed_entry(tmp_path: Path, entries: list[bytes]) -> None:
    export = write_export(tmp_path / "e", entries, checkpoint_for(entries, SIGNER), SIGNER)
    with (export / "entries.jsonl").open("ab") as fh:
        fh.write(b"\n\n")
    code, line = verify_dir(export, VKEY, None)
    assert code == 1 and line.startswith(f"FAIL entry {N}: malformed"), line


def test_account_chains_are_checked_over_the_whole_log(tmp_path: Path) -> None:
    assert _verify(tmp_path / "a", build_chained_entries([(1, None), (2, None), (3, None)]))[0] == 0
    assert _verify(tmp_path / "b", build_chained_entries([(1, None), (2, None), (2, None)])) == (
        1, "FAIL entry 2: account chain: account_seq is 2, expected 3 (the account's chain forks or skips here)")
    assert _verify(tmp_path / "c", build_chained_entries([(1, None), (2, "0" * 64)])) == (
        1, "FAIL entry 1: account chain: account_prev is not the hash of the account's previous entry")
    unchained = build_entries(1, start_prev=entry_hash(build_chained_entries([(1, None)])[0]), first_seq=1)
    unchained = [_edit(unchained[0], action="clip.fetch")]
    assert _verify(tmp_path / "d", build_chained_entries([(1, None)]) + unchained) == (
        1, "FAIL entry 1: account chain: a clip.fetch entry is outside its account's chain, though chaining began "
           "at entry 0")


KEY_FILES = {"not UTF-8": b"\xff\xfe" + VKEY.encode(), "a huge file": b"x" * 10_000_000}


@pytest.mark.parametrize("command", ["verify", "verify-report"])
@pytest.mark.parametrize("how", sorted(KEY_FILES))
def test_an_unreadable_key_file_is_a_one_line_error_never_a_traceback(tmp_path: Path, entries: list[bytes],
                                                                      command: str, how: str) -> None:
    export = write_export(tmp_path / "e", entries, checkpoint_for(entries, SIGNER), SIGNER)
    key_file = tmp_path / "verifier.key"
    key_file.write_bytes(KEY_FILES[how])
    target = export if command == "verify" else export / "entries.jsonl"
    result = subprocess.run([sys.executable, "-m", "auditlog", command, str(target), "--key", str(key_file)],
                            capture_output=True, text=True, timeout=60)
    out = (result.stdout + result.stderr).strip()
    assert result.returncode == 2 and "Traceback" not in out and len(out.splitlines()) == 1, out
    assert "bad --key" in out and str(key_file) in out, out


def test_a_trusted_checkpoint_that_does_not_open_is_named_as_the_trusted_one(tmp_path: Path,
                                                                             entries: list[bytes]) -> None:
    """The export's own checkpoint is sound; the team's saved file is the one signed by another key."""
    impostor = NoteSigner.generate(SIGNER.name)
    code, line = _verify(tmp_path, entries, trusted=checkpoint_for(entries[:5], impostor))
    assert code == 1 and line.startswith("FAIL checkpoint: the trusted checkpoint: "), line


def _cosigned(tmp_path: Path, entries: list[bytes], cosigners: int) -> tuple[Path, list[str]]:
    """An export whose checkpoint the first `cosigners` of two witnesses cosigned; both witnesses' keys."""
    from auditlog.cosignature import CosignatureSigner
    from auditlog.witness import Witness
    tmp_path.mkdir()
    note = checkpoint_for(entries, SIGNER)
    signers = [CosignatureSigner.generate(f"w{i}.test") for i in range(2)]
    witnesses = [Witness.for_log_keys(w, [SIGNER.verifier], tmp_path / f"w{i}", clock=lambda: 1_767_225_600)
                 for i, w in enumerate(signers[:cosigners])]
    lines = "".join(w.add_checkpoint(f"old 0\n\n{note}".encode()).body.decode() for w in witnesses)
    export = write_export(tmp_path / "e", entries, note + lines, SIGNER)
    return export, [arg for w in signers for arg in ("--witness", w.verifier.key_string())]


@pytest.mark.parametrize("command", [["-m", "auditlog", "verify"]])
def test_witnesses_without_quorum_means_every_witness_must_have_cosigned(tmp_path: Path, entries: list[bytes],
                                                                         command: list[str]) -> None:
    """--witness W1 --witness W2 without --quorum verified OK a checkpoint no witness had cosigned (quorum 0)."""
    for cosigners, expected in ((0, 1), (1, 1), (2, 0)):
        export, witnesses = _cosigned(tmp_path / str(cosigners), entries, cosigners)
        result = subprocess.run([sys.executable, *command, str(export), "--key", VKEY, *witnesses],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == expected, (cosigners, result)
        if expected:
            assert f"{cosigners} valid witness cosignatures, the quorum is 2" in result.stdout, result
    explicit = subprocess.run([sys.executable, *command, str(export), "--key", VKEY, *witnesses[:2], "--quorum", "0"],
                              capture_output=True, text=True, timeout=60)
    assert explicit.returncode == 0, explicit


@pytest.mark.parametrize("fifo", ["entries.jsonl", "checkpoint", "trusted", "report"])
def test_a_fifo_in_place_of_a_file_is_an_error_not_a_hang(tmp_path: Path, entries: list[bytes], fifo: str) -> None:
    """open() of a FIFO blocks until a writer comes: the verifier waited forever."""
    import os
    export = write_export(tmp_path / "e", entries, checkpoint_for(entries, SIGNER), SIGNER)
    where = {"trusted": tmp_path / "trusted", "report": tmp_path / "report.json"}.get(fifo, export / fifo)
    where.unlink(missing_ok=True)
    os.mkfifo(where)
    args = {"trusted": ["verify", str(export), "--trusted-checkpoint", str(where)],
            "report": ["verify-report", str(where)]}.get(fifo, ["verify", str(export)])
    result = subprocess.run([sys.executable, "-m", "auditlog", *args, "--key", VKEY],
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stderr.strip()) == (2, f"ERROR cannot read {where}: not a regular file"), result


OVER_LONG = f"malformed: the line is longer than {MAX_ENTRY_BYTES} bytes, the most an entry may be; not read further"


@pytest.mark.parametrize("index", [0, 7, N])
def test_a_line_just_over_the_entry_limit_is_refused_where_it_starts(tmp_path: Path, entries: list[bytes],
                                                                    index: int) -> None:
    """At the end without a newline, too: one byte past the longest entry is enough to refuse it."""
    checkpoint = checkpoint_for(entries, SIGNER)
    export = write_export(tmp_path / "e", entries, checkpoint, SIGNER)
    lines = [e + b"\n" for e in entries]
    lines.insert(index, b"x" * (MAX_ENTRY_BYTES + 1) + (b"\n" if index < N else b""))
    (export / "entries.jsonl").write_bytes(b"".join(lines))
    assert verify_dir(export, VKEY, None) == (1, f"FAIL entry {index}: {OVER_LONG}")


def test_an_entry_of_exactly_the_limit_is_read_whole(tmp_path: Path, entries: list[bytes]) -> None:
    """The bound is the entry limit itself: a longest entry (padded in request_id) is read, not cut."""
    checkpoint = checkpoint_for(entries, SIGNER)
    longest = _edit(entries[-1], seq=N, prev=entry_hash(entries[-1]), request_id="")
    longest = _edit(longest, request_id="r" * (MAX_ENTRY_BYTES - len(longest)))
    assert len(longest) == MAX_ENTRY_BYTES
    assert _verify(tmp_path, [*entries, longest], checkpoint)[0] == 0


def test_a_huge_newline_less_line_is_never_buffered_whole(tmp_path: Path, entries: list[bytes]) -> None:
    """A 200 MB line without a newline was read whole before the size check refused it; here 32 MiB."""
    import tracemalloc
    export = write_export(tmp_path / "e", entries, checkpoint_for(entries, SIGNER), SIGNER)
    with (export / "entries.jsonl").open("ab") as fh:
        for _ in range(32):
            fh.write(b"x" * (1 << 20))
    tracemalloc.start()
    try:
        result = verify_dir(export, VKEY, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result == (1, f"FAIL entry {N}: {OVER_LONG}")
    assert peak < 4 << 20, f"peak {peak} bytes"  # reading the checkpoint allocates its 1 MiB bound; the line: 16 KiB
    cli = subprocess.run([sys.executable, "-m", "auditlog", "verify", str(export), "--key", VKEY],
                         capture_output=True, text=True, timeout=60)
    assert (cli.returncode, cli.stdout.strip(), cli.stderr) == (1, f"FAIL entry {N}: {OVER_LONG}", ""), cli
