"""The audio package on generated speech: codecs per content type, the pipeline, the disguise, memory."""

from __future__ import annotations

import io
import random
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest
import soundfile

from clipstore.audio import PROCESSABLE_TYPES, FetchAudio, FetchAudioPolicy, WatermarkPlan, codecs
from clipstore.audio.codecs import CONTENT_TYPES, decode, encode, wav_header
from clipstore.audio.disguise import POLICIES, DisguisePolicy, PitchFormantShift, envelope_source
from clipstore.audio.errors import UnsupportedAudio
from clipstore.audio.fetch import DISGUISE_NAMES, FetchPlan
from clipstore.audio.transform import Gain, Pipeline
from clipstore.config import ConfigError, load_config
from clipstore.errors import FailedPrecondition
from tests.audio_measures import SpeakerSpace, envelope_correlation, f0_median
from tests.audio_speech import chunks, encoded, speech

RATE = 16000
LOSSLESS = ("audio/wav", "audio/flac", "audio/L16", "audio/pcm")


def _opener(data: bytes, opens: list[int] | None = None, size: int = 64 * 1024) -> Iterator[bytes]:
    if opens is not None:
        opens.append(1)
    return iter(chunks(data, size))


def _decode_all(content_type: str, data: bytes) -> tuple[codecs.Decoded, np.ndarray]:
    decoded = decode(content_type, lambda: _opener(data), size_bytes=len(data))
    blocks = list(decoded.blocks)
    assert all(len(b) <= codecs.block_frames(decoded.format.rate) for b in blocks)
    return decoded, np.concatenate(blocks)


def _read(content_type: str, data: bytes) -> np.ndarray:
    return _decode_all(content_type, data)[1]


def _disguised(block: np.ndarray, pitch: float, formant: float, step: int = 8000) -> np.ndarray:
    shift = PitchFormantShift(rate=RATE, channels=block.shape[1], pitch_ratio=pitch, formant_ratio=formant)
    return np.concatenate(list(Pipeline([shift]).run(block[i:i + step] for i in range(0, len(block), step))))


# -- codecs ------------------------------------------------------------------------------------------------
def test_the_codecs_cover_exactly_what_the_fetch_plan_calls_processable() -> None:
    assert CONTENT_TYPES == PROCESSABLE_TYPES
    assert {"off", *POLICIES} == DISGUISE_NAMES


@pytest.mark.parametrize("content_type", sorted(CONTENT_TYPES))
def test_each_content_type_decodes_to_the_generated_speech_and_re_encodes_as_itself(content_type: str) -> None:
    rate = 48000 if content_type == "audio/opus" else RATE
    channels = 1 if content_type in ("audio/L16", "audio/pcm") else 2
    original = speech("a", 2.0, rate=rate, channels=channels)
    data = encoded(original, rate, content_type)
    decoded, samples = _decode_all(content_type, data)
    assert (decoded.format.rate, decoded.format.channels) == (rate, channels)
    assert samples.shape == original.shape and samples.dtype == np.float32
    out = b"".join(encode(decoded.format, [samples], frames=decoded.frames))
    again = _read(content_type, out)
    assert again.shape == original.shape
    if content_type in LOSSLESS:
        assert np.max(np.abs(samples - original)) < 1e-4  # 16-bit quantisation only
        assert out == data  # bit-exact: the same header and samples
    else:  # lossy codecs: the same sound, not the same samples
        assert np.corrcoef(again[:, 0], original[:, 0])[0, 1] > 0.8


def test_an_ogg_clip_longer_than_the_window_is_decrypted_twice_never_held_whole(monkeypatch: pytest.MonkeyPatch
                                                                                 ) -> None:
    monkeypatch.setattr(codecs, "SOURCE_WINDOW_BYTES", 12 * 1024)  # the clip is ~3x the window
    data = encoded(speech("b", 8.0), RATE, "audio/ogg")
    opens: list[int] = []
    decoded = decode("audio/ogg", lambda: _opener(data, opens, size=2048), size_bytes=len(data))
    samples = np.concatenate(list(decoded.blocks))
    assert len(data) > 2.5 * codecs.SOURCE_WINDOW_BYTES and len(opens) == 2  # once for the last page, once to play
    assert samples.shape == (8 * RATE, 1) and decoded.frames == 8 * RATE



class _StreamFailed(Exception):
    """What the plaintext stream raised: an integrity failure or a lost blob store, say."""


@pytest.mark.parametrize("content_type", sorted(CONTENT_TYPES))
@pytest.mark.parametrize("after_chunks", [0, 1, 3])
def test_a_plaintext_stream_that_fails_fails_the_decode_with_its_own_error(content_type: str,
                                                                           after_chunks: int) -> None:
    """libsndfile reads through a cffi callback that swallows an exception (and reads 0 bytes: the end of the
    file), FFmpeg through PyAV's: the stream's error must still come out, not a short clip nor 'unsupported'."""
    rate = 48000 if content_type == "audio/opus" else RATE
    data = encoded(speech("a", 6.0, rate=rate), rate, content_type)
    pieces = chunks(data, 4 * 1024)
    assert len(pieces) > after_chunks + 1

    def failing() -> Iterator[bytes]:
        yield from pieces[:after_chunks]
        raise _StreamFailed("segment 3 failed authentication")

    with pytest.raises(_StreamFailed):
        for _ in decode(content_type, failing, size_bytes=len(data)).blocks:
            pass

@pytest.mark.parametrize(("content_type", "data"), [
    ("audio/mpeg", b"ID3" + bytes(100)),
    ("audio/wav", b"RIFF" + bytes(100)),
    ("audio/flac", encoded(speech("a", 0.5), RATE, "audio/wav")),  # a WAV labelled as FLAC
])
def test_audio_that_is_not_what_its_content_type_says_is_unsupported(content_type: str, data: bytes) -> None:
    with pytest.raises(UnsupportedAudio):
        list(decode(content_type, lambda: _opener(data), size_bytes=len(data)).blocks)


def test_raw_pcm_keeps_every_whole_sample_and_drops_a_trailing_odd_byte() -> None:
    data = encoded(speech("a", 0.3), RATE, "audio/L16") + b"\x01"
    decoded, samples = _decode_all("audio/L16", data)
    assert len(samples) == (len(data) - 1) // 2 and decoded.frames is None
    assert b"".join(encode(decoded.format, [samples], frames=None)) == data[:-1]


def test_a_wav_header_of_unknown_length_says_so_as_streaming_writers_do() -> None:
    header = wav_header(rate=RATE, channels=1, subtype="PCM_16", frames=None)
    assert len(header) == 44 and header[4:8] == header[40:44] == b"\xff\xff\xff\xff"


def test_flac_written_block_by_block_announces_its_length_before_the_first_byte_leaves() -> None:
    original = speech("c", 6.0)
    decoded, samples = _decode_all("audio/flac", encoded(original, RATE, "audio/flac"))
    parts = list(encode(decoded.format, (samples[i:i + 4000] for i in range(0, len(samples), 4000)),
                        frames=len(samples)))
    assert len(parts) > 1  # it streamed: the header left long before the end
    with soundfile.SoundFile(io.BytesIO(b"".join(parts))) as f:
        assert f.frames == len(samples)
        assert np.max(np.abs(f.read(dtype="float32", always_2d=True) - samples)) < 1e-4


@pytest.mark.parametrize(("rate", "channels"), [(16000, 1), (48000, 2), (24000, 6)])
def test_opus_is_written_by_libopus_as_a_standard_ogg_opus_stream_of_the_same_length(rate: int, channels: int
                                                                                       ) -> None:
    """RFC 7845: an OpusHead page (version 1, the channel count, a pre-skip, the input rate, mapping family 0
    for one or two channels and 1 beyond), then OpusTags; libsndfile and FFmpeg both read back every frame."""
    import av

    original = speech("b", 3.0, rate=rate, channels=channels)
    decoded, samples = _decode_all("audio/opus", encoded(original, rate, "audio/opus"))
    out = b"".join(encode(decoded.format, (samples[i:i + rate // 2] for i in range(0, len(samples), rate // 2)),
                          frames=decoded.frames))
    head = out[28:28 + 19]  # the first page's one segment: a 27-byte header and one lacing byte
    assert out[:4] == b"OggS" and head[:8] == b"OpusHead" and head[8] == 1 and head[9] == channels
    assert int.from_bytes(head[10:12], "little") > 0 and int.from_bytes(head[12:16], "little") == rate
    assert head[18] == (0 if channels <= 2 else 1)  # the channel mapping family
    assert b"OpusTags" in out[:4096]
    with soundfile.SoundFile(io.BytesIO(out)) as f:
        assert (f.samplerate, f.channels, f.frames, f.subtype) == (rate, channels, len(original), "OPUS")
        again = f.read(dtype="float32", always_2d=True)
    assert np.corrcoef(again[:, 0], original[:, 0])[0, 1] > 0.8
    with av.open(io.BytesIO(out)) as container:  # FFmpeg decodes Opus at 48 kHz, whatever the input rate
        stream = container.streams.audio[0]
        assert stream.codec_context.name == "opus" and stream.codec_context.channels == channels
        assert sum(frame.samples for frame in container.decode(stream)) == len(original) * 48000 // rate


@pytest.mark.parametrize(("source_kbps", "written_kbps"), [(8, 24), (40, 40), (400, 128)])
def test_opus_is_written_at_the_stored_clips_own_bitrate_within_bounds_and_streams(source_kbps: int,
                                                                                    written_kbps: int) -> None:
    fmt = codecs.AudioFormat(rate=48000, channels=1, subtype="OPUS", container="OGG", bitrate=source_kbps * 1000)
    block = speech("a", 10.0, rate=48000)
    given: list[int] = []

    def blocks() -> Iterator[np.ndarray]:
        for i in range(0, len(block), 24000):
            given.append(i)
            yield block[i:i + 24000]
    parts, given_at_first = [], 0
    for part in encode(fmt, blocks(), frames=len(block)):
        given_at_first = given_at_first or len(given)
        parts.append(part)
    assert all(len(p) <= codecs.OUT_CHUNK_BYTES for p in parts)
    kbps = sum(map(len, parts)) * 8 / 10 / 1000
    assert 0.75 * written_kbps < kbps < 1.75 * written_kbps  # a VBR target: this generated speech runs over it
    if len(parts) > 2:  # well over one message: the first left before the clip was all read
        assert given_at_first < len(given)


# -- the pipeline ---------------------------------------------------------------------------------------------
class _Recorder:
    def __init__(self) -> None:
        self.offsets: list[int] = []

    def process(self, block: np.ndarray, offset: int) -> np.ndarray:
        self.offsets.append(offset)
        return block


def test_the_pipeline_hands_each_transform_absolute_offsets_and_flushes_buffered_frames_downstream() -> None:
    block = speech("a", 1.0)
    shift, recorder = PitchFormantShift(rate=RATE, channels=1, pitch_ratio=1.0, formant_ratio=1.0), _Recorder()
    out = np.concatenate(list(Pipeline([shift, Gain(0.5), recorder]).run(block[i:i + 3000]
                                                                          for i in range(0, RATE, 3000))))
    assert out.shape == block.shape and np.max(np.abs(out - 0.5 * block)) < 1e-5
    assert recorder.offsets[0] == 0 and all(b > a for a, b in zip(recorder.offsets, recorder.offsets[1:],
                                                                  strict=False))


# -- the disguise ---------------------------------------------------------------------------------------------
def test_the_disguise_at_ratio_one_returns_the_clip_unchanged_and_aligned() -> None:
    block = speech("b", 2.0, channels=2)
    assert np.max(np.abs(_disguised(block, 1.0, 1.0) - block)) < 1e-5


def test_the_disguise_output_does_not_depend_on_how_the_clip_is_cut_into_blocks() -> None:
    block = speech("a", 2.0)
    assert np.max(np.abs(_disguised(block, 1.3, 1.2, step=8000) - _disguised(block, 1.3, 1.2, step=777))) < 1e-5


@pytest.mark.parametrize("ratio", [1.3, 1 / 1.3])
def test_the_disguise_moves_the_pitch_by_its_ratio_and_keeps_the_timing(ratio: float) -> None:
    block = speech("a", 3.0)
    out = _disguised(block, ratio, ratio**0.75)
    assert out.shape == block.shape
    assert f0_median(out, RATE) == pytest.approx(f0_median(block, RATE) * ratio, rel=0.06)
    assert envelope_correlation(block, out, RATE) > 0.9  # syllables stay where they were


def test_a_disguised_voice_scores_below_the_same_speaker_threshold_on_the_same_words() -> None:
    """Text-dependent check with the MFCC baseline: the same words by three speakers, three takes each.
    The threshold separates same-speaker from different-speaker pairs; disguised clips fall below it."""
    takes = {(s, t): speech(s, 4.0, seed=3, take=t) for s in "abc" for t in range(3)}
    space = SpeakerSpace(list(takes.values()), RATE)
    same = [space.similarity(takes[s, 0], takes[s, t]) for s in "abc" for t in (1, 2)]
    different = [space.similarity(takes[s, 0], takes[u, t]) for s in "abc" for u in "abc" if u != s for t in (0, 1)]
    threshold = (min(same) + max(different)) / 2
    assert min(same) > max(different)  # the baseline separates these speakers at all
    for policy in POLICIES.values():
        rng = random.Random(7)
        for s in "abc":
            pitch, formant = policy.draw(rng)
            assert space.similarity(takes[s, 0], _disguised(takes[s, 0], pitch, formant)) < threshold


def test_disguise_policies_check_their_ranges_and_draw_both_directions() -> None:
    with pytest.raises(ValueError, match="pitch_ratios"):
        DisguisePolicy(name="x", pitch_ratios=(0.8, 1.2), formant_exponent=0.5)
    with pytest.raises(ValueError, match="ratios"):
        PitchFormantShift(rate=RATE, channels=1, pitch_ratio=3.0, formant_ratio=1.0)
    with pytest.raises(ValueError, match="formant_above_hz"):
        DisguisePolicy(name="x", pitch_ratios=(1.2, 1.3), formant_exponent=1.0, formant_above_hz=5000)
    with pytest.raises(ValueError, match="formant_above_hz"):
        PitchFormantShift(rate=8000, channels=1, pitch_ratio=1.2, formant_ratio=1.2, formant_above_hz=4000)
    both = DisguisePolicy(name="x", pitch_ratios=(1.2, 1.3), formant_exponent=0.5)
    draws = [both.draw(random.Random(i)) for i in range(40)]
    assert any(d > 1 for d, _ in draws) and any(d < 1 for d, _ in draws)
    assert all(f == pytest.approx(d ** 0.5) for d, f in draws)  # formants follow the pitch's direction
    for policy in POLICIES.values():  # the deployable ones lower the voice (docs/voice-disguise.md: why)
        assert policy.direction == "down"
        draws = [policy.draw(random.Random(i)) for i in range(40)]
        assert all(1 / 1.4 <= d <= 1 / 1.25 and f == pytest.approx(d ** policy.formant_exponent) for d, f in draws)


@pytest.mark.parametrize("ratio", [1.3, 1 / 1.3])
def test_a_formant_warp_above_a_knee_leaves_the_envelope_below_it_in_place_and_stays_continuous(ratio: float
                                                                                                ) -> None:
    source = envelope_source(257, ratio, 80.0)
    assert np.array_equal(source[:81], np.arange(81))  # below the knee each bin reads itself
    assert source[-1] == pytest.approx(80 + 176 / ratio)  # above it the envelope is scaled from the knee
    assert np.all(np.diff(source) > 0) and np.max(np.abs(np.diff(source))) <= max(1.0, 1 / ratio) + 1e-9
    assert np.array_equal(envelope_source(257, ratio, 0.0), np.arange(257) / ratio)


def test_a_warp_above_the_knee_keeps_a_low_formant_where_it_was_and_moves_a_high_one() -> None:
    """Two resonances (500 Hz and 3 kHz) excited by a 120 Hz pulse train; formants moved by 1.3 above
    2 kHz only, pitch kept: the low peak stays, the high one moves to about 2 + 1 x 1.3 = 3.3 kHz."""
    t = np.arange(2 * RATE) / RATE
    pulses = (np.mod(t * 120, 1.0) < 120 / RATE).astype(np.float64)
    x = np.zeros_like(pulses)
    for f, bw in ((500.0, 80.0), (3000.0, 150.0)):  # two-pole resonators, summed
        r, w = np.exp(-np.pi * bw / RATE), 2 * np.pi * f / RATE
        y = np.zeros_like(pulses)
        for i in range(2, len(y)):
            y[i] = pulses[i] + 2 * r * np.cos(w) * y[i - 1] - r * r * y[i - 2]
        x += y / np.max(np.abs(y))
    block = (0.3 * x / np.max(np.abs(x))).astype(np.float32).reshape(-1, 1)
    shift = PitchFormantShift(rate=RATE, channels=1, pitch_ratio=1.0, formant_ratio=1.3, formant_above_hz=2000)
    out = np.concatenate(list(Pipeline([shift]).run(block[i:i + 8000] for i in range(0, len(block), 8000))))

    def peak(y: np.ndarray, lo: float, hi: float) -> float:
        spectrum = np.abs(np.fft.rfft(y[RATE // 2:, 0] * np.hanning(len(y) - RATE // 2)))
        freqs = np.fft.rfftfreq(len(y) - RATE // 2, 1 / RATE)
        band = (freqs >= lo) & (freqs <= hi)
        return float(freqs[band][np.argmax(spectrum[band])])
    assert peak(out, 300, 800) == pytest.approx(peak(block, 300, 800), abs=130)
    assert peak(block, 2500, 4000) == pytest.approx(3000, abs=130)
    assert peak(out, 2500, 4000) == pytest.approx(3300, abs=200)


# -- bounded memory ---------------------------------------------------------------------------------------------
def _big_wav(seconds: float) -> tuple[int, Iterator[bytes]]:
    """A long WAV made on the fly from one generated second, so the input is never in memory either."""
    pcm = encoded(speech("a", 1.0), RATE, "audio/pcm")
    repeats = int(seconds)
    header = wav_header(rate=RATE, channels=1, subtype="PCM_16", frames=repeats * RATE)

    def stream() -> Iterator[bytes]:
        yield header
        for _ in range(repeats):
            yield from chunks(pcm)
    return len(header) + repeats * len(pcm), stream()


def test_a_large_clip_streams_through_decode_disguise_and_encode_in_bounded_memory() -> None:
    size, _ = _big_wav(600)  # 18.3 MiB of WAV: ten minutes
    plan = FetchPlan("pitch_formant", None, 1)
    tracemalloc.start()
    try:
        total = 0
        for chunk in FetchAudio.apply(plan, "audio/wav", lambda: _big_wav(600)[1], size_bytes=size):
            total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB for an {size / 2**20:.1f} MiB clip"


# -- plans and policy ---------------------------------------------------------------------------------------------
class _Marks:
    def for_fetch(self, *, grant_id: str, reviewer_id: str) -> WatermarkPlan:
        return WatermarkPlan(f"wm-{grant_id}", lambda rate, channels: Gain(0.5))


def test_the_plan_follows_locale_overrides_and_refuses_only_when_a_transform_is_required() -> None:
    policy = FetchAudioPolicy(disguise="off", disguise_locales={"de": "pitch_formant", "de-AT": "off"})
    audio = FetchAudio(policy)
    args = {"content_type": "audio/wav", "grant_id": "g_1", "reviewer_id": "r"}
    assert audio.plan(locale="de-DE", **args).audit_fields() == {"disguise": "pitch_formant", "watermark": ""}
    assert audio.plan(locale="de-AT", **args).disguise == "off"
    assert not audio.plan(locale="en-US", **args).transforms_audio
    mpeg = {**args, "content_type": "audio/mpeg"}
    assert audio.plan(locale="de-DE", **mpeg).disguise == "skipped"
    strict = FetchAudio(FetchAudioPolicy(disguise="pitch_formant", require_transform=True))
    with pytest.raises(FailedPrecondition) as refused:
        strict.plan(locale="en-US", **mpeg)
    assert refused.value.reason == "AUDIO_FORMAT_UNSUPPORTED"
    marked = FetchAudio(watermark=_Marks()).plan(locale="en-US", **args)
    assert marked.audit_fields() == {"disguise": "off", "watermark": "wm-g_1"} and marked.transforms_audio


def test_the_disguise_of_a_locale_applies_whatever_the_case_of_either_tag() -> None:
    """Before, `review.disguise_locales = "en-us=pitch_formant"` left clips stored as `en-US` undisguised,
    and a clip stored as `de-at` missed the `de-AT` setting."""
    policy = FetchAudioPolicy.from_settings(disguise="off", locales="en-us=pitch_formant, DE=pitch_formant, de-AT=off",
                                            require_transform=False)
    assert policy.disguise_for("en-US") == "pitch_formant"
    assert policy.disguise_for("de-at") == "off" and policy.disguise_for("de-de") == "pitch_formant"


def test_a_watermark_alone_runs_through_the_pipeline() -> None:
    original = speech("a", 1.0)
    data = encoded(original, RATE, "audio/wav")
    plan = FetchAudio(watermark=_Marks()).plan(locale="en-US", content_type="audio/wav", grant_id="g",
                                               reviewer_id="r")
    out = b"".join(FetchAudio.apply(plan, "audio/wav", lambda: _opener(data), size_bytes=len(data)))
    assert np.max(np.abs(_read("audio/wav", out) - 0.5 * original)) < 1e-4


def test_disguise_settings_are_read_from_config_and_checked() -> None:
    config = load_config(env={"CLIPSTORE_REVIEW_DISGUISE": "pitch_formant",
                              "CLIPSTORE_REVIEW_DISGUISE_LOCALES": "en-US=off, de=pitch_formant_strong",
                              "CLIPSTORE_REVIEW_REQUIRE_TRANSFORM": "true"}, overrides={"data_dir": "/tmp/x"})
    policy = FetchAudioPolicy.from_settings(disguise=config.review_disguise, locales=config.review_disguise_locales,
                                            require_transform=config.review_require_transform)
    assert policy == FetchAudioPolicy(disguise="pitch_formant", require_transform=True,
                                      disguise_locales={"en-US": "off", "de": "pitch_formant_strong"})
    assert policy.disguise_for("de-AT") == "pitch_formant_strong" and policy.disguise_for("fr") == "pitch_formant"
    for env, key in [({"CLIPSTORE_REVIEW_DISGUISE": "robot"}, "review.disguise"),
                     ({"CLIPSTORE_REVIEW_DISGUISE_LOCALES": "en-US"}, "review.disguise_locales"),
                     ({"CLIPSTORE_REVIEW_DISGUISE_LOCALES": "de=robot"}, "review.disguise_locales")]:
        with pytest.raises(ConfigError) as bad:
            load_config(env=env, overrides={"data_dir": "/tmp/x"})
        assert bad.value.key == key


def test_a_disguise_without_the_audio_extra_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipstore import config as config_module

    monkeypatch.setattr(config_module, "audio_extra_installed", lambda: False)  # e.g. PyAV (Opus) missing
    with pytest.raises(ConfigError, match="audio extra") as bad:
        load_config(env={"CLIPSTORE_REVIEW_DISGUISE": "pitch_formant", "CLIPSTORE_REVIEW_WATERMARK": "off"},
                    overrides={"data_dir": "/tmp/x"})
    assert bad.value.key == "review.disguise"
