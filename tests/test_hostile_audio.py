"""Hostile audio headers at the fetch boundary and in IdentifyLeak: a stored clip or a leaked file whose
header claims an absurd sample rate, length or channel count is refused (audited), never decoded into
memory or CPU the header asks for.

Before these tests, a stored WAV claiming 2**31 - 1 Hz made FetchClip's decoder ask libsndfile for
BLOCK_S of that rate per block (about a billion frames): the server process grew past 20 GB of RSS, and
the same header sent to IdentifyLeak failed with an unaudited MemoryError (resample_poly's filter)."""

# ruff: noqa: F811  (fixtures imported by name)
from __future__ import annotations

import struct
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from clipstore.audio import codecs
from clipstore.audio.codecs import decode
from clipstore.audio.errors import UnsupportedAudio
from clipstore.audio.watermark import read_audio
from tests.grpc_helpers import error_info
from tests.test_fetch_audio import _put, _refused_fetch, overrides, w  # noqa: F401 (fixtures)
from tests.test_review import World


def hostile_wav(*, rate: int, channels: int = 1, bits: int = 16, body: bytes = bytes(4000)) -> bytes:
    """A PCM WAV whose header claims `rate`, `channels` and an unknown (0xFFFFFFFF) data length."""
    align = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, channels, rate, (rate * align) & 0xFFFFFFFF, align, bits)
            + b"data" + struct.pack("<I", 0xFFFFFFFF) + body)


def _once(data: bytes) -> Iterator[bytes]:
    return iter([data])


@pytest.mark.parametrize("rate", [2**31 - 1, codecs.MAX_RATE_HZ + 1])
def test_a_header_claiming_an_absurd_rate_is_refused_when_the_clip_is_opened(rate: int) -> None:
    # Refused at decode(), before any block is read: the block size is BLOCK_S of the claimed rate.
    data = hostile_wav(rate=rate)
    with pytest.raises(UnsupportedAudio, match="Hz"):
        decode("audio/wav", lambda: _once(data), size_bytes=len(data))


def test_the_highest_rate_allowed_still_decodes() -> None:
    data = hostile_wav(rate=codecs.MAX_RATE_HZ)
    blocks = list(decode("audio/wav", lambda: _once(data), size_bytes=len(data)).blocks)
    assert sum(len(b) for b in blocks) == 2000


def test_a_stored_clip_claiming_two_billion_hz_fails_the_fetch_audited_and_is_never_heard(w: World) -> None:
    _put(w, hostile_wav(rate=2**31 - 1, channels=8, bits=8), "audio/wav")
    failed = _refused_fetch(w)
    assert (failed.code(), error_info(failed).reason) == \
        (grpc.StatusCode.FAILED_PRECONDITION, "AUDIO_FORMAT_UNSUPPORTED")
    assert [e["action"] for e in w.entries()][-2:] == ["clip.fetch", "clip.audio_failure"]


@pytest.mark.parametrize("rate", [2**31 - 1, codecs.MAX_RATE_HZ + 1])
def test_a_leaked_file_claiming_an_absurd_rate_is_unsupported(rate: int) -> None:
    with pytest.raises(UnsupportedAudio, match="Hz"):
        read_audio(hostile_wav(rate=rate))


def test_a_leaked_file_claiming_1024_channels_is_read_as_mono_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1024 channels x 300 s at 16 kHz would be 20 GB of float32 if read at once; mixed down, it is its frames.
    values = np.arange(1024 * 40) % 1000
    body = values.astype("<i2").tobytes()
    samples, rate = read_audio(hostile_wav(rate=16000, channels=1024, body=body))
    assert (samples.shape, rate) == ((40, 1), 16000)
    expected = values.reshape(40, 1024).mean(axis=1) / 32768
    assert np.allclose(samples[:, 0], expected, atol=1e-6)


def flac_claiming(rate: int) -> bytes:
    """A real FLAC whose STREAMINFO states `rate` (20 bits at byte 18) instead of the 16 kHz it was made at."""
    from tests.audio_speech import encoded, speech
    data = bytearray(encoded(speech("a", 1.0), 16000, "audio/flac"))
    data[18:21] = ((rate << 4) | (data[20] & 0xF)).to_bytes(3, "big")
    return bytes(data)


@pytest.mark.parametrize("rate", [65536, 376448])
def test_a_flac_rate_the_encoder_cannot_write_is_unsupported_not_an_internal_error(rate: int) -> None:
    # libsndfile decodes it, then refuses to write FLAC at that rate at the first block: a LibsndfileError
    # reached the servicer as INTERNAL, without the clip.audio_failure entry.
    from clipstore.audio.fetch import FetchAudio, FetchPlan
    data = flac_claiming(rate)
    with pytest.raises(UnsupportedAudio, match=f"{rate} Hz"):
        list(FetchAudio.apply(FetchPlan("pitch_formant", None, 1), "audio/flac", lambda: _once(data),
                              size_bytes=len(data)))


def test_a_stored_flac_the_encoder_refuses_fails_the_fetch_audited(w: World) -> None:
    _put(w, flac_claiming(65536), "audio/flac")
    failed = _refused_fetch(w)
    assert (failed.code(), error_info(failed).reason) == \
        (grpc.StatusCode.FAILED_PRECONDITION, "AUDIO_FORMAT_UNSUPPORTED")
    assert [e["action"] for e in w.entries()][-2:] == ["clip.fetch", "clip.audio_failure"]


def test_a_leaked_file_is_decoded_up_to_a_sample_budget_whatever_its_rate_and_channels(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A FLAC of 300 s of a constant at 384 kHz x 8 channels is about 1 MB: reading MAX_DETECT_S of it decoded
    # 921M samples (19 s of CPU, 2.2 GB) per IdentifyLeak. The budget counts samples, not seconds.
    from clipstore.audio import watermark
    monkeypatch.setattr(watermark, "MAX_DETECT_SAMPLES", 8000)
    body = bytes(2 * 8 * 4000)  # 4000 frames of 8 channels
    samples, _ = read_audio(hostile_wav(rate=16000, channels=8, body=body))
    assert samples.shape == (1000, 1)
