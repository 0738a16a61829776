"""`auditlog verify` on exports: OK, and every kind of tampering pinpointed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from auditlog.__main__ import verify_dir
from auditlog.entry import canonical_json, entry_hash
from auditlog.note import NoteSigner
from tests.auditlog_helpers import build_entries, checkpoint_for, write_export

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
