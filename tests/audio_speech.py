"""Deterministic speech-like test audio, made here with numpy (no recordings, nothing to license).

A source-filter synthesiser: a glottal source (harmonics of a varying f0 with a
spectral tilt, plus a little breath noise) shaped by formant resonances that
glide between vowels, with consonant-like noise bursts (fricatives, plosive
bursts) and pauses between "words". Two speakers differ the way two real
voices do: f0 (pitch) and vocal-tract length (all formants scaled), tilt and
breathiness. The same `seed` gives the same "words" whatever the speaker, so a
test can compare two voices saying the same thing, or one voice saying two
different things.

    block = speech("a", 3.0)                    # float32 (frames, 1) at 16 kHz
    data = encoded(block, 16000, "audio/flac")  # the bytes a client would PutClip

Shared by the audio tests (codecs, disguise, watermark) and bench/audio.py.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

RATE_HZ = 16000
CONTROL_RATE_HZ = 200  # formant and amplitude tracks are computed at this rate, then interpolated
PEAK = 0.5

# Peterson & Barney (1952) mean formants of adult male speakers, Hz (F1, F2, F3), and bandwidths.
VOWELS: dict[str, tuple[float, float, float]] = {
    "i": (270.0, 2290.0, 3010.0),
    "e": (530.0, 1840.0, 2480.0),
    "a": (730.0, 1090.0, 2440.0),
    "o": (570.0, 840.0, 2410.0),
    "u": (300.0, 870.0, 2240.0),
}
BANDWIDTHS_HZ = (70.0, 100.0, 140.0, 220.0)
F4_HZ = 3500.0

# Consonant-like noise: (low Hz, high Hz, duration s, gain).
CONSONANTS: dict[str, tuple[float, float, float, float]] = {
    "s": (4000.0, 7800.0, 0.10, 0.30),
    "sh": (2000.0, 5000.0, 0.10, 0.30),
    "f": (1000.0, 7800.0, 0.08, 0.10),
    "t": (3000.0, 7000.0, 0.03, 0.50),
    "k": (1200.0, 3500.0, 0.035, 0.45),
    "p": (300.0, 2000.0, 0.025, 0.40),
}


@dataclass(frozen=True, kw_only=True)
class Speaker:
    name: str
    f0_hz: float  # mean pitch
    formant_scale: float  # vocal-tract length: every formant times this
    tilt: float  # source spectral slope: harmonic k has amplitude k ** -tilt
    breath: float  # share of aspiration noise in voiced parts
    f0_range: float = 0.12  # intonation swing, as a share of f0


SPEAKERS: dict[str, Speaker] = {
    "a": Speaker(name="a", f0_hz=112.0, formant_scale=1.0, tilt=1.0, breath=0.02),
    "b": Speaker(name="b", f0_hz=208.0, formant_scale=1.17, tilt=1.3, breath=0.06),
    "c": Speaker(name="c", f0_hz=135.0, formant_scale=1.06, tilt=0.9, breath=0.03, f0_range=0.18),
}


@dataclass(frozen=True)
class _Syllable:
    consonant: str | None
    vowel: str
    vowel_s: float
    pause_s: float  # silence after the syllable (0 inside a word)


def _script(seconds: float, seed: int, tempo: float = 1.0) -> list[_Syllable]:
    """The "words": a sequence of syllables filling `seconds`, the same for every speaker and take."""
    rng = np.random.default_rng(seed)
    out: list[_Syllable] = []
    total = 0.15  # a little lead-in silence
    vowels, consonants = list(VOWELS), [None, *CONSONANTS]
    while total < seconds - 0.3:
        in_word = int(rng.integers(1, 4))
        for i in range(in_word):
            c = consonants[int(rng.integers(len(consonants)))]
            v = vowels[int(rng.integers(len(vowels)))]
            vowel_s = float(rng.uniform(0.09, 0.22)) * tempo
            pause_s = float(rng.uniform(0.08, 0.25)) * tempo if i == in_word - 1 else 0.0
            out.append(_Syllable(c, v, vowel_s, pause_s))
            total += (CONSONANTS[c][2] if c else 0.0) + vowel_s + pause_s
    return out


def _resonance(f: np.ndarray, centre: np.ndarray, bandwidth: float) -> np.ndarray:
    """Magnitude of a two-pole resonator at frequencies f (unit gain at 0 Hz)."""
    half = bandwidth / 2.0
    return (centre**2 + half**2) / np.sqrt(((f - centre) ** 2 + half**2) * ((f + centre) ** 2 + half**2))


def _band_noise(rng: np.random.Generator, n: int, low: float, high: float, rate: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / rate)
    spectrum[(freqs < low) | (freqs > min(high, rate / 2 - 100))] = 0.0
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.std(noise) + 1e-12)


def _ramp(n: int, ramp: int) -> np.ndarray:
    env = np.ones(n)
    ramp = min(ramp, n // 2)
    if ramp:
        env[:ramp] = np.linspace(0.0, 1.0, ramp)
        env[n - ramp:] = np.linspace(1.0, 0.0, ramp)
    return env


@lru_cache(maxsize=32)
def _mono(speaker: Speaker, seconds: float, rate: int, seed: int, take: int) -> np.ndarray:
    n = int(round(seconds * rate))
    script = _script(seconds, seed, tempo=1.0 + 0.06 * np.sin(take))  # another take: a little faster or slower
    rng = np.random.default_rng(seed * 7919 + 17 + 104729 * take)
    ctl = int(np.ceil(seconds * CONTROL_RATE_HZ)) + 1
    voiced = np.zeros(n)
    noise_parts = np.zeros(n)
    # formant targets at vowel centres, interpolated over the control grid (glides between vowels)
    centres_s: list[float] = []
    targets: list[tuple[float, float, float]] = []
    t = 0.15
    for syl in script:
        if syl.consonant:
            low, high, dur, gain = CONSONANTS[syl.consonant]
            a, m = int(t * rate), int(dur * rate)
            if a + m > n:
                break
            env = _ramp(m, m // 4 if syl.consonant in "sfsh" else 2)
            if syl.consonant in "tkp":
                env *= np.exp(-np.arange(m) / (0.3 * m))
            noise_parts[a:a + m] += gain * env * _band_noise(rng, m, low, high, rate)
            t += dur
        a, m = int(t * rate), int(syl.vowel_s * rate)
        if a + m > n:
            break
        voiced[a:a + m] = np.maximum(voiced[a:a + m], _ramp(m, int(0.015 * rate)))
        centres_s.append(t + syl.vowel_s / 2)
        targets.append(VOWELS[syl.vowel])
        t += syl.vowel_s + syl.pause_s
    if not targets:  # very short clip: one steady vowel
        centres_s, targets = [seconds / 2], [VOWELS["a"]]
    grid_s = np.arange(ctl) / CONTROL_RATE_HZ
    formants = [np.interp(grid_s, centres_s, [f[i] for f in targets]) * speaker.formant_scale for i in range(3)]
    formants.append(np.full(ctl, F4_HZ * speaker.formant_scale))

    # pitch: declination over each ~2 s phrase, a slow intonation swing, a little jitter
    time_s = np.arange(n) / rate
    swing = np.sin(2 * np.pi * 0.7 * time_s + seed + take) + 0.5 * np.sin(2 * np.pi * 1.9 * time_s + 2 * take)
    declination = 1.0 - 0.08 * ((time_s % 2.0) / 2.0)
    jitter = np.interp(time_s, grid_s, rng.normal(0.0, 0.01, ctl))
    f0 = speaker.f0_hz * declination * (1.0 + speaker.f0_range * swing / 1.5 + jitter)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    f0_ctl = np.interp(grid_s, time_s, f0)

    nyquist_guard = rate / 2 - 200.0
    harmonic = np.zeros(n)
    for k in range(1, int(nyquist_guard // (speaker.f0_hz * 0.8)) + 1):
        fk = k * f0_ctl
        amp = k ** -speaker.tilt * np.ones(ctl)
        for centre, bw in zip(formants, BANDWIDTHS_HZ, strict=True):
            amp = amp * _resonance(fk, centre, bw * speaker.formant_scale)
        amp[fk > nyquist_guard] = 0.0
        if not amp.any():
            break
        harmonic += np.interp(time_s, grid_s, amp) * np.sin(k * phase)
    level = np.std(harmonic) + 1e-12
    breath = speaker.breath * 6.0 * level * _band_noise(rng, n, 300.0, 6000.0, rate)
    signal = (harmonic + breath) * voiced + noise_parts * level * 2.0
    signal = signal / (np.max(np.abs(signal)) + 1e-12) * PEAK
    return signal.astype(np.float32)


def speech(speaker: Speaker | str, seconds: float, *, rate: int = RATE_HZ, channels: int = 1,
           seed: int = 0, take: int = 0) -> np.ndarray:
    """`seconds` of speech-like audio, float32 shaped (frames, channels), peak 0.5; deterministic.

    `seed` chooses the words; `take` another recording of the same words by the same speaker
    (tempo, intonation, jitter and noise differ).

    Extra channels are the same voice slightly attenuated, so a stereo clip is still one speaker."""
    voice = SPEAKERS[speaker] if isinstance(speaker, str) else speaker
    mono = _mono(voice, float(seconds), int(rate), int(seed), int(take))
    return np.stack([mono * (1.0 - 0.1 * c) for c in range(channels)], axis=1).astype(np.float32)


# content type -> (soundfile format, subtype); raw PCM is written here, not by libsndfile
_FORMATS: dict[str, tuple[str, str]] = {
    "audio/wav": ("WAV", "PCM_16"),
    "audio/flac": ("FLAC", "PCM_16"),
    "audio/ogg": ("OGG", "VORBIS"),
    "audio/opus": ("OGG", "OPUS"),
}
CONTENT_TYPES = (*_FORMATS, "audio/L16", "audio/pcm")


def encoded(block: np.ndarray, rate: int, content_type: str) -> bytes:
    """The bytes of `block` as `content_type`: what a device would upload.

    audio/L16 is big-endian 16-bit PCM (RFC 2586), audio/pcm little-endian; both headerless."""
    pcm = np.clip(np.round(block * 32767.0), -32768, 32767).astype(np.int16)
    if content_type == "audio/L16":
        return pcm.astype(">i2").tobytes()
    if content_type == "audio/pcm":
        return pcm.astype("<i2").tobytes()
    import soundfile  # the test extra's audio dependency; imported late so this module loads without it

    fmt, subtype = _FORMATS[content_type]
    out = io.BytesIO()
    soundfile.write(out, block, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def chunks(data: bytes, size: int = 64 * 1024) -> list[bytes]:
    """`data` cut the way the envelope hands plaintext out: fixed-size pieces."""
    return [data[i:i + size] for i in range(0, len(data), size)]
