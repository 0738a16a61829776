"""Measures of what the voice disguise does, for its tests and bench/audio.py.

Speaker similarity: a documented MFCC-statistics baseline, not a trained
speaker-verification model (none installs offline here). Each clip becomes the
per-coefficient mean and standard deviation of MFCC 1..19 over its voiced
frames (25 ms frames, 10 ms hop, 40 mel bands up to 7.6 kHz, energy gate at
-35 dB from the loudest frame), each dimension standardised by the mean and
spread of a reference population of clips; the score is the cosine of two such
vectors. Vectors like this are the classic
pre-i-vector speaker baseline (Reynolds 1995 used their GMM counterparts); the
same speaker saying different things scores high, different speakers lower.
The vectors are standardised against a reference population (`SpeakerSpace`).
Its threshold is calibrated in the bench on pairs of known speakers, not
asserted as a universal constant.

Timing proxy (tests only): correlation of the smoothed energy envelopes of
two clips, i.e. whether syllables stay where they were. The bench's
intelligibility figure is a real recogniser's word error rate.
"""

from __future__ import annotations

import numpy as np

FRAME_S, HOP_S = 0.025, 0.010
MEL_BANDS = 40
COEFFS = 19
GATE_DB = -35.0


def _mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_bank(rate: int, n_fft: int) -> np.ndarray:
    top = min(7600.0, rate / 2)
    edges_mel = np.linspace(_mel(np.array(60.0)), _mel(np.array(top)), MEL_BANDS + 2)
    edges = 700.0 * (10 ** (edges_mel / 2595.0) - 1.0)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / rate)
    bank = np.zeros((MEL_BANDS, len(freqs)))
    for i in range(MEL_BANDS):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        bank[i] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0.0, None)
    return bank


def _frames(x: np.ndarray, rate: int) -> np.ndarray:
    n, hop = int(FRAME_S * rate), int(HOP_S * rate)
    if len(x) < n:
        x = np.pad(x, (0, n - len(x)))
    count = 1 + (len(x) - n) // hop
    return np.lib.stride_tricks.sliding_window_view(x, n)[::hop][:count] * np.hamming(n)


def mfcc(audio: np.ndarray, rate: int) -> np.ndarray:
    """MFCC 1..COEFFS of the voiced frames of a mono (or first-channel) clip: (frames, COEFFS)."""
    x = audio[:, 0] if audio.ndim == 2 else audio
    x = np.append(x[0], x[1:] - 0.97 * x[:-1]).astype(np.float64)  # pre-emphasis
    frames = _frames(x, rate)
    n_fft = 1 << int(np.ceil(np.log2(frames.shape[1])))
    power = np.abs(np.fft.rfft(frames, n_fft, axis=1)) ** 2
    energy_db = 10 * np.log10(power.sum(axis=1) + 1e-12)
    voiced = energy_db > energy_db.max() + GATE_DB
    log_mel = np.log(power[voiced] @ _mel_bank(rate, n_fft).T + 1e-10)
    k = np.arange(MEL_BANDS)
    dct = np.cos(np.pi / MEL_BANDS * (k[None, :] + 0.5) * np.arange(1, COEFFS + 1)[:, None])
    coeffs: np.ndarray = log_mel @ dct.T
    return coeffs


def voiceprint(audio: np.ndarray, rate: int) -> np.ndarray:
    """The clip's MFCC statistics: mean and standard deviation per coefficient."""
    c = mfcc(audio, rate)
    return np.concatenate([c.mean(axis=0), c.std(axis=0)])


class SpeakerSpace:
    """Voiceprints standardised against a reference population (its mean and spread per dimension, as a
    background model would), so the cosine measures how a voice departs from the crowd, not the offset
    every voice shares."""

    def __init__(self, reference: list[np.ndarray], rate: int) -> None:
        prints = np.array([voiceprint(x, rate) for x in reference])
        self.rate, self.centre, self.scale = rate, prints.mean(axis=0), prints.std(axis=0) + 1e-6

    def embed(self, audio: np.ndarray) -> np.ndarray:
        z: np.ndarray = (voiceprint(audio, self.rate) - self.centre) / self.scale
        return z

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        """Cosine of the two clips' standardised voiceprints, in [-1, 1]; higher is more alike."""
        va, vb = self.embed(a), self.embed(b)
        return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb) + 1e-12))


def envelope_correlation(a: np.ndarray, b: np.ndarray, rate: int) -> float:
    """Pearson correlation of the 20 ms-smoothed log energy of two clips of equal length."""
    def env(x: np.ndarray) -> np.ndarray:
        x = x[:, 0] if x.ndim == 2 else x
        hop = int(0.01 * rate)
        usable = len(x) // hop * hop
        e = (x[:usable].astype(np.float64) ** 2).reshape(-1, hop).mean(axis=1)
        e = np.convolve(e, np.ones(2) / 2, mode="same")
        return np.log(e + 1e-8)
    return float(np.corrcoef(env(a), env(b))[0, 1])


def f0_median(audio: np.ndarray, rate: int) -> float:
    """Median autocorrelation pitch (Hz) over loud frames, 60-400 Hz."""
    x = audio[:, 0] if audio.ndim == 2 else audio
    n = 1 << int(np.ceil(np.log2(0.064 * rate)))
    found = []
    for start in range(0, len(x) - n, n // 2):
        frame = x[start:start + n] * np.hanning(n)
        if np.sqrt(np.mean(frame**2)) < 0.02:
            continue
        ac = np.fft.irfft(np.abs(np.fft.rfft(frame, 2 * n)) ** 2)[:n]
        lo, hi = rate // 400, rate // 60
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.3 * ac[0]:
            found.append(rate / lag)
    return float(np.median(found)) if found else 0.0
