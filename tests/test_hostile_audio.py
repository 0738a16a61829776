"""Hostile audio headers at the fetch boundary and in IdentifyLeak: a stored clip or a leaked file whose
header claims an absurd sample rate, length or channel count is refused (audited), never decoded into
memory or CPU the header asks for.

Before these tests, a stored WAV claiming 2**31 - 1 Hz made FetchClip's decoder ask libsndfile for
BLOCK_S of that rate per block (about a billion frames): the server process grew past 20 GB of RSS, and
the same header sent to IdentifyLeak failed with an unaudited MemoryError (resample_poly's filter)."""

# ruff: noqa: F811  (fixtures imported by name)
from __future__ import annotations

import io
import struct
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import soundfile

from clipstore.audio import codecs
from clipstore.audio.codecs import decode
from clipstore.audio.errors import AudioTooLong, UnsupportedAudio
from clipstore.audio.watermark import read_audio
from tests.audio_speech import encoded, speech
from tests.clip_helpers import metadata, put_requests
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


# -- decode bombs: more audio than the stored clip accounts for ------------------------------------------------
def _crc(data: bytes, poly: int, bits: int) -> int:
    top, mask, crc = 1 << (bits - 1), (1 << bits) - 1, 0
    for byte in data:
        crc ^= byte << (bits - 8)
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & mask if crc & top else (crc << 1) & mask
    return crc


def flac_bomb(seconds: float, *, rate: int = 16000, channels: int = 2) -> bytes:
    """A valid FLAC of `seconds` of silence in about 15 bytes per 65535-frame block (FLAC's largest): constant
    subframes. 300 s of stereo at 16 kHz is 1.2 KB, about 3900 frames per byte (libsndfile writes
    silence at most 350 per byte: 4096-frame blocks)."""
    block, total = 65535, int(seconds * rate)
    info = (block.to_bytes(2, "big") * 2 + bytes(6)
            + ((rate << 44) | ((channels - 1) << 41) | (15 << 36) | total).to_bytes(8, "big") + bytes(16))
    out = bytearray(b"fLaC\x80" + len(info).to_bytes(3, "big") + info)  # the last (only) block: STREAMINFO
    for i in range(-(-total // block)):
        size = min(block, total - i * block)  # fixed blocking, 16-bit size at the end, rate and depth as stated
        header = bytes([0xFF, 0xF8, 0x70, (channels - 1) << 4]) + chr(i).encode() + (size - 1).to_bytes(2, "big")
        frame = header + bytes([_crc(header, 0x07, 8)]) + bytes(3) * channels  # CONSTANT subframes of 0
        out += frame + _crc(frame, 0x8005, 16).to_bytes(2, "big")
    return bytes(out)


def test_a_kilobyte_flac_stating_five_minutes_is_refused_when_opened_before_any_decoding() -> None:
    data = flac_bomb(300.0)
    assert len(data) < 1300
    with soundfile.SoundFile(io.BytesIO(data)) as f:  # a real FLAC: libsndfile would decode all of it
        assert (f.frames, f.channels) == (300 * 16000, 2)
    for declared_ms in (0, 2300, 300_000):  # none, an honest-looking one, one that matches the bomb
        with pytest.raises(AudioTooLong, match="stored bytes allow at most"):
            decode("audio/flac", lambda: _once(data), size_bytes=len(data), declared_ms=declared_ms)


def test_a_clip_may_decode_to_its_declared_duration_with_slack_but_not_beyond() -> None:
    data = encoded(speech("a", 6.0), 16000, "audio/flac")
    for declared_ms in (0, 5000, 6000, 60_000):  # 5 s x 1.25 + 1 s = 7.25 s >= 6 s
        assert sum(map(len, decode("audio/flac", lambda: _once(data), size_bytes=len(data),
                                   declared_ms=declared_ms).blocks)) == 6 * 16000
    with pytest.raises(AudioTooLong, match=r"states 6.0 s at 16000 Hz; its duration_ms=3000 and"):
        decode("audio/flac", lambda: _once(data), size_bytes=len(data), declared_ms=3000)


class _LengthUnknown:
    """A libsndfile handle that does not state its length (as for a stream), so only decoding can tell."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._sound = _REAL_SOUNDFILE(*args, **kwargs)
        self.frames = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._sound, name)


_REAL_SOUNDFILE = soundfile.SoundFile


def test_a_clip_whose_length_is_not_stated_stops_decoding_one_frame_past_the_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = encoded(speech("b", 10.0), 16000, "audio/wav")
    monkeypatch.setattr(codecs.soundfile, "SoundFile", _LengthUnknown)
    decoded = decode("audio/wav", lambda: _once(data), size_bytes=len(data), declared_ms=2000)
    assert decoded.frames is None
    heard = 0
    with pytest.raises(AudioTooLong, match=r"decodes to more than 3.5 s at 16000 Hz; its duration_ms=2000"):
        for block in decoded.blocks:
            heard += len(block)
    assert heard <= 3.5 * 16000


def test_48khz_opus_whose_length_is_not_stated_is_decoded_by_ffmpeg_and_stops_one_frame_past_the_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = encoded(speech("b", 10.0, rate=48000, channels=2), 48000, "audio/opus")
    monkeypatch.setattr(codecs.soundfile, "SoundFile", _LengthUnknown)
    decoded = decode("audio/opus", lambda: _once(data), size_bytes=len(data), declared_ms=2000)
    assert decoded.frames is None and decoded.blocks.__name__ == "_ffmpeg_opus_blocks"  # type: ignore[attr-defined]
    heard = 0
    with pytest.raises(AudioTooLong, match=r"decodes to more than 3.5 s at 48000 Hz; its duration_ms=2000"):
        for block in decoded.blocks:
            heard += len(block)
    assert heard <= 3.5 * 48000


@pytest.mark.parametrize("damage", ["page_crc", "truncated"])
def test_damaged_48khz_opus_ends_in_an_audio_error_or_in_fewer_frames_never_in_another_exception(
        damage: str) -> None:
    data = bytearray(encoded(speech("b", 4.0, rate=48000), 48000, "audio/opus"))
    if damage == "page_crc":
        data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    else:
        data = data[:len(data) * 2 // 3]
    try:
        decoded = decode("audio/opus", lambda: _once(bytes(data)), size_bytes=len(data))
        assert sum(map(len, decoded.blocks)) <= 4 * 48000
    except UnsupportedAudio:
        pass


@pytest.mark.parametrize(("content_type", "rate", "channels"), [
    ("audio/flac", 16000, 1), ("audio/flac", 48000, 8), ("audio/ogg", 16000, 1), ("audio/ogg", 48000, 8),
    ("audio/opus", 48000, 1), ("audio/opus", 48000, 2)])
def test_half_a_minute_of_digital_silence_the_most_compressible_real_clip_still_decodes(
        content_type: str, rate: int, channels: int) -> None:
    fmt, subtype = {"audio/flac": ("FLAC", "PCM_16"), "audio/ogg": ("OGG", "VORBIS"),
                    "audio/opus": ("OGG", "OPUS")}[content_type]
    out = io.BytesIO()
    with soundfile.SoundFile(out, "w", rate, channels, subtype, format=fmt) as f:
        for _ in range(30):  # a second at a time (libsndfile's Vorbis writer crashes on a minute in one call)
            f.write(np.zeros((rate, channels), np.float32))
    data = out.getvalue()
    decoded = decode(content_type, lambda: _once(data), size_bytes=len(data))  # no declared duration
    assert sum(map(len, decoded.blocks)) == 30 * rate


@pytest.mark.parametrize("declared_ms", [0, 2300])
def test_a_stored_flac_bomb_fails_the_fetch_with_its_own_reason_audited(w: World, declared_ms: int) -> None:
    data = flac_bomb(300.0)
    w.clips.PutClip(put_requests(metadata(content_type="audio/flac", duration_ms=declared_ms), data),
                    metadata=w.ingest, timeout=30)
    failed = _refused_fetch(w)
    assert (failed.code(), error_info(failed).reason) == \
        (grpc.StatusCode.FAILED_PRECONDITION, "AUDIO_LONGER_THAN_STORED")
    assert "allow at most" in (failed.details() or "")
    fetch, failure = w.entries()[-2:]
    assert (fetch["action"], failure["action"]) == ("clip.fetch", "clip.audio_failure")
    assert failure["outcome"] == {"result": "failed", "reason": "AUDIO_LONGER_THAN_STORED"}
