"""The forensic watermark as a signal: round trips, streaming, the attacks of issue 18, and refusals.

Small trial counts here (one clip per attack); bench/watermark.py measures the rates."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

soundfile = pytest.importorskip("soundfile")

from clipstore.audio import watermark as wm  # noqa: E402
from clipstore.audio.errors import UnsupportedAudio  # noqa: E402
from tests.audio_attacks import gain, noise, ogg, resample  # noqa: E402
from tests.audio_speech import speech  # noqa: E402

KEY = bytes(range(32))
PAYLOAD = 0x5A_C3_0F_12_E7
RATE = 16000


def marked(seconds: float = 10.0, *, rate: int = RATE, channels: int = 1, payload: int = PAYLOAD,
           key: bytes = KEY, speaker: str = "a", seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    clean = speech(speaker, seconds, rate=rate, channels=channels, seed=seed)
    return clean, wm.WatermarkEmbedder(key, payload, rate, channels).process(clean, 0)


def found(samples: np.ndarray, rate: int = RATE, key: bytes = KEY) -> int | None:
    detection = wm.detect(samples, rate, key)
    return None if detection is None else detection.payload


# -- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "channels"), [(16000, 1), (44100, 2), (48000, 1), (8000, 1)])
def test_the_mark_is_recovered_at_any_rate_and_channel_count(rate: int, channels: int) -> None:
    _, audio = marked(rate=rate, channels=channels)
    assert audio.shape == (10 * rate, channels) and audio.dtype == np.float32
    detection = wm.detect(audio, rate, KEY)
    assert detection is not None and detection.payload == PAYLOAD
    assert 0.5 < detection.confidence <= 1.0 and detection.sync_score > 6


def test_the_mark_is_quiet_and_leaves_silence_silent() -> None:
    clean, audio = marked()
    mark = (audio - clean).astype(np.float64)[:, 0]
    snr_db = 10 * np.log10(np.sum(clean.astype(np.float64) ** 2) / np.sum(mark ** 2))
    assert snr_db > 25
    silent = np.abs(clean[:, 0]) == 0  # the pauses between words: only the envelope's 10 ms decay reaches them
    assert silent.sum() > RATE and np.sum(mark[silent] ** 2) < 0.03 * np.sum(mark ** 2)


def test_streaming_in_any_block_size_gives_the_same_output() -> None:
    clean = speech("b", 6.0, rate=44100, channels=2, seed=5)
    whole = wm.WatermarkEmbedder(KEY, PAYLOAD, 44100, 2).process(clean, 0)
    for seed in range(3):
        sizes = np.random.default_rng(seed).integers(1, 9000, size=400)
        embedder, parts, at = wm.WatermarkEmbedder(KEY, PAYLOAD, 44100, 2), [], 0
        for size in sizes:
            if at >= len(clean):
                break
            parts.append(embedder.process(clean[at:at + size], at))
            at += len(parts[-1])
        np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=1e-6)


def test_a_block_that_skips_ahead_restarts_the_envelope_and_keeps_the_carrier_in_place() -> None:
    clean = speech("a", 3.0, seed=1)
    embedder = wm.WatermarkEmbedder(KEY, PAYLOAD, RATE, 1)
    embedder.process(clean[:1000], 0)
    skipped = embedder.process(clean[20000:30000], 20000)
    fresh = wm.WatermarkEmbedder(KEY, PAYLOAD, RATE, 1).process(clean[20000:30000], 20000)
    np.testing.assert_array_equal(skipped, fresh)


# -- the attacks of issue 18 -------------------------------------------------------------------------


def test_survives_ogg_vorbis_and_opus() -> None:
    _, audio = marked()
    assert found(ogg(audio, RATE, "VORBIS")) == PAYLOAD
    assert found(ogg(audio, RATE, "OPUS")) == PAYLOAD


def test_survives_resampling_both_ways() -> None:
    _, audio = marked(rate=44100)
    down = resample(audio, 44100, 16000)
    assert found(down, 16000) == PAYLOAD
    assert found(resample(down, 16000, 44100), 44100) == PAYLOAD


@pytest.mark.parametrize("gain_db", [-6.0, 6.0])
def test_survives_a_volume_change(gain_db: float) -> None:
    _, audio = marked()
    assert found(gain(audio, gain_db)) == PAYLOAD


def test_survives_trimming_a_second_from_each_end() -> None:
    _, audio = marked()
    assert found(audio[RATE:-RATE]) == PAYLOAD
    assert found(audio[RATE + 1234:-RATE]) == PAYLOAD  # any offset, not a whole symbol


def test_survives_noise_at_20_db_snr() -> None:
    _, audio = marked()
    assert found(noise(audio, 20.0, np.random.default_rng(0))) == PAYLOAD


def test_survives_all_attacks_together() -> None:
    _, audio = marked(rate=44100, speaker="c", seed=9)
    attacked = gain(audio[44100:-44100], -6)
    attacked = ogg(resample(attacked, 44100, 16000), 16000, "VORBIS")
    assert found(noise(attacked, 20.0, np.random.default_rng(0))) == PAYLOAD


# -- refusals: no false identification ------------------------------------------------------------------


def test_a_wrong_key_finds_nothing() -> None:
    _, audio = marked()
    assert wm.detect(audio, RATE, bytes(32)) is None


def test_unmarked_speech_noise_and_silence_find_nothing() -> None:
    assert wm.detect(speech("b", 10.0, seed=4), RATE, KEY) is None
    assert wm.detect(np.random.default_rng(1).normal(0, 0.1, (RATE * 10, 1)).astype(np.float32), RATE, KEY) is None
    assert wm.detect(np.zeros((RATE * 10, 1), np.float32), RATE, KEY) is None
    assert wm.detect(np.zeros((100, 1), np.float32), RATE, KEY) is None


def test_two_fetches_get_different_marks_and_each_names_its_own() -> None:
    clean = speech("a", 10.0, seed=2)
    other = 0x01_23_45_67_89
    assert found(wm.WatermarkEmbedder(KEY, other, RATE, 1).process(clean, 0)) == other
    assert found(wm.WatermarkEmbedder(KEY, PAYLOAD, RATE, 1).process(clean, 0)) == PAYLOAD


# -- the pieces ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(info=st.integers(0, (1 << wm.INFO_BITS) - 1), flips=st.sets(st.integers(0, wm.CODED_BITS - 1), max_size=4))
def test_the_convolutional_code_corrects_a_few_scattered_errors(info: int, flips: set[int]) -> None:
    bits = wm._bits(info, wm.INFO_BITS)
    soft = 1.0 - 2.0 * wm._conv_encode(bits)
    assert len(soft) == wm.CODED_BITS
    if flips and max(flips) - min(flips) > 40:  # free distance 10: errors far apart are corrected
        for i in flips:
            soft[i] = -soft[i]
    np.testing.assert_array_equal(wm._viterbi(soft), bits)


def test_watermark_ids_round_trip_and_reject_anything_else() -> None:
    assert wm.watermark_id(PAYLOAD) == "wm_5ac30f12e7"
    assert wm.payload_of("wm_5ac30f12e7") == PAYLOAD
    for bad in ("5ac30f12e7", "wm_5ac30f12", "wm_5ac30f12e7ff"):
        with pytest.raises(ValueError, match="watermark id"):
            wm.payload_of(bad)


def test_bad_arguments_are_caller_errors_naming_the_parameter() -> None:
    with pytest.raises(ValueError, match="payload"):
        wm.WatermarkEmbedder(KEY, 1 << wm.ID_BITS, RATE, 1)
    with pytest.raises(ValueError, match="key"):
        wm.WatermarkEmbedder(b"short", 1, RATE, 1)
    with pytest.raises(ValueError, match="rate"):
        wm.WatermarkEmbedder(KEY, 1, 4000, 1)
    with pytest.raises(ValueError, match="channels"):
        wm.WatermarkEmbedder(KEY, 1, RATE, 0)
    with pytest.raises(ValueError, match="block"):
        wm.WatermarkEmbedder(KEY, 1, RATE, 2).process(np.zeros((10, 1), np.float32), 0)


def test_reprs_name_neither_key_nor_payload() -> None:
    for obj in (wm.WatermarkEmbedder(KEY, PAYLOAD, RATE, 1), wm.ForensicWatermarks(KEY)):
        text = repr(obj)
        assert KEY.hex() not in text and str(PAYLOAD) not in text and "5ac30f12e7" not in text


def test_each_fetch_draws_a_new_id_and_its_embedder_carries_it() -> None:
    draws = iter([PAYLOAD, 7])
    source = wm.ForensicWatermarks(KEY, randbits=lambda bits: next(draws))
    first, second = (source.for_fetch(grant_id=f"g_{i}", reviewer_id="r_1") for i in range(2))
    assert (first.watermark_id, second.watermark_id) == ("wm_5ac30f12e7", "wm_0000000007")
    audio = first.make(RATE, 1).process(speech("a", 10.0, seed=2), 0)
    assert found(audio) == PAYLOAD


def test_a_file_that_is_not_audio_is_unsupported() -> None:
    with pytest.raises(UnsupportedAudio):
        wm.read_audio(b"not audio at all" * 100)
    _, audio = marked()
    out = io.BytesIO()
    soundfile.write(out, audio, RATE, format="FLAC")
    detection = wm.ForensicWatermarks(KEY).identify(out.getvalue())
    assert detection is not None and detection.payload == PAYLOAD
