"""FetchClip through a real server: what the reviewer hears, what the clip.fetch entry says (issue 18)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from clipstore.audio import FetchAudio, FetchAudioPolicy, WatermarkPlan
from clipstore.audio.codecs import CONTENT_TYPES, decode
from clipstore.audio.transform import Gain
from clipstore.server import ClipstoreServer, running_server
from clipstore.v1 import clip_pb2, review_pb2_grpc
from tests.audio_measures import f0_median
from tests.audio_speech import chunks, encoded, speech
from tests.clip_helpers import metadata, put_requests
from tests.conftest import FakeClock, bearer, make_config
from tests.enrolment_helpers import enrol, totp_secret_bytes
from tests.grpc_helpers import error_info
from tests.test_review import Reviewer, World

RATE = 16000


@pytest.fixture
def overrides() -> dict[str, object]:
    return {"review.disguise": "pitch_formant"}


@pytest.fixture
def w(tmp_path: Path, database_url: str | None, overrides: dict[str, object],
      log_stream: io.StringIO) -> Iterator[World]:
    clock = FakeClock()
    config = make_config(tmp_path / "data", database_url=database_url,
                         **{"review.sample_rate": 1.0, "review.daily_cap": 20, **overrides})
    with running_server(config, clock=clock) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        world = World(server, channel, clock)
        world.opt_in()
        yield world


def _put(w: World, data: bytes, content_type: str, locale: str = "en-US") -> clip_pb2.Clip:
    return w.clips.PutClip(put_requests(metadata(content_type=content_type, locale=locale), data),
                           metadata=w.ingest, timeout=30).clip


def _heard(w: World, r: Reviewer, token: str) -> tuple[str, bytes]:
    """The next assignment, fetched: (its content type, the bytes the reviewer received)."""
    assignment = w.next(r, token)
    grant = w.grant(r, token, assignment.assignment_id)
    clip, audio = w.fetch(r, token, grant.grant, grant.review_clip_id)
    return clip.content_type, audio


def _refused_fetch(w: World) -> grpc.RpcError:
    """A new reviewer's fetch of the next assignment, which must fail: its error."""
    r = w.enroll()
    token = w.session(r)
    assignment = w.next(r, token)
    grant = w.grant(r, token, assignment.assignment_id)
    with pytest.raises(grpc.RpcError) as failed:
        w.fetch(r, token, grant.grant, grant.review_clip_id)
    return failed.value


def _samples(content_type: str, data: bytes) -> np.ndarray:
    decoded = decode(content_type, lambda: iter(chunks(data)), size_bytes=len(data))
    return np.concatenate(list(decoded.blocks))


def _fetches(w: World) -> list[dict[str, object]]:
    return [e for e in w.entries() if e["action"] == "clip.fetch"]


def test_every_processable_type_is_heard_disguised_in_its_own_format_and_the_fetch_entry_says_so(w: World
                                                                                                ) -> None:
    original = speech("a", 2.0)
    sent = {ct: encoded(original, RATE, ct) for ct in sorted(CONTENT_TYPES)}
    for ct, data in sent.items():
        _put(w, data, ct)
    r = w.enroll()
    token = w.session(r)
    for _ in sent:
        content_type, audio = _heard(w, r, token)
        heard = _samples(content_type, audio)
        assert audio != sent[content_type] and heard.shape == original.shape, content_type
        ratio = f0_median(heard, RATE) / f0_median(original, RATE)
        assert abs(np.log(ratio)) > np.log(1.2), (content_type, ratio)  # a policy ratio, up or down
    fetches = _fetches(w)
    assert len(fetches) == len(sent)
    assert all(e["outcome"] == {"result": "ok", "reason": "", "disguise": "pitch_formant", "watermark": ""}
               for e in fetches)


@pytest.mark.parametrize(("content_type", "rate"), [("audio/opus", 48000), ("audio/flac", 16000)])
def test_a_stereo_clip_is_heard_as_one_disguised_mono_channel_of_the_same_length(w: World, content_type: str,
                                                                                rate: int) -> None:
    """Transformed copies are mono (clipstore/audio/fetch.py): the words, not the room, at half the CPU."""
    original = speech("a", 2.0, rate=rate, channels=2)
    _put(w, encoded(original, rate, content_type), content_type)
    r = w.enroll()
    _, audio = _heard(w, r, w.session(r))
    heard = _samples(content_type, audio)
    assert heard.shape == (len(original), 1)
    ratio = f0_median(heard, rate) / f0_median(original.mean(axis=1, keepdims=True), rate)
    assert abs(np.log(ratio)) > np.log(1.2), ratio


@pytest.mark.parametrize("overrides", [{}])
def test_with_the_feature_off_the_reviewer_hears_the_stored_bytes_and_the_entry_says_off(w: World) -> None:
    data = encoded(speech("b", 1.0), RATE, "audio/flac")
    _put(w, data, "audio/flac")
    r = w.enroll()
    assert _heard(w, r, w.session(r)) == ("audio/flac", data)
    assert _fetches(w)[-1]["outcome"] == {"result": "ok", "reason": "", "disguise": "off", "watermark": ""}


@pytest.mark.parametrize("overrides", [{"review.disguise": "off", "review.disguise_locales": "de=pitch_formant"}])
def test_the_disguise_follows_the_clips_locale(w: World) -> None:
    data = encoded(speech("a", 1.0), RATE, "audio/wav")
    _put(w, data, "audio/wav", locale="en-US")
    _put(w, data, "audio/wav", locale="de-DE")
    _, factors = enrol(w.channel, w.admin, "polyglot", locales=("en-US", "de-DE"))
    r = Reviewer(factors.reviewer_id, bearer(factors.api_key), totp_secret_bytes(factors.totp_secret),
                 review_pb2_grpc.ReviewServiceStub(w.channel))
    token = w.session(r)
    heard = [_heard(w, r, token)[1] == data for _ in range(2)]
    assert sorted(heard) == [False, True]
    assert sorted(e["outcome"]["disguise"] for e in _fetches(w)) == ["off", "pitch_formant"]  # type: ignore[index]


def test_a_type_that_cannot_be_processed_is_served_unchanged_and_recorded_as_skipped(w: World) -> None:
    data = b"ID3\x04" + bytes(5000)  # an MP3 is stored, but not decoded at the fetch boundary
    _put(w, data, "audio/mpeg")
    r = w.enroll()
    assert _heard(w, r, w.session(r)) == ("audio/mpeg", data)
    assert _fetches(w)[-1]["outcome"]["disguise"] == "skipped"  # type: ignore[index]


@pytest.mark.parametrize("overrides", [{"review.disguise": "pitch_formant", "review.require_transform": True}])
def test_when_a_transform_is_required_an_unprocessable_type_is_refused_and_audited(w: World) -> None:
    _put(w, b"ID3\x04" + bytes(5000), "audio/mpeg")
    w.denied(_refused_fetch(w), grpc.StatusCode.FAILED_PRECONDITION, "AUDIO_FORMAT_UNSUPPORTED")
    assert not _fetches(w)


def test_a_clip_that_does_not_decode_fails_the_stream_and_is_never_heard_undisguised(w: World) -> None:
    _put(w, b"RIFF" + bytes(3000), "audio/wav")  # labelled WAV, not a WAV
    failed = _refused_fetch(w)
    assert (failed.code(), error_info(failed).reason) == \
        (grpc.StatusCode.FAILED_PRECONDITION, "AUDIO_FORMAT_UNSUPPORTED")
    actions = [e["action"] for e in w.entries()]
    assert actions[-2:] == ["clip.fetch", "clip.audio_failure"]  # the fetch was on record first


class _Marks:
    """A stand-in for the watermark branch: the port's contract, with a trivial transform."""

    def for_fetch(self, *, grant_id: str, reviewer_id: str) -> WatermarkPlan:
        return WatermarkPlan(f"wm_{grant_id[-6:]}", lambda rate, channels: Gain(0.5))


@pytest.mark.parametrize("overrides", [{}])
def test_the_watermark_port_runs_after_decode_and_its_id_is_on_record(w: World) -> None:
    server: ClipstoreServer = w.server
    server.app.review.grants.audio = FetchAudio(FetchAudioPolicy(), watermark=_Marks())
    original = speech("c", 1.0)
    _put(w, encoded(original, RATE, "audio/pcm"), "audio/pcm")
    r = w.enroll()
    content_type, audio = _heard(w, r, w.session(r))
    assert np.max(np.abs(_samples(content_type, audio) - 0.5 * original)) < 1e-3
    outcome = _fetches(w)[-1]["outcome"]
    assert outcome["disguise"] == "off" and str(outcome["watermark"]).startswith("wm_")  # type: ignore[index]
