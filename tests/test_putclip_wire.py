"""PutClip's request parser hands audio chunks on as views of the message, and decides every message as
protobuf would: the fast path is only a shortcut, never a second reading of the wire format."""

from __future__ import annotations

import secrets

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from clipstore.envelope import seal_clip
from clipstore.servicers.clips import parse_put_clip_request
from clipstore.v1 import clip_pb2


def _as_protobuf_reads(raw: bytes) -> clip_pb2.PutClipRequest | type[DecodeError]:
    try:
        return clip_pb2.PutClipRequest.FromString(raw)
    except DecodeError:
        return DecodeError


def _same_as_protobuf(raw: bytes) -> None:
    expected = _as_protobuf_reads(raw)
    if expected is DecodeError:
        with pytest.raises(DecodeError):
            parse_put_clip_request(raw)
        return
    got = parse_put_clip_request(raw)
    if isinstance(got, memoryview):
        assert isinstance(expected, clip_pb2.PutClipRequest)
        assert expected.WhichOneof("part") == "audio_chunk"
        assert got.readonly and got.obj is raw  # a view of the message, not a copy
        assert bytes(got) == expected.audio_chunk
    else:
        assert got == expected


@pytest.mark.parametrize("size", [1, 127, 128, 16383, 16384, 64 * 1024, (1 << 20) + 1])
def test_an_audio_chunk_message_comes_back_as_a_view_of_the_chunk(size: int) -> None:
    chunk = secrets.token_bytes(size)
    raw = clip_pb2.PutClipRequest(audio_chunk=chunk).SerializeToString()
    got = parse_put_clip_request(raw)
    assert isinstance(got, memoryview) and got == chunk and got.obj is raw


def test_metadata_trailer_and_an_empty_chunk_are_protobuf_messages() -> None:
    for message in (clip_pb2.PutClipRequest(metadata=clip_pb2.ClipMetadata(locale="en-US")),
                    clip_pb2.PutClipRequest(trailer=clip_pb2.ClipTrailer(size_bytes=3, sha256=b"x" * 32)),
                    clip_pb2.PutClipRequest(audio_chunk=b"")):
        got = parse_put_clip_request(message.SerializeToString())
        assert isinstance(got, clip_pb2.PutClipRequest) and got == message


def test_a_chunk_followed_by_another_field_is_read_as_protobuf_reads_it() -> None:
    chunk = clip_pb2.PutClipRequest(audio_chunk=b"audio").SerializeToString()
    trailer = clip_pb2.PutClipRequest(trailer=clip_pb2.ClipTrailer(size_bytes=5)).SerializeToString()
    for raw in (chunk + trailer, chunk + chunk, trailer + chunk):
        _same_as_protobuf(raw)
    got = parse_put_clip_request(chunk + trailer)
    assert isinstance(got, clip_pb2.PutClipRequest) and got.WhichOneof("part") == "trailer"


@pytest.mark.parametrize("raw", [
    b"\x12\x85\x00abcde",  # length 5 as a two-byte varint (not minimal, still valid protobuf)
    b"\x12\x85\x80\x80\x80\x00abcde",  # as five bytes: the most upb reads for a length
    b"\x12\x85\x80\x80\x80\x80\x00abcde",  # as six: corrupt to upb
    b"\x12\x06abcde",  # length past the end
    b"\x12\x04abcde",  # a byte after the chunk that is no field
    b"\x12" + b"\xff" * 11 + b"a",  # a length varint longer than protobuf allows
    b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01a",  # ten bytes, a value past 2**63
])
def test_odd_lengths_are_decided_as_protobuf_decides_them(raw: bytes) -> None:
    _same_as_protobuf(raw)


@given(st.one_of(
    st.binary(max_size=300).map(lambda b: clip_pb2.PutClipRequest(audio_chunk=b).SerializeToString()),
    st.binary(max_size=40).map(lambda b: b"\x12" + b),
    st.binary(max_size=40)))
def test_any_message_is_read_as_protobuf_reads_it(raw: bytes) -> None:
    _same_as_protobuf(raw)


def test_sealing_a_view_of_bytes_seals_the_same_clip_as_the_bytes() -> None:
    audio = secrets.token_bytes(3 * 64 * 1024 + 100)

    def sealed(chunks: list[bytes] | list[memoryview] | list[bytearray]) -> bytes:
        return b"".join(seal_clip(b"k" * 32, chunks, clip_id="c_1", account_ref="acct_1",
                                  random_bytes=lambda n: b"r" * n))

    pieces = [audio[:100], audio[100:2 * 64 * 1024 + 100], audio[2 * 64 * 1024 + 100:]]
    expected = sealed(pieces)
    assert sealed([memoryview(p) for p in pieces]) == expected
    assert sealed([bytearray(p) for p in pieces]) == expected
    whole = memoryview(clip_pb2.PutClipRequest(audio_chunk=audio).SerializeToString())
    assert sealed([whole[len(whole) - len(audio):]]) == sealed([audio])
