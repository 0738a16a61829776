"""Voice disguise: shift a speaker's pitch and formants so the voice is not recognisable, keep the words.

A phase vocoder (STFT, 75 % overlap) moves every harmonic by `pitch_ratio`,
and a cepstral spectral envelope moves the formants (the vocal tract's
resonances, which carry much of a voice's identity) by `formant_ratio`
independently: the output spectrum of a frame is the input's fine structure
read at f / pitch_ratio, divided by its own envelope there and multiplied by the
envelope read at f / formant_ratio. The words survive because the formant
pattern keeps its shape (only scaled, as between a tall and a short speaker)
and timing is untouched.

Why not WORLD (pyworld): analysis and synthesis cost 0.7 s (DIO) to 2.0 s
(Harvest) of CPU per 10 s of speech here, several times the whole fetch
budget; this vocoder costs about 60 ms and streams (docs/voice-disguise.md).

Each fetch draws its ratios from the policy's ranges with an injected RNG, so
two fetches of one clip do not sound the same and the inverse is not a known
constant (see the limits in docs/voice-disguise.md). A policy may move only the
formants above a knee (`formant_above_hz`): F1 and F2, which tell the vowels
apart, stay where they were; F3 and above, and the pitch, carry more of the
speaker.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import fft

FRAME_S = 0.032  # analysis frame, about 32 ms (a power of two in samples)
OVERLAP = 4  # frames per frame length: hop = frame / 4
LIFTER_S = 0.0016  # cepstral envelope keeps quefrencies below 1.6 ms: formants yes, pitch harmonics (>=2.5 ms) no
_TWO_PI32 = np.float32(2.0 * np.pi)


@dataclass(frozen=True, kw_only=True)
class DisguisePolicy:
    """A named disguise: pitch ratios are drawn from `pitch_ratios` (a ratio r, or its inverse 1/r: with
    `direction` "both" either way with equal chance, "down" always 1/r, "up" always r) and formants move
    in the same direction by r ** `formant_exponent`, those above `formant_above_hz` only (0: the whole
    envelope; docs/voice-disguise.md has the trade-off)."""

    name: str
    pitch_ratios: tuple[float, float]
    formant_exponent: float
    formant_above_hz: float = 0.0
    direction: Literal["both", "down", "up"] = "both"

    def __post_init__(self) -> None:
        low, high = self.pitch_ratios
        if not 1.0 < low <= high <= 2.0:
            raise ValueError(f"pitch_ratios must satisfy 1 < low <= high <= 2, got {self.pitch_ratios}")
        if not 0.0 <= self.formant_exponent <= 1.5:
            raise ValueError(f"formant_exponent must lie in [0, 1.5], got {self.formant_exponent}")
        if not 0.0 <= self.formant_above_hz <= 4000.0:
            raise ValueError(f"formant_above_hz must lie in [0, 4000], got {self.formant_above_hz}")
        if self.direction not in ("both", "down", "up"):
            raise ValueError(f"direction must be both, down or up, got {self.direction!r}")

    def draw(self, rng: random.Random) -> tuple[float, float]:
        """(pitch_ratio, formant_ratio) for one fetch."""
        ratio = rng.uniform(*self.pitch_ratios)
        if self.direction == "down" or (self.direction == "both" and rng.random() < 0.5):
            ratio = 1.0 / ratio
        return ratio, ratio ** self.formant_exponent

    def transform(self, *, rate: int, channels: int, rng: random.Random) -> PitchFormantShift:
        pitch, formant = self.draw(rng)
        return PitchFormantShift(rate=rate, channels=channels, pitch_ratio=pitch, formant_ratio=formant,
                                 formant_above_hz=min(self.formant_above_hz, rate / 4))


# The policies a deployment can name in `review.disguise` (`off` is the absence of one).
# bench/disguise_sweep.py measured the trade-off (docs/voice-disguise.md, medians of 3 seeds): `pitch_formant`
# lowers the pitch by 1.25-1.4 and the formants above 2.5 kHz (F3 up) as much, F1 and F2 (the vowels) stay:
# 97 % of clips below the same-speaker threshold, rhyme accuracy kept (1.15 of the original's, by a machine
# listener). `pitch_formant_strong` moves the whole envelope by r^0.75: every clip far below the threshold, but
# only about 60 % of the rhyme accuracy kept. Both shift down only: upward shifts lost the machine listener
# most of the words at every setting tried.
POLICIES: dict[str, DisguisePolicy] = {
    "pitch_formant": DisguisePolicy(name="pitch_formant", pitch_ratios=(1.25, 1.4), formant_exponent=1.0,
                                    formant_above_hz=2500.0, direction="down"),
    "pitch_formant_strong": DisguisePolicy(name="pitch_formant_strong", pitch_ratios=(1.25, 1.4),
                                           formant_exponent=0.75, direction="down"),
}


def _frame_length(rate: int) -> int:
    return 1 << max(6, int(round(np.log2(rate * FRAME_S))))


class PitchFormantShift:
    """A streaming `BufferingTransform`: holds back one frame length minus one hop, returns it at flush."""

    name = "pitch_formant"

    def __init__(self, *, rate: int, channels: int, pitch_ratio: float, formant_ratio: float,
                 formant_above_hz: float = 0.0) -> None:
        if rate <= 0 or channels <= 0:
            raise ValueError(f"rate and channels must be positive, got {rate}, {channels}")
        if not 0.5 <= pitch_ratio <= 2.0 or not 0.5 <= formant_ratio <= 2.0:
            raise ValueError(f"ratios must lie in [0.5, 2], got {pitch_ratio}, {formant_ratio}")
        if not 0.0 <= formant_above_hz < rate / 2:
            raise ValueError(f"formant_above_hz must lie in [0, rate / 2), got {formant_above_hz}")
        self.pitch_ratio, self.formant_ratio = pitch_ratio, formant_ratio
        n = self._n = _frame_length(rate)
        hop = self._hop = n // OVERLAP
        self._channels = channels
        window = np.hanning(n + 1)[:n]  # periodic Hann: overlap-adds to a constant
        self._window = window.astype(np.float32)
        self._synth_window = (window / (np.sum(window**2) / hop)).astype(np.float32)  # and the OLA gain
        bins = n // 2 + 1
        bin_freq = 2.0 * np.pi * np.arange(bins) / n  # rad/sample at each bin centre
        expected = bin_freq * hop  # phase advance per hop of a bin-centred sinusoid
        self._expected = np.mod(expected, 2.0 * np.pi).astype(np.float32)
        lifter = np.zeros(n, np.float32)
        keep = max(2, int(rate * LIFTER_S))
        lifter[:keep] = 1.0
        lifter[n - keep + 1:] = 1.0
        self._lifter = lifter
        # where each output bin reads the input: fractional source bins, split into index and weight
        self._fine = _Reader(np.arange(bins) / pitch_ratio, bins)
        self._env_formant = _Reader(envelope_source(bins, formant_ratio, formant_above_hz * n / rate), bins)
        # what a bin-centred source harmonic adds to an output bin's phase per hop, wrapped in float64
        self._centre_advance = np.mod(expected[self._fine.nearest_index] * pitch_ratio, 2.0 * np.pi).astype(np.float32)
        # stream state: padded input not yet consumed, overlap-add tail, phases, frames still owed
        self._inbuf = np.zeros((n - hop, channels), np.float32)  # leading zeros: the first frame ends at its hop
        self._ola = np.zeros((n - hop, channels), np.float32)
        self._prev_phase = np.zeros((channels, bins), np.float32)
        self._out_phase = np.zeros((channels, bins), np.float32)
        self._to_skip = n - hop  # output frames that belong to the leading zeros
        self._given = 0
        self._returned = 0

    # -- streaming --------------------------------------------------------------------------------------
    def process(self, block: np.ndarray, offset: int) -> np.ndarray:
        self._given += len(block)
        self._inbuf = np.concatenate([self._inbuf, block.astype(np.float32, copy=False)])
        return self._emit(self._frames())

    def flush(self) -> np.ndarray:
        owed = self._given - self._returned
        self._inbuf = np.concatenate([self._inbuf, np.zeros((self._n, self._channels), np.float32)])
        out = self._emit(self._frames())
        return out[:owed]

    def _emit(self, done: np.ndarray) -> np.ndarray:
        skip = min(self._to_skip, len(done))
        self._to_skip -= skip
        out = done[skip:]
        self._returned += len(out)
        return np.ascontiguousarray(out, dtype=np.float32)

    def _frames(self) -> np.ndarray:
        """Analyse, shift and overlap-add every whole frame in the input buffer; the finished samples."""
        n, hop = self._n, self._hop
        count = 0 if len(self._inbuf) < n else 1 + (len(self._inbuf) - n) // hop
        if not count:
            return np.zeros((0, self._channels), np.float32)
        # (channels, count, n) views of the overlapping frames
        frames = np.lib.stride_tricks.sliding_window_view(self._inbuf[:(count - 1) * hop + n], n, axis=0)[::hop]
        frames = np.transpose(frames, (1, 0, 2)) * self._window
        spectrum = fft.rfft(frames, axis=-1)
        shifted = self._shift(spectrum)
        synth = fft.irfft(shifted, n, axis=-1)
        synth *= self._synth_window
        length = (count - 1) * hop + n
        out = np.zeros((self._channels, length), np.float32)
        for j in range(OVERLAP):  # overlap-add: frames j, j+4, … abut without overlapping, so one add each
            part = synth[:, j::OVERLAP, :]
            if part.shape[1]:
                out[:, j * hop:j * hop + part.shape[1] * n] += part.reshape(self._channels, -1)
        out[:, :n - hop] += self._ola.T
        self._ola = out[:, count * hop:].T.copy()
        self._inbuf = self._inbuf[count * hop:]
        return out[:, :count * hop].T

    def _shift(self, spectrum: np.ndarray) -> np.ndarray:
        """Move harmonics by pitch_ratio and the envelope by formant_ratio; phases follow each moved
        harmonic's instantaneous frequency (the phase vocoder), carried across blocks.

        float32 throughout (complex64 spectra), which numpy and scipy.fft vectorise: 3-20x less CPU
        per operation than float64 here (docs/voice-disguise.md); phases are kept wrapped to ±pi so
        float32 holds them to about 1e-6 rad whatever the clip's length."""
        magnitude = np.abs(spectrum)
        magnitude += np.float32(1e-9)
        phase = np.angle(spectrum)
        # instantaneous frequency per bin, from the phase advance since the previous frame: the bin's
        # centre frequency plus a deviation, kept apart so float32 never holds a large phase
        previous = np.concatenate([self._prev_phase[:, None, :], phase[:, :-1, :]], axis=1)
        self._prev_phase = phase[:, -1, :].copy()
        deviation = phase - previous - self._expected
        deviation -= _TWO_PI32 * np.rint(deviation / _TWO_PI32)
        # spectral envelope (log), by cepstral smoothing
        log_mag = np.log(magnitude)
        cepstrum = fft.irfft(log_mag, self._n, axis=-1)
        log_env = fft.rfft(cepstrum * self._lifter, axis=-1).real
        fine = self._fine.read(log_mag - log_env)
        new_log = fine + self._env_formant.read(log_env)
        # each output bin's phase advances by its source harmonic's frequency times the pitch ratio
        advance = self._fine.nearest(deviation) * np.float32(self.pitch_ratio)
        advance += self._centre_advance
        advance[..., self._fine.outside] = 0.0
        advance -= _TWO_PI32 * np.rint(advance / _TWO_PI32)  # wrapped per frame (np.mod costs 20x more)
        advance[:, 0, :] += self._out_phase
        out_phase = np.cumsum(advance, axis=1)
        out_phase -= _TWO_PI32 * np.rint(out_phase / _TWO_PI32)
        self._out_phase = out_phase[:, -1, :].copy()
        new_mag = np.exp(new_log)
        new_mag[..., self._fine.outside] = 0.0
        shifted = np.empty(new_mag.shape, np.complex64)
        shifted.real = new_mag * np.cos(out_phase)
        shifted.imag = new_mag * np.sin(out_phase)
        return shifted


def envelope_source(bins: int, ratio: float, knee: float) -> np.ndarray:
    """Where each output bin reads the envelope: unmoved below the knee (in bins), scaled by `ratio` from
    the knee up (a piecewise-linear warp, continuous at the knee; knee 0 scales the whole envelope)."""
    out = np.arange(bins, dtype=np.float64)
    above = out > knee
    out[above] = knee + (out[above] - knee) / ratio
    return out


class _Reader:
    """Linear interpolation of the last axis at fixed fractional positions."""

    def __init__(self, positions: np.ndarray, bins: int) -> None:
        self.outside = positions > bins - 1
        clipped = np.clip(positions, 0, bins - 1)
        self._low = np.floor(clipped).astype(np.intp)
        self._high = np.minimum(self._low + 1, bins - 1)
        self._weight = (clipped - self._low).astype(np.float32)
        self.nearest_index = np.rint(clipped).astype(np.intp)

    def read(self, values: np.ndarray) -> np.ndarray:
        low = values[..., self._low]
        mixed: np.ndarray = low + (values[..., self._high] - low) * self._weight
        return mixed

    def nearest(self, values: np.ndarray) -> np.ndarray:
        return values[..., self.nearest_index]
