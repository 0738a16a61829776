"""PutClip's request parser hands audio chunks on as views of the message, and decides every message as
protobuf would: the fast path is only a shortcut, never a second reading of the wire format."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from clipstore.envelope import seal_clip
from clipstore.server import ClipstoreServer, running_server
from clipstore.servicers.clips import PUT_CLIP_METHOD, parse_put_clip_request
from clipstore.v1 import clip_pb2
from tests.clip_helpers import metadata, trailer
from tests.conftest import bearer, make_config, new_key
from tests.grpc_helpers import error_info


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


# -- through a real server: hand-made wire messages, sent as bytes -------------------------------------
PutRaw = Callable[[list[bytes]], clip_pb2.PutClipResponse]


def _length(n: int, width: int) -> bytes:
    """`n` as a varint of exactly `width` bytes (padded with continuation bytes: valid, not minimal)."""
    assert n < 1 << 7 * width
    return bytes(((n >> 7 * i) & 0x7F) | (0x80 if i < width - 1 else 0) for i in range(width))


def _chunk(audio: bytes, width: int | None = None) -> bytes:
    if width is None:
        return clip_pb2.PutClipRequest(audio_chunk=audio).SerializeToString()
    return b"\x12" + _length(len(audio), width) + audio


def _first() -> bytes:
    return clip_pb2.PutClipRequest(metadata=metadata()).SerializeToString()


def _last(audio: bytes) -> bytes:
    return trailer(audio).SerializeToString()


@pytest.fixture
def put_raw(server: ClipstoreServer, channel: grpc.Channel) -> PutRaw:
    md = bearer(new_key(server.app, "ingest"))
    call = channel.stream_unary(PUT_CLIP_METHOD, request_serializer=lambda raw: raw,
                                response_deserializer=clip_pb2.PutClipResponse.FromString)
    return lambda messages: call(iter(messages), metadata=md, timeout=30)


def _stored(server: ClipstoreServer, clip_id: str) -> bytes:
    row = server.app.clips.find(clip_id)
    assert row is not None
    return b"".join(server.app.clips.audio(row))


def _nothing_stored(server: ClipstoreServer) -> None:
    assert [p for p in server.app.config.blob_dir.rglob("*") if p.is_file()] == []  # no object, no .partial
    with server.app.db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM clips")).scalar() == 0


def test_chunks_with_lengths_of_one_to_five_bytes_are_stored_byte_exact(server: ClipstoreServer,
                                                                        put_raw: PutRaw) -> None:
    audio = secrets.token_bytes(5 * 100)  # each piece's length fits one byte
    pieces = [audio[i * 100:(i + 1) * 100] for i in range(5)]
    clip = put_raw([_first(), *(_chunk(p, width) for width, p in enumerate(pieces, 1)), _last(audio)]).clip
    assert clip.size_bytes == len(audio) and _stored(server, clip.clip_id) == audio


def test_a_message_with_two_chunks_or_an_unknown_field_is_stored_as_protobuf_reads_it(
        server: ClipstoreServer, put_raw: PutRaw) -> None:
    dropped, kept, tail = secrets.token_bytes(700), secrets.token_bytes(500), secrets.token_bytes(300)
    unknown = b"\x78\x01"  # field 15, a varint: no field of PutClipRequest, skipped
    clip = put_raw([_first(), _chunk(dropped) + _chunk(kept), _chunk(tail) + unknown, _last(kept + tail)]).clip
    assert _stored(server, clip.clip_id) == kept + tail  # the last audio_chunk of a message wins


@pytest.mark.parametrize("raw", [
    _chunk(b"abcde", 6),  # a six-byte length: corrupt to upb
    b"\x12\x06abcde",  # a length past the end
    b"\x12\x04abcde",  # a chunk, then a byte that starts no whole field
], ids=["six-byte-length", "overshoot", "undershoot"])
def test_a_length_protobuf_refuses_is_malformed_and_stores_nothing(server: ClipstoreServer, put_raw: PutRaw,
                                                                   raw: bytes) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        put_raw([_first(), _chunk(b"ab"), raw, _last(b"ababcde")])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert (info.reason, info.metadata["field"]) == ("MALFORMED_REQUEST", "request")
    _nothing_stored(server)


@pytest.mark.parametrize(("raw", "field"), [
    (b"", "part"), (b"\x78\x01", "part"),  # an empty message; only an unknown field
    (_first(), "metadata"),  # metadata again
], ids=["empty", "unknown-only", "metadata-again"])
def test_a_mid_stream_message_without_audio_or_trailer_is_refused_naming_what_it_lacks(
        server: ClipstoreServer, put_raw: PutRaw, raw: bytes, field: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        put_raw([_first(), _chunk(b"ab"), raw, _chunk(b"cd"), _last(b"abcd")])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert (info.reason, info.metadata["field"]) == ("INVALID_ARGUMENT", field)
    _nothing_stored(server)


def test_grpcio_hands_the_parser_bytes_so_a_chunk_is_a_view_nothing_can_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # seal_clip holds a view of one message while the next is read: that is safe only while what grpcio
    # hands the parser is an immutable bytes object of this call's own (a reused buffer would be copied).
    seen: list[tuple[type, bool]] = []

    def recording(raw: bytes) -> clip_pb2.PutClipRequest | memoryview:
        got = parse_put_clip_request(raw)
        seen.append((type(raw), isinstance(got, memoryview) and got.readonly and type(got.obj) is bytes))
        return got

    monkeypatch.setattr("clipstore.server.parse_put_clip_request", recording)
    audio = secrets.token_bytes(3 * 65536)
    with running_server(make_config(tmp_path / "data")) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_unary(PUT_CLIP_METHOD, request_serializer=lambda raw: raw,
                                    response_deserializer=clip_pb2.PutClipResponse.FromString)
        chunks = [_chunk(audio[i:i + 65536]) for i in range(0, len(audio), 65536)]
        clip = call(iter([_first(), *chunks, _last(audio)]), metadata=bearer(new_key(server.app, "ingest")),
                    timeout=30).clip
        assert _stored(server, clip.clip_id) == audio
    assert seen == [(bytes, False), (bytes, True), (bytes, True), (bytes, True), (bytes, False)]
