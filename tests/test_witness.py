"""C2SP tlog-witness / tlog-cosignature: our witness and cosignature code against the spec,
other implementations' requests and real witnesses' cosignatures."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from auditlog.checkpoint import Checkpoint, sign_checkpoint
from auditlog.cosignature import (
    Cosignature,
    CosignatureSigner,
    CosignatureVerifier,
    cosigned_message,
    open_cosigned_checkpoint,
)
from auditlog.errors import CheckpointError, NoteError
from auditlog.merkle import consistency_proof, leaf_hash, root_hash
from auditlog.note import NoteSigner, NoteVerifier, _key_hash, sign_note
from auditlog.witness import SIZE_CONTENT_TYPE, Witness, WitnessServer, _parse_request

VECTORS = Path(__file__).parent / "vectors"
NOW = 1_767_000_000
LOG = NoteSigner.generate("clipstore-audit/witness-test")
LEAVES = [leaf_hash(f"entry {i}".encode()) for i in range(64)]


def _checkpoint(size: int, signer: NoteSigner = LOG, leaves: list[bytes] = LEAVES) -> str:
    return sign_checkpoint(Checkpoint(origin=signer.name, size=size, root=root_hash(leaves[:size])), signer)


def _request(old: int, note: str, proof: list[bytes] | None = None) -> bytes:
    lines = [f"old {old}", *(base64.b64encode(h).decode() for h in (proof or []))]
    return ("\n".join(lines) + "\n\n" + note).encode()


def _add(old: int, new: int, leaves: list[bytes] = LEAVES) -> bytes:
    proof = consistency_proof(leaves[:new], old) if old else []
    return _request(old, _checkpoint(new, leaves=leaves), proof)


@pytest.fixture
def witness(tmp_path: Path) -> Witness:
    return Witness.for_log_keys(CosignatureSigner.generate("witness.test/w1"), [LOG.verifier], tmp_path / "state",
                                clock=lambda: NOW)


@pytest.fixture
def server(witness: Witness) -> Iterator[WitnessServer]:
    with WitnessServer(("127.0.0.1", 0), witness, quiet=True) as srv:
        yield srv


def _post(server: WitnessServer, body: bytes, path: str = "/add-checkpoint") -> tuple[int, str, bytes]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), port, timeout=30)
    try:
        conn.request("POST", path, body=body)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


# -- tlog-cosignature -----------------------------------------------------------------------

def test_cosigned_message_is_byte_for_byte_the_spec_example() -> None:
    ex = json.loads((VECTORS / "c2sp" / "examples.json").read_text())
    body = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    assert cosigned_message(body, ex["cosignature_example_time"]) == ex["cosigned_message_example"].encode()


def test_spec_example_cosignature_line_carries_key_id_and_timestamp() -> None:
    ex = json.loads((VECTORS / "c2sp" / "examples.json").read_text())
    name, b64 = ex["cosignature_example_line"][2:-1].split(" ")
    blob = base64.b64decode(b64)
    assert name == "witness.example.com/w1" and len(blob) == 4 + 72
    assert CosignatureVerifier.timestamp(blob[4:]) == ex["cosignature_example_time"]


def test_our_cosignature_line_has_the_spec_layout() -> None:
    signer = CosignatureSigner.generate("witness.example/w1")
    text = _checkpoint(5).split("\n\n")[0] + "\n"
    line = signer.cosign(text, 1679315147)
    name, b64 = line.removeprefix("\u2014 ").removesuffix("\n").split(" ")
    blob = base64.b64decode(b64)
    raw = signer.verifier.public_key.public_bytes_raw()
    assert name == "witness.example/w1" and line.endswith("\n")
    assert blob[:4] == hashlib.sha256(b"witness.example/w1\n\x04" + raw).digest()[:4]  # key ID from 0x04
    assert struct.unpack(">Q", blob[4:12])[0] == 1679315147
    signer.verifier.public_key.verify(blob[12:], b"cosignature/v1\ntime 1679315147\n" + text.encode())
    assert signer.verifier.key_string().split("+", 2)[2] == base64.b64encode(b"\x04" + raw).decode()
    assert CosignatureVerifier.from_key_string(signer.verifier.key_string()) == signer.verifier
    assert CosignatureSigner.from_key_string(signer.key_string()).verifier == signer.verifier


def _sigsum_note() -> tuple[str, NoteVerifier, list[CosignatureVerifier], dict[str, int]]:
    """The real Sigsum tree head as a C2SP note: log signature plus nine witness cosignatures."""
    proof = json.loads((VECTORS / "sigsum-barreleye" / "proof.json").read_text())
    origin = f"sigsum.org/v1/tree/{proof['log_key_hash']}"
    log_pub = bytes.fromhex(proof["log_public_key"])
    log = NoteVerifier(origin, _key_hash(origin, b"\x01" + log_pub), Ed25519PublicKey.from_public_bytes(log_pub))
    text = f"{origin}\n{proof['size']}\n{base64.b64encode(bytes.fromhex(proof['root_hash'])).decode()}\n"
    log_sig = struct.pack(">I", log.key_hash) + bytes.fromhex(proof["log_signature"])
    lines = [f"\u2014 {origin} {base64.b64encode(log_sig).decode()}"]
    witnesses = {hashlib.sha256(bytes.fromhex(w["public_key"])).hexdigest(): w for w in proof["witnesses"]}
    verifiers, times = [], {}
    for cosig in proof["cosignatures"]:
        w = witnesses.get(cosig["witness_key_hash"])
        name = w["name"] if w else "unlisted.example/witness"
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(w["public_key"])) if w else \
            Ed25519PrivateKey.generate().public_key()
        verifier = CosignatureVerifier.from_public_key(name, pub)
        blob = struct.pack(">IQ", verifier.key_hash, cosig["timestamp"]) + bytes.fromhex(cosig["signature"])
        lines.append(f"\u2014 {name} {base64.b64encode(blob).decode()}")
        if w:
            verifiers.append(verifier)
            times[name] = cosig["timestamp"]
    return text + "\n" + "".join(line + "\n" for line in lines), log, verifiers, times


def test_real_witnesses_cosignatures_verify_and_their_times_are_reported() -> None:
    note, log, witnesses, times = _sigsum_note()
    checkpoint, cosigs = open_cosigned_checkpoint(note, log, witnesses, quorum=len(witnesses))
    assert checkpoint.size == 17157 and len(witnesses) == 8
    assert sorted(cosigs, key=lambda c: c.witness) == [Cosignature(n, times[n]) for n in sorted(times)]


def test_a_cosignature_over_other_bytes_is_rejected() -> None:
    note, log, witnesses, _ = _sigsum_note()
    name = witnesses[0].name
    lines = note.split("\n")
    i = next(i for i, line in enumerate(lines) if line.startswith(f"\u2014 {name} "))
    blob = bytearray(base64.b64decode(lines[i].split(" ")[2]))
    blob[11] ^= 1  # the timestamp: the signed message changes
    lines[i] = f"\u2014 {name} {base64.b64encode(bytes(blob)).decode()}"
    with pytest.raises(NoteError, match="invalid signature"):
        open_cosigned_checkpoint("\n".join(lines), log, witnesses, quorum=1)


def test_quorum_counts_distinct_configured_witnesses_only() -> None:
    note, log, witnesses, _ = _sigsum_note()
    stranger = CosignatureVerifier.from_public_key("witness.stranger", Ed25519PrivateKey.generate().public_key())
    with pytest.raises(CheckpointError, match="2 valid witness cosignatures, the quorum is 3"):
        open_cosigned_checkpoint(note, log, [*witnesses[:2], stranger], quorum=3)
    with pytest.raises(ValueError, match="quorum"):
        open_cosigned_checkpoint(note, log, witnesses[:2], quorum=3)


def test_note_without_the_log_signature_is_rejected_whatever_the_cosignatures() -> None:
    note, _, witnesses, _ = _sigsum_note()
    impostor = NoteSigner.generate(note.split("\n")[0]).verifier
    with pytest.raises(NoteError, match="no valid signature by the log key"):
        open_cosigned_checkpoint(note, impostor, witnesses, quorum=1)


# -- tlog-witness over HTTP ------------------------------------------------------------------

def test_first_checkpoint_is_cosigned_and_the_cosignature_verifies(server: WitnessServer, witness: Witness) -> None:
    status, ctype, body = _post(server, _add(0, 10))
    assert status == 200 and body.startswith("\u2014 witness.test/w1 ".encode()) and body.endswith(b"\n")
    note = _checkpoint(10) + body.decode()  # the spec: concatenate and open as a note
    checkpoint, cosigs = open_cosigned_checkpoint(note, LOG.verifier, [witness.signer.verifier], quorum=1)
    assert checkpoint.size == 10 and cosigs == [Cosignature("witness.test/w1", NOW)]


def test_extension_from_the_cosigned_size_is_cosigned(server: WitnessServer) -> None:
    assert _post(server, _add(0, 10))[0] == 200
    assert _post(server, _add(10, 37))[0] == 200
    assert _post(server, _add(37, 37))[0] == 200  # the same checkpoint again


def test_unknown_origin_is_404(server: WitnessServer) -> None:
    other = NoteSigner.generate("someone-else/log")
    assert _post(server, _request(0, _checkpoint(3, other)))[0] == 404


def test_checkpoint_without_a_trusted_signature_is_403(server: WitnessServer) -> None:
    impostor = NoteSigner.generate(LOG.name)  # same origin, another key
    assert _post(server, _request(0, _checkpoint(3, impostor)))[0] == 403


def test_old_size_above_the_checkpoint_size_is_400(server: WitnessServer) -> None:
    assert _post(server, _request(12, _checkpoint(10)))[0] == 400


@pytest.mark.parametrize("body", [
    b"old 05\n\n", b"old -1\n\n", b"old 1\nnot base64!\n\n", b"old 1\n" + base64.b64encode(b"x" * 31) + b"\n\n",
    b"no old line\n\n", b"old 0\n", b"\xff\xfe",
    b"old 0\n" + b"KgEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n" * 64 + b"\n",
], ids=["leading-zero", "negative", "bad-base64", "short-hash", "no-old", "no-blank-line", "not-utf8",
        "64-proof-lines"])
def test_malformed_requests_are_400(server: WitnessServer, body: bytes) -> None:
    status, _, _ = _post(server, body + _checkpoint(3).encode() if body.endswith(b"\n\n") else body)
    assert status == 400


@pytest.mark.parametrize("size_line", ["\u00b2", "\u0661\u0662"], ids=["superscript-two", "arabic-indic-12"])
def test_checkpoint_size_in_non_ascii_digits_is_400(server: WitnessServer, witness: Witness, size_line: str) -> None:
    """Before, '²' passed str.isdigit() and int() raised: the handler died without an answer (anyone could
    send it: the framing is read before any signature); '١٢' was taken as size 12 and cosigned. Go's
    parsers (strconv) refuse both: tests/vectors/golang-sumdb-note-interop."""
    text = f"{LOG.name}\n{size_line}\n{base64.b64encode(root_hash(LEAVES[:12])).decode()}\n"
    status, _, body = _post(server, _request(0, sign_note(text, LOG)))
    assert (status, witness.cosigned_size(LOG.name)) == (400, 0), body


def test_content_length_in_non_ascii_digits_is_400(server: WitnessServer) -> None:
    host, port = server.server_address[:2]
    with socket.create_connection((str(host), port), timeout=30) as sock:
        sock.sendall(b"POST /add-checkpoint HTTP/1.1\r\nHost: w\r\nContent-Length: \xb2\r\n\r\nxx")
        assert sock.recv(64).startswith(b"HTTP/1.1 400 ")


def test_old_size_other_than_the_cosigned_one_is_409_with_the_size(server: WitnessServer) -> None:
    assert _post(server, _add(0, 10))[0] == 200
    status, ctype, body = _post(server, _add(5, 20))
    assert (status, ctype, body) == (409, SIZE_CONTENT_TYPE, b"10\n")
    status, ctype, body = _post(server, _add(0, 20))
    assert (status, ctype, body) == (409, SIZE_CONTENT_TYPE, b"10\n")


def test_same_size_with_another_root_is_409(server: WitnessServer) -> None:
    assert _post(server, _add(0, 10))[0] == 200
    forked = [leaf_hash(b"forged"), *LEAVES[1:]]
    status, ctype, body = _post(server, _request(10, _checkpoint(10, leaves=forked)))
    assert (status, ctype, body) == (409, SIZE_CONTENT_TYPE, b"10\n")


def test_bad_consistency_proof_is_422_and_nothing_changes(server: WitnessServer, witness: Witness) -> None:
    assert _post(server, _add(0, 10))[0] == 200
    forked = [*LEAVES[:3], leaf_hash(b"rewritten"), *LEAVES[4:]]  # a fork that rewrites entry 3
    assert _post(server, _add(10, 20, leaves=forked))[0] == 422
    assert _post(server, _request(10, _checkpoint(20), [LEAVES[0]]))[0] == 422  # a wrong proof
    assert _post(server, _add(0, 10))[0] == 409
    assert witness.cosigned_size(LOG.name) == 10


def test_nonempty_proof_from_zero_or_between_equal_sizes_is_422(server: WitnessServer) -> None:
    assert _post(server, _request(0, _checkpoint(4), [LEAVES[0]]))[0] == 422
    assert _post(server, _add(0, 4))[0] == 200
    assert _post(server, _request(4, _checkpoint(4), [LEAVES[0]]))[0] == 422


def test_wrong_path_and_method(server: WitnessServer) -> None:
    assert _post(server, _add(0, 3), path="/other")[0] == 404
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), port, timeout=30)
    conn.request("GET", "/add-checkpoint")
    assert conn.getresponse().status == 405
    conn.close()


def test_state_survives_a_restart(tmp_path: Path, witness: Witness) -> None:
    assert witness.add_checkpoint(_add(0, 10)).status == 200
    again = Witness.for_log_keys(witness.signer, [LOG.verifier], tmp_path / "state")
    assert again.add_checkpoint(_add(0, 20)).body == b"10\n"
    assert again.add_checkpoint(_add(10, 20)).status == 200
    assert oct((tmp_path / "state").stat().st_mode & 0o777) == "0o600"


def test_24_concurrent_submissions_cosign_exactly_one_and_never_roll_back(server: WitnessServer,
                                                                         witness: Witness) -> None:
    assert _post(server, _add(0, 10))[0] == 200
    barrier = threading.Barrier(24)
    results: dict[int, int] = {}

    def submit(new: int) -> None:
        body = _add(10, new)
        barrier.wait()
        results[new] = _post(server, body)[0]

    threads = [threading.Thread(target=submit, args=(11 + i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [size for size, status in results.items() if status == 200]
    assert len(winners) == 1 and sorted(results.values()) == [200] + [409] * 23, results
    assert witness.cosigned_size(LOG.name) == winners[0]
    assert Witness.for_log_keys(witness.signer, [LOG.verifier], witness._state._path).cosigned_size(LOG.name) \
        == winners[0]  # what is on disk is what was cosigned


# -- requests produced by other implementations ---------------------------------------------

def test_requests_from_litewitness_tests_get_litewitness_answers(tmp_path: Path) -> None:
    vec = json.loads((VECTORS / "filippo-torchwood" / "add-checkpoint.json").read_text(encoding="utf-8"))
    log = NoteVerifier(vec["log_origin"], _key_hash(vec["log_origin"], b"\x01" + bytes.fromhex(vec["log_public_key"])),
                       Ed25519PublicKey.from_public_bytes(bytes.fromhex(vec["log_public_key"])))
    seed = bytes.fromhex(vec["witness_private_key"])[:32]
    signer = CosignatureSigner(vec["witness_name"], Ed25519PrivateKey.from_private_bytes(seed))
    witness = Witness.for_log_keys(signer, [log], tmp_path / "state", clock=lambda: NOW)
    by_name = {r["name"]: r for r in vec["requests"]}
    for name in ("64 proof lines", "first checkpoint, old 0", "size 5 from 1", "size 3 from 1 (loses the race)"):
        request = by_name[name]
        assert witness.cosigned_size(log.name) == request["stored_size_before"], name
        answer = witness.add_checkpoint(request["body"].encode())
        assert answer.status == request["status"], (name, answer)
        if answer.status == 200:
            note = request["body"].split("\n\n", 1)[1] + answer.body.decode()
            open_cosigned_checkpoint(note, log, [signer.verifier], quorum=1)
    assert witness._state.logs[log.name] == (vec["final_size"], bytes.fromhex(vec["final_root_hex"]))


def test_checkpoints_from_transparency_dev_witness_tests(tmp_path: Path) -> None:
    vec = json.loads((VECTORS / "transparency-dev-witness" / "witness_test.json").read_text(encoding="utf-8"))
    monkeys = NoteVerifier.from_key_string(vec["log_vkey"])
    skey = base64.b64decode(vec["witness_skey"].split("+", 4)[4])
    signer = CosignatureSigner("witness", Ed25519PrivateKey.from_private_bytes(skey[1:]))
    assert signer.verifier.public_key.public_bytes_raw() == base64.b64decode(vec["witness_vkey"].split("+", 2)[2])[1:]
    witness = Witness(signer, {vec["origin"]: [monkeys]}, tmp_path / "state", clock=lambda: NOW)
    proof = [bytes.fromhex(h) for h in vec["consistency_proof_5_8"]]
    assert witness.add_checkpoint(_request(0, vec["init_signed_by_other_log"])).status == 403
    assert witness.add_checkpoint(_request(0, vec["init"])).status == 200
    assert witness.add_checkpoint(_request(5, vec["next_with_changed_origin"], proof)).status == 404
    assert witness.add_checkpoint(_request(5, vec["next"], proof[:3])).status == 422
    answer = witness.add_checkpoint(_request(5, vec["next"], proof))
    assert answer.status == 200
    cosigs = _open_foreign_origin(vec["next"] + answer.body.decode(), monkeys, signer.verifier)
    assert cosigs == [Cosignature("witness", NOW)]


def _open_foreign_origin(note: str, log: NoteVerifier, witness: CosignatureVerifier) -> list[Cosignature]:
    """That test log's origin differs from its key name: check the signatures, not the origin rule."""
    from auditlog.note import verify_note
    _, verified = verify_note(note, [log, witness])
    assert [v.name for v, _ in verified] == [log.name, witness.name]
    return [Cosignature(witness.name, CosignatureVerifier.timestamp(sig)) for v, sig in verified if v is witness]


def test_spec_example_request_parses_and_is_404_for_a_witness_that_does_not_know_the_log(
        witness: Witness) -> None:
    ex = json.loads((VECTORS / "c2sp" / "examples.json").read_text(encoding="utf-8"))
    parsed = _parse_request(ex["add_checkpoint_request"].encode())
    assert parsed is not None
    old, proof, note = parsed
    assert old == 20852014 and len(proof) == 4 and note.startswith("example.com/behind-the-sofa\n20852163\n")
    assert witness.add_checkpoint(ex["add_checkpoint_request"].encode()).status == 404
    from auditlog.note import verify_note
    response_lines = ex["add_checkpoint_response"]
    _, none = verify_note(note.split("\n\n")[0] + "\n\n" + response_lines, [])
    assert none == []  # well-formed signature lines (framing), from keys we do not hold


# -- the CLI --------------------------------------------------------------------------------

def test_witness_keygen_and_serve_from_the_command_line(tmp_path: Path) -> None:
    keygen = subprocess.run([sys.executable, "-m", "auditlog", "witness", "keygen", "--name", "w.test/cli",
                             "--key-file", str(tmp_path / "w.key")], capture_output=True, text=True, timeout=60)
    assert keygen.returncode == 0, keygen.stderr
    vkey = CosignatureVerifier.from_key_string(keygen.stdout.strip())
    assert oct((tmp_path / "w.key").stat().st_mode & 0o777) == "0o600"
    again = subprocess.run([sys.executable, "-m", "auditlog", "witness", "keygen", "--name", "w.test/cli",
                            "--key-file", str(tmp_path / "w.key")], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "never overwritten" in again.stderr
    proc = subprocess.Popen([sys.executable, "-m", "auditlog", "witness", "serve", "--key-file",
                             str(tmp_path / "w.key"), "--state", str(tmp_path / "state"), "--log",
                             LOG.verifier.key_string(), "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip().rsplit(" ", 1)[-1]
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/add-checkpoint", body=_add(0, 7))
        response = conn.getresponse()
        body = response.read().decode()
        conn.close()
        assert response.status == 200
        open_cosigned_checkpoint(_checkpoint(7) + body, LOG.verifier, [vkey], quorum=1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
