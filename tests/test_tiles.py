"""C2SP tlog-tiles: what the writer publishes, read back by a reader that shares no code with it
(hashlib and the spec's formulas only), and `auditlog verify --tiles [--state] [--format json]`."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from auditlog.entry import entry_hash
from auditlog.note import NoteSigner
from auditlog.tiles import TileWriter, entries_path, tile_path
from tests.auditlog_helpers import build_chained_entries, build_entries, checkpoint_for, publish_tiles

SIGNER = NoteSigner.generate("clipstore-audit/tiles-test")
VKEY = SIGNER.verifier.key_string()


# -- an independent reader: the spec text, hashlib, nothing from auditlog -----------------------

def _spec_index(n: int) -> str:
    digits = str(n)
    digits = "0" * (-len(digits) % 3) + digits
    groups = [digits[i:i + 3] for i in range(0, len(digits), 3)]
    return "/".join(["x" + g for g in groups[:-1]] + [groups[-1]])


def _spec_read(root: Path) -> tuple[int, bytes, list[bytes]]:
    """Checkpoint size and root, and every entry, read the way any tlog-tiles client reads them."""
    body = (root / "checkpoint").read_text().split("\n\n")[0].split("\n")
    size, tree_root = int(body[1]), base64.b64decode(body[2])
    entries: list[bytes] = []
    for n in range(-(-size // 256)):
        width = min(256, size - 256 * n)
        name = f"tile/entries/{_spec_index(n)}" + ("" if width == 256 else f".p/{width}")
        data = (root / name).read_bytes()
        bundle, i = [], 0
        while i < len(data):
            length = int.from_bytes(data[i:i + 2], "big")
            bundle.append(data[i + 2:i + 2 + length])
            i += 2 + length
        assert len(bundle) == width, name
        entries += bundle
    return size, tree_root, entries


def _spec_check_tiles(root: Path, leaves: list[bytes]) -> int:
    """Every tile the spec says a tree of len(leaves) has, byte for byte; returns how many."""
    @functools.cache
    def mth(lo: int, hi: int) -> bytes:  # RFC 6962 MTH(D[lo:hi]), recursively
        if hi - lo == 1:
            return leaves[lo]
        k = 1 << ((hi - lo - 1).bit_length() - 1)
        return hashlib.sha256(b"\x01" + mth(lo, lo + k) + mth(lo + k, hi)).digest()

    size, count, level = len(leaves), 0, 0
    while size // 256 ** level:
        hashes = size // 256 ** level  # full subtrees of 256**level leaves at this level
        for n in range(-(-hashes // 256)):
            width = min(256, hashes - 256 * n)
            name = f"tile/{level}/{_spec_index(n)}" + ("" if width == 256 else f".p/{width}")
            want = b"".join(mth((n * 256 + i) * 256 ** level, (n * 256 + i + 1) * 256 ** level)
                            for i in range(width))
            assert (root / name).read_bytes() == want, name
            count += 1
        level += 1
    return count


def test_tile_paths_follow_the_spec() -> None:
    assert tile_path(0, 1234067) == "tile/0/x001/x234/067" == f"tile/0/{_spec_index(1234067)}"
    assert tile_path(1, 0) == "tile/1/000" and tile_path(2, 1000, 17) == "tile/2/x001/000.p/17"
    assert entries_path(5, 112) == "tile/entries/005.p/112" and entries_path(999) == "tile/entries/999"
    for bad in ((64, 0, 256), (0, -1, 256), (0, 0, 0), (0, 0, 257)):
        with pytest.raises(ValueError):
            tile_path(*bad)


def test_spec_example_tree_of_70000_is_read_back_by_an_independent_reader(tmp_path: Path) -> None:
    entries = build_entries(70_000)
    publish_tiles(tmp_path, entries, SIGNER, sizes=[70_000])
    size, tree_root, read = _spec_read(tmp_path)
    leaves = [hashlib.sha256(b"\x00" + e).digest() for e in read]
    assert size == 70_000 and read == entries
    # The spec's own count: 273 full level-0 tiles, a partial of width 112, one full level-1
    # tile, a partial level-1 tile of width 17, a partial level-2 tile of width 1.
    assert _spec_check_tiles(tmp_path, leaves) == 274 + 2 + 1
    for name in ("tile/0/273.p/112", "tile/1/000", "tile/1/001.p/17", "tile/2/000.p/1", "tile/entries/273.p/112"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "tile/0/274").exists()
    # The root: the level-2 partial tile's one hash is 65536 leaves; fold the rest of the tree onto it.
    level2 = (tmp_path / "tile/2/000.p/1").read_bytes()
    assert tree_root == hashlib.sha256(b"\x01" + level2 + _independent_mth(leaves[65536:])).digest()


def _independent_mth(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + _independent_mth(leaves[:k]) + _independent_mth(leaves[k:])).digest()


def test_a_tree_of_256_is_one_full_tile_and_a_level_1_partial(tmp_path: Path) -> None:
    publish_tiles(tmp_path, build_entries(256), SIGNER)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["checkpoint", "tile/0/000", "tile/1/000.p/1", "tile/entries/000"]


def test_incremental_publishing_equals_publishing_at_once_and_resumes_from_partials(tmp_path: Path) -> None:
    entries = build_entries(1000)
    publish_tiles(tmp_path / "steps", entries, SIGNER, sizes=[1, 255, 256, 300, 513, 1000])
    publish_tiles(tmp_path / "once", entries, SIGNER)
    for p in (tmp_path / "once").rglob("*"):
        if p.is_file() and p.name != "checkpoint":
            assert (tmp_path / "steps" / p.relative_to(tmp_path / "once")).read_bytes() == p.read_bytes()
    resumed = TileWriter.resume(513, lambda path: (tmp_path / "steps" / path).read_bytes())
    fresh = TileWriter()
    fresh.append(entries[:513])
    assert (resumed.size, resumed.levels, resumed.bundle) == (fresh.size, fresh.levels, fresh.bundle)
    assert resumed.append(entries[513:1000]) + resumed.flush() == fresh.append(entries[513:1000]) + fresh.flush()


# -- auditlog verify --tiles ---------------------------------------------------------------------

def _verify(*args: str) -> tuple[int, str, str]:
    result = subprocess.run([sys.executable, "-m", "auditlog", "verify", "--key", VKEY, *args],
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout.strip(), result.stderr


def test_verify_tiles_ok_and_json(tmp_path: Path) -> None:
    publish_tiles(tmp_path, build_entries(700), SIGNER)
    code, out, err = _verify("--tiles", str(tmp_path))
    assert code == 0 and out.startswith("OK size=700 root=") and "verified_from=0" in out, (out, err)
    code, out, _ = _verify("--tiles", str(tmp_path), "--format", "json")
    result = json.loads(out)
    assert code == 0 and result["result"] == "OK" and result["size"] == 700 and result["entries_verified"] == 700


def test_verify_tiles_from_the_start_checks_account_chains(tmp_path: Path) -> None:
    publish_tiles(tmp_path / "ok", build_chained_entries([(1, None), (2, None), (3, None)]), SIGNER)
    assert _verify("--tiles", str(tmp_path / "ok"))[0] == 0
    publish_tiles(tmp_path / "forked", build_chained_entries([(1, None), (2, None), (2, None)]), SIGNER)
    code, out, _ = _verify("--tiles", str(tmp_path / "forked"))
    assert (code, out) == (1, "FAIL entry 2: account chain: account_seq is 2, expected 3 (the account's chain "
                              "forks or skips here)")


def test_incremental_verify_continues_the_account_chains_from_the_state(tmp_path: Path) -> None:
    """An account's chain forked after the remembered size is found by the incremental run too."""
    state = tmp_path / "state.json"
    good = build_chained_entries([(1, None), (2, None), (3, None)])
    publish_tiles(tmp_path / "log", good, SIGNER)
    assert _verify("--tiles", str(tmp_path / "log"), "--state", str(state))[0] == 0
    assert json.loads(state.read_text())["account_chains"]["heads"] == {"acct_x": [3, entry_hash(good[2])]}
    # The log goes on with a fourth entry that reuses account_seq 3: a fork of acct_x's chain.
    forked = build_chained_entries([(1, None), (2, None), (3, None), (3, None)])
    publish_tiles(tmp_path / "log", forked, SIGNER)
    code, out, _ = _verify("--tiles", str(tmp_path / "log"), "--state", str(state))
    assert (code, out) == (1, "FAIL entry 3: account chain: account_seq is 3, expected 4 (the account's chain "
                              "forks or skips here)")
    assert json.loads(state.read_text())["size"] == 3  # a failed run never moves the state
    publish_tiles(tmp_path / "log", build_chained_entries([(1, None), (2, None), (3, None), (4, None)]), SIGNER)
    code, out, _ = _verify("--tiles", str(tmp_path / "log"), "--state", str(state))
    assert code == 0 and "verified_from=3" in out and "account_chains" not in out, out
    assert json.loads(state.read_text())["account_chains"]["heads"]["acct_x"][0] == 4


def test_a_state_file_without_chain_heads_says_the_chains_went_unchecked(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    entries = build_chained_entries([(1, None), (2, None), (2, None)])
    publish_tiles(tmp_path / "log", entries, SIGNER, sizes=[2])
    assert _verify("--tiles", str(tmp_path / "log"), "--state", str(state))[0] == 0
    older = json.loads(state.read_text())
    del older["account_chains"]  # as an auditlog from before they were kept wrote it
    state.write_text(json.dumps(older))
    publish_tiles(tmp_path / "log", entries, SIGNER, sizes=[2, 3])
    code, out, _ = _verify("--tiles", str(tmp_path / "log"), "--state", str(state))
    assert code == 0 and out.endswith("verified_from=2 account_chains=unchecked"), out
    code, out, _ = _verify("--tiles", str(tmp_path / "log"), "--format", "json")  # from entry 0: found
    assert code == 1 and json.loads(out)["where"] == "entry 2", out


def test_incremental_verify_with_state_checks_only_new_entries(tmp_path: Path) -> None:
    entries = build_entries(1500)
    state = tmp_path / "state.json"
    publish_tiles(tmp_path / "log", entries, SIGNER, sizes=[600])
    assert _verify("--tiles", str(tmp_path / "log"), "--state", str(state))[0] == 0
    publish_tiles(tmp_path / "log", entries, SIGNER, sizes=[600, 1500])
    # An old entry rotting on disk is not re-read: only [600, 1500) is.
    (tmp_path / "log" / "tile/entries/000").write_bytes(b"garbage")
    code, out, _ = _verify("--tiles", str(tmp_path / "log"), "--state", str(state), "--format", "json")
    result = json.loads(out)
    assert code == 0 and (result["verified_from"], result["entries_verified"]) == (600, 900), out
    assert json.loads(state.read_text())["size"] == 1500


def test_rollback_against_the_state_fails(tmp_path: Path) -> None:
    entries = build_entries(900)
    state = tmp_path / "state.json"
    publish_tiles(tmp_path / "log", entries, SIGNER, sizes=[900])
    assert _verify("--tiles", str(tmp_path / "log"), "--state", str(state))[0] == 0
    (tmp_path / "log" / "checkpoint").write_text(checkpoint_for(entries[:800], SIGNER))  # an older, signed head
    code, out, _ = _verify("--tiles", str(tmp_path / "log"), "--state", str(state))
    assert code == 1 and out.startswith("FAIL checkpoint: rolled back"), out
    assert json.loads(state.read_text())["size"] == 900  # a failed run never moves the state


def test_fork_against_the_state_fails(tmp_path: Path) -> None:
    entries = build_entries(900)
    state = tmp_path / "state.json"
    publish_tiles(tmp_path / "log", entries, SIGNER, sizes=[500])
    assert _verify("--tiles", str(tmp_path / "log"), "--state", str(state))[0] == 0
    # The operator rewrites history (entry 3 gone, the chain re-linked) and signs a longer log.
    forked = build_entries(900)
    forked[3] = forked[3].replace(b"clip.ingest", b"clip.delete")
    from auditlog.entry import entry_hash
    for i in range(4, 900):
        value = json.loads(forked[i])
        value["prev"] = entry_hash(forked[i - 1])
        from auditlog.entry import canonical_json
        forked[i] = canonical_json(value)
    shutil.rmtree(tmp_path / "log")
    publish_tiles(tmp_path / "log", forked, SIGNER)
    code, out, _ = _verify("--tiles", str(tmp_path / "log"), "--state", str(state))
    assert code == 1 and out.startswith("FAIL checkpoint: forked"), out
    assert _verify("--tiles", str(tmp_path / "log"))[0] == 0  # without memory, the fork is self-consistent


def test_edited_entry_in_a_bundle_is_pinpointed(tmp_path: Path) -> None:
    entries = build_entries(600)
    publish_tiles(tmp_path, entries, SIGNER)
    bundle = (tmp_path / "tile/entries/001").read_bytes()
    (tmp_path / "tile/entries/001").write_bytes(bundle.replace(b"c_0300", b"c_9999"))
    code, out, _ = _verify("--tiles", str(tmp_path))
    assert code == 1 and out.startswith("FAIL entry 300:"), out


def test_a_tile_that_does_not_hash_upward_is_named(tmp_path: Path) -> None:
    publish_tiles(tmp_path, build_entries(600), SIGNER)
    level1 = tmp_path / "tile/1/000.p/2"
    level1.write_bytes(bytes(32) + level1.read_bytes()[32:])
    code, out, _ = _verify("--tiles", str(tmp_path))
    assert code == 1 and out.startswith("FAIL tile tile/0/000: does not hash to entry 0"), out


def test_missing_bundle_and_bad_key(tmp_path: Path) -> None:
    publish_tiles(tmp_path, build_entries(300), SIGNER)
    (tmp_path / "tile/entries/001.p/44").unlink()
    code, out, _ = _verify("--tiles", str(tmp_path))
    assert code == 1 and out == "FAIL tile tile/entries/001.p/44: missing", out
    other = NoteSigner.generate(SIGNER.name).verifier.key_string()
    result = subprocess.run([sys.executable, "-m", "auditlog", "verify", "--tiles", str(tmp_path), "--key", other],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "no valid signature by the log key" in result.stdout


def test_a_tiles_location_that_is_no_directory_is_an_error_not_a_failed_log(tmp_path: Path) -> None:
    """A mistyped --tiles path read nothing: exit 2 as for an export directory, not 'FAIL checkpoint' (exit 1)."""
    (tmp_path / "file").write_text("x")
    for location, problem in ((tmp_path / "nowhere", "no such directory"), (tmp_path / "file", "not a directory")):
        code, out, err = _verify("--tiles", str(location))
        assert (code, out, err.strip()) == (2, "", f"ERROR cannot read {location}: {problem}")
    publish_tiles(tmp_path / "log", build_entries(3), SIGNER)
    (tmp_path / "log" / "checkpoint").unlink()  # a published log without its checkpoint is a failure
    assert _verify("--tiles", str(tmp_path / "log"))[:2] == (1, "FAIL checkpoint: no checkpoint at the tiles location")


def test_witness_quorum_and_times_from_tiles(tmp_path: Path) -> None:
    from auditlog.cosignature import CosignatureSigner
    from auditlog.witness import Witness
    entries = build_entries(40)
    w1, w2 = CosignatureSigner.generate("w1.test"), CosignatureSigner.generate("w2.test")
    note = checkpoint_for(entries, SIGNER)
    body = f"old 0\n\n{note}".encode()
    lines = ""
    for i, w in enumerate((w1, w2)):
        witness = Witness.for_log_keys(w, [SIGNER.verifier], tmp_path / f"w{i}", clock=lambda: 1_767_225_600)
        lines += witness.add_checkpoint(body).body.decode()
    publish_tiles(tmp_path / "log", entries, SIGNER, extra_signatures=lines)
    keys = ["--witness", w1.verifier.key_string(), "--witness", w2.verifier.key_string()]
    code, out, _ = _verify("--tiles", str(tmp_path / "log"), *keys, "--quorum", "2")
    assert code == 0 and out.endswith("witnesses=w1.test@2026-01-01T00:00:00Z,w2.test@2026-01-01T00:00:00Z"), out
    publish_tiles(tmp_path / "log", entries, SIGNER, extra_signatures=lines.split("\n")[0] + "\n")
    code, out, _ = _verify("--tiles", str(tmp_path / "log"), *keys, "--quorum", "2")
    assert code == 1 and "1 valid witness cosignatures, the quorum is 2" in out, out


_STATE_EDITS = {
    "heads not an object": lambda s: s["account_chains"].update(heads=[]),
    "heads null": lambda s: s["account_chains"].update(heads=None),
    "account_chains null": lambda s: s.update(account_chains=None),
    "first_chained dropped to null (would skip unchained access entries)":
        lambda s: s["account_chains"].update(first_chained=None),
    "first_chained a float": lambda s: s["account_chains"].update(first_chained=0.5),
    "first_chained beyond size": lambda s: s["account_chains"].update(first_chained=99),
    "head seq a string": lambda s: s["account_chains"]["heads"].update(acct_x=["3", "0" * 64]),
    "head seq beyond size": lambda s: s["account_chains"]["heads"].update(acct_x=[10**40, "0" * 64]),
    "head hash not hex": lambda s: s["account_chains"]["heads"].update(acct_x=[3, "zz"]),
    "size negative": lambda s: s.update(size=-1),
    "size a float": lambda s: s.update(size=2.9),
    "size moved on (root, note kept)": lambda s: s.update(size=2),
    "root edited": lambda s: s.update(root="ab" * 32),
    "root empty": lambda s: s.update(root=""),
    "last_leaf short": lambda s: s.update(last_leaf="00"),
    "checkpoint not signed by the key": lambda s: s.update(checkpoint=s["checkpoint"].replace("\n3\n", "\n4\n")),
    "origin a number": lambda s: s.update(origin=5),
}


@pytest.mark.parametrize("edit", sorted(_STATE_EDITS))
def test_a_tampered_or_malformed_state_file_is_an_error_never_ok(tmp_path: Path, edit: str) -> None:
    """The state file is trusted input: a value `save` would not have written is an ERROR naming the
    file (exit 2), never coerced (int("3"), 2.9 -> 2), never read as a fork of the log, never OK."""
    from auditlog.__main__ import verify_tiles_at
    state = tmp_path / "state.json"
    entries = build_chained_entries([(1, None), (2, None), (3, None), (4, None)])
    publish_tiles(tmp_path / "log", entries, SIGNER, sizes=[3])
    assert verify_tiles_at(str(tmp_path / "log"), VKEY, state=state)[0] == 0
    publish_tiles(tmp_path / "log", entries, SIGNER, sizes=[3, 4])
    saved = json.loads(state.read_text())
    _STATE_EDITS[edit](saved)
    state.write_text(json.dumps(saved))
    code, result = verify_tiles_at(str(tmp_path / "log"), VKEY, state=state)
    assert (code, result["result"]) == (2, "ERROR"), result
    assert str(result["reason"]).startswith(f"the state file {state} is unusable: "), result
    assert json.loads(state.read_text()) == saved  # an unusable state is left for a human to look at


def test_a_state_file_that_is_not_a_state_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    publish_tiles(tmp_path / "log", build_entries(3), SIGNER)
    state = tmp_path / "state.json"
    for text in (b"[" * 100_000 + b"]" * 100_000, b"\xff{", b"[1]", b'{"account_chains": 1}', b"{"):
        state.write_bytes(text)
        code, out, err = _verify("--tiles", str(tmp_path / "log"), "--state", str(state))
        assert code == 2 and err.startswith(f"ERROR the state file {state} is unusable: ") and \
            "Traceback" not in err, (text[:20], out, err)
