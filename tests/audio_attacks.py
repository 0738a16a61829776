"""What a leaker might do to a copy: the attacks of issue 18, shared by tests/test_watermark.py and
bench/watermark.py. Each takes and returns float32 (frames, channels)."""

from __future__ import annotations

import io
from math import gcd

import numpy as np
from scipy import signal as sps


def ogg(samples: np.ndarray, rate: int, subtype: str, level: float | None = None) -> np.ndarray:
    """Re-encoded as Ogg Vorbis or Opus (libsndfile's compression_level: 0 best .. 1 smallest) and decoded."""
    import soundfile  # the audio extra

    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="OGG", subtype=subtype, compression_level=level)
    out.seek(0)
    decoded, _ = soundfile.read(out, dtype="float32", always_2d=True)
    return decoded


def resample(samples: np.ndarray, rate: int, to: int) -> np.ndarray:
    g = gcd(rate, to)
    return sps.resample_poly(samples, to // g, rate // g, axis=0).astype(np.float32)


def noise(samples: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White noise at `snr_db` below the signal's mean power."""
    power = float(np.mean(samples.astype(np.float64) ** 2))
    return (samples + rng.normal(0, np.sqrt(power / 10 ** (snr_db / 10)), samples.shape)).astype(np.float32)


def gain(samples: np.ndarray, db: float) -> np.ndarray:
    """Louder or quieter, clipped to full scale as a file would be."""
    return np.clip(samples * 10 ** (db / 20), -1, 1).astype(np.float32)
