"""The clip envelope: round trips, a frozen format vector, and every tamper kind."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from clipstore.envelope import (
    SEGMENT_SIZE_BYTES,
    open_bytes,
    open_clip,
    open_segments,
    seal_bytes,
    seal_clip,
    sealed_size,
)
from clipstore.errors import (
    AccountMismatch,
    ClipIdMismatch,
    EnvelopeError,
    Extended,
    HeaderTampered,
    MalformedHeader,
    Reordered,
    SegmentTampered,
    Truncated,
    UnsupportedFormat,
)

DEK = bytes(range(32))
CLIP, ACCOUNT = "c_test0001", "acct_test"
SEG_CT = SEGMENT_SIZE_BYTES + 16
VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "vectors" / "clip-format" / "v1.json").read_text())["vectors"]


def seal(plaintext: bytes, *, chunk: int = 10_000, **kw: Any) -> bytes:
    chunks = [plaintext[i:i + chunk] for i in range(0, len(plaintext), chunk)]
    return b"".join(seal_clip(kw.pop("dek", DEK), chunks, clip_id=kw.pop("clip_id", CLIP),
                              account_ref=kw.pop("account_ref", ACCOUNT), **kw))


def open_(ciphertext: bytes, *, chunk: int = 7_777, **kw: Any) -> bytes:
    chunks = [ciphertext[i:i + chunk] for i in range(0, len(ciphertext), chunk)]
    return b"".join(open_clip(kw.pop("dek", DEK), chunks, clip_id=kw.pop("clip_id", CLIP),
                              account_ref=kw.pop("account_ref", ACCOUNT)))


def header_len(clip_id: str = CLIP) -> int:
    return 11 + len(clip_id) + 32 + 7 + 16 + 32


@pytest.mark.parametrize("size", [0, 1, SEGMENT_SIZE_BYTES - 1, SEGMENT_SIZE_BYTES, SEGMENT_SIZE_BYTES + 1,
                                  5 * 1024 * 1024])
def test_round_trip_at_segment_boundaries(size: int) -> None:
    plaintext = secrets.token_bytes(size)
    ciphertext = seal(plaintext)
    assert len(ciphertext) == sealed_size(size, clip_id=CLIP)
    assert open_(ciphertext) == plaintext


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([0, 1, SEGMENT_SIZE_BYTES - 1, SEGMENT_SIZE_BYTES, SEGMENT_SIZE_BYTES + 1, 200_000]),
       st.integers(1, 100_000), st.integers(1, 100_000))
def test_round_trip_with_any_chunking(size: int, in_chunk: int, out_chunk: int) -> None:
    plaintext = secrets.token_bytes(size)
    assert open_(seal(plaintext, chunk=in_chunk), chunk=out_chunk) == plaintext


def test_views_of_any_shape_are_sealed_as_their_bytes() -> None:
    """A chunk is read as bytes whatever the view's shape or item size (len() of a 2-D view counts rows)."""
    plaintext = secrets.token_bytes(3 * SEGMENT_SIZE_BYTES + 16)
    rows = memoryview(plaintext[:3 * SEGMENT_SIZE_BYTES]).cast("B", (3 * SEGMENT_SIZE_BYTES // 16, 16))
    sealed = b"".join(seal_clip(DEK, [rows, plaintext[3 * SEGMENT_SIZE_BYTES:]], clip_id=CLIP, account_ref=ACCOUNT))
    assert open_(sealed) == plaintext


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_format_vector_is_stable(vector: dict[str, Any]) -> None:
    fixed = iter([bytes.fromhex(vector["salt"]), bytes.fromhex(vector["nonce_prefix"])])
    ciphertext = b"".join(seal_clip(bytes.fromhex(vector["dek"]), [bytes.fromhex(vector["plaintext"])],
                                    clip_id=vector["clip_id"], account_ref=vector["account_ref"],
                                    segment_size=vector["segment_size"], random_bytes=lambda n: next(fixed)))
    assert ciphertext.hex() == vector["ciphertext"]
    assert b"".join(open_clip(bytes.fromhex(vector["dek"]), [ciphertext], clip_id=vector["clip_id"],
                              account_ref=vector["account_ref"])).hex() == vector["plaintext"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_format_vector_decrypts_by_the_documented_layout_alone(vector: dict[str, Any]) -> None:
    """Re-derive everything from docs/clip-format.md with raw primitives, not envelope.py."""
    ct = bytes.fromhex(vector["ciphertext"])
    magic, version, suite, seg, id_len = struct.unpack(">4sBBIB", ct[:11])
    assert (magic, version, suite, seg) == (b"CLPS", 1, 1, vector["segment_size"])
    o = 11 + id_len
    salt, prefix, tag, commitment = ct[o:o + 32], ct[o + 32:o + 39], ct[o + 39:o + 55], ct[o + 55:o + 87]
    header = ct[:o + 87]
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=b"clipstore/clip/v1").derive(
        bytes.fromhex(vector["dek"]))
    assert hmac.new(okm[32:], b"header\x00" + header[:-32], hashlib.sha256).digest() == commitment
    assert hmac.new(okm[32:], b"account\x00" + vector["account_ref"].encode(), hashlib.sha256).digest()[:16] == tag
    body, plaintext, i = ct[len(header):], b"", 0
    while body:
        segment, body = body[:seg + 16], body[seg + 16:]
        nonce = prefix + struct.pack(">I", i) + (b"\x01" if not body else b"\x00")
        plaintext += AESGCM(okm[:32]).decrypt(nonce, segment, hashlib.sha256(header).digest())
        i += 1
    assert plaintext.hex() == vector["plaintext"]


@pytest.fixture(scope="module")
def three_segments() -> tuple[bytes, bytes]:
    plaintext = secrets.token_bytes(2 * SEGMENT_SIZE_BYTES + 1000)
    return plaintext, seal(plaintext)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


@pytest.mark.parametrize("offset", [6, 12, 30, 60, 90], ids=["segment-size", "clip-id", "salt", "nonce-prefix",
                                                              "commitment"])
def test_tampered_header_is_detected(three_segments: tuple[bytes, bytes], offset: int) -> None:
    with pytest.raises((HeaderTampered, ClipIdMismatch, MalformedHeader)):
        open_(_flip(three_segments[1], offset))


def test_tampered_header_commitment_field(three_segments: tuple[bytes, bytes]) -> None:
    with pytest.raises(HeaderTampered):
        open_(_flip(three_segments[1], header_len() - 1))


def test_bad_magic_and_unknown_version(three_segments: tuple[bytes, bytes]) -> None:
    with pytest.raises(MalformedHeader):
        open_(b"XXXX" + three_segments[1][4:])
    with pytest.raises(UnsupportedFormat):
        open_(three_segments[1][:4] + b"\x02" + three_segments[1][5:])


def test_tampered_segment_is_detected(three_segments: tuple[bytes, bytes]) -> None:
    with pytest.raises(SegmentTampered, match="segment 1"):
        open_(_flip(three_segments[1], header_len() + SEG_CT + 500))


def test_truncated_at_a_segment_boundary(three_segments: tuple[bytes, bytes]) -> None:
    with pytest.raises(Truncated):
        open_(three_segments[1][:header_len() + 2 * SEG_CT])


def test_truncated_inside_a_segment(three_segments: tuple[bytes, bytes]) -> None:
    with pytest.raises(EnvelopeError):
        open_(three_segments[1][:-10])


def test_truncated_to_the_header(three_segments: tuple[bytes, bytes]) -> None:
    with pytest.raises(Truncated):
        open_(three_segments[1][:header_len()])


def test_extended_after_a_full_final_segment() -> None:
    ciphertext = seal(secrets.token_bytes(2 * SEGMENT_SIZE_BYTES))
    with pytest.raises(Extended, match="follows segment 1"):
        open_(ciphertext + secrets.token_bytes(100))


def test_extended_after_a_short_final_segment_still_fails(three_segments: tuple[bytes, bytes]) -> None:
    # The appended bytes merge into the last fixed-size read; the segment no longer authenticates.
    with pytest.raises(SegmentTampered):
        open_(three_segments[1] + secrets.token_bytes(SEG_CT))


def test_reordered_segments(three_segments: tuple[bytes, bytes]) -> None:
    ct, h = three_segments[1], header_len()
    swapped = ct[:h] + ct[h + SEG_CT:h + 2 * SEG_CT] + ct[h:h + SEG_CT] + ct[h + 2 * SEG_CT:]
    with pytest.raises(Reordered, match="position 0 is segment 1"):
        open_(swapped)


def test_moved_to_another_clip_id(three_segments: tuple[bytes, bytes]) -> None:
    with pytest.raises(ClipIdMismatch):
        open_(three_segments[1], clip_id="c_other0001")


def test_moved_to_another_account(three_segments: tuple[bytes, bytes]) -> None:
    with pytest.raises(AccountMismatch):
        open_(three_segments[1], account_ref="acct_other")


def test_wrong_key_fails_the_commitment(three_segments: tuple[bytes, bytes]) -> None:
    with pytest.raises(HeaderTampered):
        open_(three_segments[1], dek=secrets.token_bytes(32))


def test_no_plaintext_is_released_from_a_tampered_segment(three_segments: tuple[bytes, bytes]) -> None:
    plaintext, ct = three_segments
    released = []
    with pytest.raises(SegmentTampered):
        for piece in open_clip(DEK, [_flip(ct, header_len() + 10)], clip_id=CLIP, account_ref=ACCOUNT):
            released.append(piece)
    assert released == []


def test_ranged_decryption_of_any_segment_range(three_segments: tuple[bytes, bytes]) -> None:
    plaintext, ct = three_segments

    def read_at(offset: int, length: int) -> bytes:
        return ct[offset:offset + length]

    for first, stop in [(0, 1), (1, 2), (2, 3), (1, 3), (0, 3), (2, 2)]:
        got = b"".join(open_segments(DEK, read_at, len(ct), clip_id=CLIP, account_ref=ACCOUNT,
                                     first=first, stop=stop))
        assert got == plaintext[first * SEGMENT_SIZE_BYTES:stop * SEGMENT_SIZE_BYTES]
    with pytest.raises(ValueError):
        list(open_segments(DEK, read_at, len(ct), clip_id=CLIP, account_ref=ACCOUNT, first=2, stop=4))


def test_errors_show_callers_one_generic_message(three_segments: tuple[bytes, bytes]) -> None:
    with pytest.raises(EnvelopeError) as caught:
        open_(three_segments[1], account_ref="acct_other")
    assert caught.value.message == ("the clip failed its integrity check and was not returned; "
                                    "the event was recorded")
    assert caught.value.reason == "CLIP_INTEGRITY" and caught.value.tamper == "account_mismatch"


@pytest.mark.parametrize("size", [0, 1, SEGMENT_SIZE_BYTES - 1, SEGMENT_SIZE_BYTES, SEGMENT_SIZE_BYTES + 1,
                                  5 * 1024 * 1024])
def test_one_shot_seal_and_open_match_the_streaming_format(size: int) -> None:
    plaintext = secrets.token_bytes(size)
    fixed = secrets.token_bytes(39)

    def rnd() -> Any:
        parts = iter([fixed[:32], fixed[32:]])
        return lambda n: next(parts)

    streamed = seal(plaintext, random_bytes=rnd())
    one_shot = seal_bytes(DEK, plaintext, clip_id=CLIP, account_ref=ACCOUNT, random_bytes=rnd())
    assert bytes(one_shot) == streamed
    assert open_bytes(DEK, streamed, clip_id=CLIP, account_ref=ACCOUNT) == plaintext


@pytest.mark.parametrize("chunk", [SEGMENT_SIZE_BYTES, 2 * SEGMENT_SIZE_BYTES, SEGMENT_SIZE_BYTES + 1])
@pytest.mark.parametrize("kind", ["bytes", "one reused bytearray"])
def test_streamed_sealing_of_whole_segment_chunks_matches_one_shot(chunk: int, kind: str) -> None:
    # Whole segments of immutable chunks are sealed from views held across chunks; a caller that
    # refills one mutable buffer (a readinto loop) must still get exactly what it sent sealed.
    plaintext = secrets.token_bytes(3 * chunk)
    fixed = secrets.token_bytes(39)

    def chunks() -> Any:
        buffer = bytearray(chunk)
        for i in range(0, len(plaintext), chunk):
            if kind == "bytes":
                yield plaintext[i:i + chunk]
            else:
                buffer[:] = plaintext[i:i + chunk]
                yield buffer

    parts = iter([fixed[:32], fixed[32:]])
    streamed = b"".join(seal_clip(DEK, chunks(), clip_id=CLIP, account_ref=ACCOUNT, random_bytes=lambda n: next(parts)))
    parts = iter([fixed[:32], fixed[32:]])
    assert streamed == bytes(seal_bytes(DEK, plaintext, clip_id=CLIP, account_ref=ACCOUNT,
                                        random_bytes=lambda n: next(parts)))
    assert open_(streamed, chunk=SEG_CT) == plaintext


def _swap01(ct: bytes) -> bytes:
    h = header_len()
    return ct[:h] + ct[h + SEG_CT:h + 2 * SEG_CT] + ct[h:h + SEG_CT] + ct[h + 2 * SEG_CT:]


TAMPERS = {
    "header": lambda ct: _flip(ct, header_len() - 1),
    "segment": lambda ct: _flip(ct, header_len() + SEG_CT + 500),
    "truncated-at-boundary": lambda ct: ct[:header_len() + 2 * SEG_CT],
    "truncated-inside": lambda ct: ct[:-10],
    "reordered": _swap01,
    "bad-magic": lambda ct: b"XXXX" + ct[4:],
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_one_shot_and_streaming_raise_the_same_error(three_segments: tuple[bytes, bytes], name: str) -> None:
    tampered = TAMPERS[name](three_segments[1])
    with pytest.raises(EnvelopeError) as streamed:
        open_(tampered)
    with pytest.raises(EnvelopeError) as one_shot:
        open_bytes(DEK, tampered, clip_id=CLIP, account_ref=ACCOUNT)
    assert type(one_shot.value) is type(streamed.value)


def test_one_shot_checks_clip_and_account(three_segments: tuple[bytes, bytes]) -> None:
    with pytest.raises(ClipIdMismatch):
        open_bytes(DEK, three_segments[1], clip_id="c_other", account_ref=ACCOUNT)
    with pytest.raises(AccountMismatch):
        open_bytes(DEK, three_segments[1], clip_id=CLIP, account_ref="acct_other")


# -- seal_clip holds views of the caller's chunks: any mix of buffers, cut anywhere --------------------------
_CUTS = st.one_of(st.just(0), st.sampled_from([1, SEGMENT_SIZE_BYTES - 1, SEGMENT_SIZE_BYTES, SEGMENT_SIZE_BYTES + 1,
                                               2 * SEGMENT_SIZE_BYTES]), st.integers(1, 3 * SEGMENT_SIZE_BYTES))
_KINDS = ["bytes", "bytearray", "view of bytes", "view of bytearray", "reused bytearray", "view of a bytes slice",
          "released view of bytes", "numpy uint8", "numpy int16 where even"]


def _as(kind: str, piece: bytes, reused: bytearray) -> Any:
    """`piece` as the caller's buffer of `kind`; a mutable one is scribbled over once the envelope asks for more."""
    import numpy as np
    if kind == "bytes":
        return piece
    if kind == "bytearray":
        return bytearray(piece)
    if kind in ("view of bytes", "released view of bytes"):
        return memoryview(piece)
    if kind == "view of bytearray":
        return memoryview(bytearray(piece))
    if kind == "reused bytearray":
        reused[:] = piece
        return reused
    if kind == "view of a bytes slice":
        return memoryview(b"\xee" + piece + b"\xee")[1:-1]
    if kind == "numpy uint8":
        return np.frombuffer(piece, dtype=np.uint8).copy()
    return np.frombuffer(piece, dtype=np.int16).copy() if len(piece) % 2 == 0 else bytearray(piece)


def _scribble(buffer: Any, kind: str) -> None:
    if kind == "released view of bytes":
        buffer.release()  # the caller is done with its view; the envelope's own views keep the bytes alive
    elif not isinstance(buffer, bytes) and not (isinstance(buffer, memoryview) and isinstance(buffer.obj, bytes)):
        memoryview(buffer).cast("B")[:] = b"\xaa" * memoryview(buffer).nbytes


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([0, 1, SEGMENT_SIZE_BYTES - 1, SEGMENT_SIZE_BYTES, SEGMENT_SIZE_BYTES + 1,
                        2 * SEGMENT_SIZE_BYTES, 3 * SEGMENT_SIZE_BYTES + 7]),
       st.lists(st.tuples(_CUTS, st.sampled_from(_KINDS)), max_size=12), st.sampled_from(_KINDS), st.data())
def test_streamed_sealing_of_any_buffers_cut_anywhere_is_the_one_shot_sealing(
        size: int, cuts: list[tuple[int, str]], last_kind: str, data: st.DataObject) -> None:
    """Whatever the chunks' types and sizes (empty, a segment, a segment +-1), and though the caller reuses,
    scribbles over or releases each buffer once the envelope asks for the next, the sealed stream is exactly
    `seal_bytes` of the same bytes under the same salt and nonce prefix, read lazily as a server sends it."""
    plaintext = data.draw(st.binary(min_size=size, max_size=size)) if size < 64 else secrets.token_bytes(size)
    fixed = secrets.token_bytes(39)
    reused = bytearray()

    def chunks() -> Any:
        pos = 0
        for cut, kind in [*cuts, (len(plaintext), last_kind)]:
            piece = plaintext[pos:pos + cut]
            pos += len(piece)
            buffer = _as(kind, piece, reused)
            yield buffer
            _scribble(buffer, kind)

    parts = iter([fixed[:32], fixed[32:]])
    streamed = b"".join(bytes(out) for out in seal_clip(DEK, chunks(), clip_id=CLIP, account_ref=ACCOUNT,
                                                        random_bytes=lambda n: next(parts)))
    parts = iter([fixed[:32], fixed[32:]])
    assert streamed == bytes(seal_bytes(DEK, plaintext, clip_id=CLIP, account_ref=ACCOUNT,
                                        random_bytes=lambda n: next(parts)))
    assert open_(streamed) == plaintext


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32), st.text(max_size=80),
       st.binary(max_size=300))
def test_the_header_macs_are_hmac_sha256_under_the_hkdf_mac_key_however_often_the_key_is_used(
        dek: bytes, salt: bytes, account_ref: str, header: bytes) -> None:
    from clipstore.envelope import _Keys
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=b"clipstore/clip/v1").derive(dek)
    keys = _Keys(dek, salt)
    for _ in range(2):  # each use starts from the keyed state: a copy, never the state itself
        assert keys.commitment(header) == hmac.new(okm[32:], b"header\x00" + header, hashlib.sha256).digest()
        assert keys.account_tag(account_ref) == hmac.new(okm[32:], b"account\x00" + account_ref.encode(),
                                                         hashlib.sha256).digest()[:16]
