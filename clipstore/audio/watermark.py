"""Per-grant forensic watermark: a keyed spread-spectrum mark that names the fetch a copy came from.

The payload is a short random watermark id (`ID_BITS`), recorded with the grant;
the audit log maps it to grant, reviewer pseudonym and time. What is embedded:

    info   = id (40 bits) ‖ MAC (26 bits),  MAC = HMAC-SHA256(k_mac, id)[:26 bits]
    coded  = convolutional code, rate 1/2, K = 7 (171, 133 octal), terminated: 144 bits
    frame  = 16 keyed sync symbols + the 144 coded bits in a keyed interleaved order: 160 symbols
    symbol = 200 chips of a keyed ±1 sequence at 8000 chips/s (25 ms), times the symbol's bit

The chips, shaped by a 0.5–3.8 kHz band-pass pulse, form the carrier; the frame
repeats every 4 s for the whole clip, and the carrier is defined in seconds, not
samples, so any sample rate carries the same mark. The mark added to the audio is
`ALPHA` times the carrier times the host's short-term RMS (a causal envelope with
`ENVELOPE_TAU_S`): it follows the speech, and silence stays silent.

Detection resamples to 16 kHz, flattens the host's spectrum (each STFT bin divided
by its smoothed magnitude, so loud formants do not drown the mark), folds the
audio modulo the 4 s frame, finds the frame start by correlating with the sync
symbols (a circular correlation by FFT: any trim), decodes the best
`MAX_CANDIDATES` starts with a soft Viterbi decoder and accepts a payload only
if its MAC verifies. Why a random or wrong-key signal is accepted with
probability < 1e-6: each candidate yields one 66-bit word whose 26-bit MAC, a
PRF of the id under a key the signal does not know, matches with probability
2^-26; at most `MAX_CANDIDATES` (8) words are tried, so
P(false identification) <= 8 * 2^-26 = 1.2e-7 (docs/watermark.md).

Numpy and scipy only: no gRPC, no SQL.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from math import gcd

import numpy as np
from scipy import signal as sps

from clipstore.audio.errors import UnsupportedAudio
from clipstore.audio.fetch import WatermarkPlan

ID_BITS = 40
MAC_BITS = 26
INFO_BITS = ID_BITS + MAC_BITS
CONSTRAINT_LENGTH = 7
GENERATORS = (0o171, 0o133)
TAIL_BITS = CONSTRAINT_LENGTH - 1
CODED_BITS = 2 * (INFO_BITS + TAIL_BITS)  # 144
SYNC_SYMBOLS = 16
FRAME_SYMBOLS = SYNC_SYMBOLS + CODED_BITS  # 160
CHIP_RATE_HZ = 8000
CHIPS_PER_SYMBOL = 200  # 25 ms
FRAME_CHIPS = FRAME_SYMBOLS * CHIPS_PER_SYMBOL  # 32000 chips = 4 s
FRAME_S = FRAME_CHIPS / CHIP_RATE_HZ
BAND_HZ = (500.0, 3800.0)
PULSE_HALF_CHIPS = 16  # the pulse spans ±2 ms: long enough for a 500 Hz lower edge
ALPHA = 0.04  # mark RMS / host RMS: -28 dB (robustness and SNR measured in bench/watermark.py)
ENVELOPE_TAU_S = 0.010
DETECT_RATE_HZ = 16000
MAX_CANDIDATES = 8  # frame starts decoded per detection; bounds the false-identification rate
MAX_DETECT_S = 300.0  # detection reads at most this much audio (bounds CPU and memory: ~115 MB at 48 kHz)
STFT_BINS = 512
READ_SLICE_SAMPLES = 1 << 20  # samples (frames x channels) per read of a leaked file: 4 MB of float32
# samples (frames x channels) decoded from a leaked file at most: 300 s of 48 kHz stereo fits; a 1 MB FLAC
# of 300 s at 384 kHz x 8 channels (921M samples) cost 19 s of CPU and 2.2 GB before this bound
MAX_DETECT_SAMPLES = 1 << 25


@dataclass(frozen=True)
class Detection:
    """A recovered payload: the watermark id, and how clearly it was there."""

    payload: int
    sync_score: float  # the frame-start correlation peak, in robust standard deviations
    confidence: float  # correlation of the soft symbols with the decoded codeword, 0..1


# -- keys -------------------------------------------------------------------------------------


def _subkey(key: bytes, label: str) -> bytes:
    if len(key) < 16:
        raise ValueError(f"key must be at least 16 bytes, got {len(key)}")
    return hmac.new(key, b"clipstore/watermark/v1\x00" + label.encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class _Keyed:
    chips: np.ndarray  # FRAME_CHIPS of ±1
    sync: np.ndarray  # SYNC_SYMBOLS of ±1
    order: np.ndarray  # frame position of each coded bit (interleaver)
    sync_at: np.ndarray  # frame positions of the sync symbols
    mac_key: bytes


@lru_cache(maxsize=8)
def _keyed(key: bytes) -> _Keyed:
    rng = np.random.default_rng(np.frombuffer(_subkey(key, "streams"), dtype=np.uint64))
    chips = rng.integers(0, 2, FRAME_CHIPS).astype(np.float64) * 2 - 1
    sync = rng.integers(0, 2, SYNC_SYMBOLS).astype(np.float64) * 2 - 1
    positions = rng.permutation(FRAME_SYMBOLS)
    return _Keyed(chips=chips, sync=sync, sync_at=np.sort(positions[:SYNC_SYMBOLS]),
                  order=positions[SYNC_SYMBOLS:], mac_key=_subkey(key, "mac"))


def _mac(mac_key: bytes, payload: int) -> int:
    digest = hmac.new(mac_key, payload.to_bytes(8, "big"), hashlib.sha256).digest()
    return int.from_bytes(digest[:4], "big") >> (32 - MAC_BITS)


# -- the code ------------------------------------------------------------------------------------


def _bits(value: int, n: int) -> np.ndarray:
    return np.array([(value >> (n - 1 - i)) & 1 for i in range(n)], dtype=np.int8)


def _parity(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    for shift in range(CONSTRAINT_LENGTH):
        out ^= (x >> shift) & 1
    return out


def _conv_encode(info: np.ndarray) -> np.ndarray:
    """Rate 1/2, K = 7, terminated with K-1 zeros: (len(info) + 6) * 2 bits."""
    bits = np.concatenate([info, np.zeros(TAIL_BITS, dtype=np.int8)]).astype(np.int64)
    reg = np.zeros(len(bits), dtype=np.int64)
    state = 0
    for i, b in enumerate(bits):
        state = ((state << 1) | int(b)) & ((1 << CONSTRAINT_LENGTH) - 1)
        reg[i] = state
    return np.stack([_parity(reg & g) for g in GENERATORS], axis=1).reshape(-1).astype(np.int8)


@lru_cache(maxsize=1)
def _trellis() -> tuple[np.ndarray, np.ndarray]:
    """For each (state, input bit): the next state and the two code bits as ±1."""
    states = np.arange(1 << (CONSTRAINT_LENGTH - 1))
    nxt = np.empty((len(states), 2), dtype=np.int64)
    out = np.empty((len(states), 2, 2))
    for b in (0, 1):
        reg = (states << 1) | b
        nxt[:, b] = reg & ((1 << (CONSTRAINT_LENGTH - 1)) - 1)
        for j, g in enumerate(GENERATORS):
            out[:, b, j] = 1 - 2 * _parity(reg & g)  # bit 0 -> +1, bit 1 -> -1
    return nxt, out


def _viterbi(soft: np.ndarray) -> np.ndarray:
    """Soft-decision decoding of a terminated code: `soft` > 0 means bit 0. Returns the info bits."""
    nxt, out = _trellis()
    n_states = nxt.shape[0]
    steps = len(soft) // 2
    metric = np.full(n_states, -np.inf)
    metric[0] = 0.0
    back = np.zeros((steps, n_states), dtype=np.int64)  # predecessor state * 2 + bit
    pairs = soft.reshape(steps, 2)
    src = np.repeat(np.arange(n_states), 2)
    bit = np.tile([0, 1], n_states)
    dst = nxt.reshape(-1)
    for t in range(steps):
        cand = metric[src] + out.reshape(-1, 2) @ pairs[t]
        new = np.full(n_states, -np.inf)
        np.maximum.at(new, dst, cand)
        winner = np.full(n_states, -1, dtype=np.int64)
        hit = cand == new[dst]
        winner[dst[hit]] = (src[hit] * 2 + bit[hit])  # ties: the last wins, deterministic
        back[t] = winner
        metric = new
    state, decoded = 0, np.zeros(steps, dtype=np.int8)  # terminated: the path ends in state 0
    for t in range(steps - 1, -1, -1):
        code = back[t, state]
        decoded[t] = code & 1
        state = code >> 1
    return decoded[:steps - TAIL_BITS]


def _frame_bits(keyed: _Keyed, payload: int) -> np.ndarray:
    """The ±1 value of each of the FRAME_SYMBOLS symbols."""
    info = np.concatenate([_bits(payload, ID_BITS), _bits(_mac(keyed.mac_key, payload), MAC_BITS)])
    coded = 1.0 - 2.0 * _conv_encode(info)
    frame = np.empty(FRAME_SYMBOLS)
    frame[keyed.sync_at] = keyed.sync
    frame[keyed.order] = coded
    return frame


# -- the carrier --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pulse:
    up: int  # samples per `down` chips
    down: int
    taps: np.ndarray  # the band-pass pulse at CHIP_RATE_HZ * up samples/s, centred
    delay: int  # output samples by which upfirdn's output lags chip 0


@lru_cache(maxsize=16)
def _pulse(rate: int) -> _Pulse:
    g = gcd(rate, CHIP_RATE_HZ)
    up, down = rate // g, CHIP_RATE_HZ // g
    fine = CHIP_RATE_HZ * up  # the upsampled rate
    half = -(-PULSE_HALF_CHIPS * up // down) * down  # a multiple of `down`: an integer output delay
    t = np.arange(-half, half + 1) / fine
    lo, hi = BAND_HZ
    hi = min(hi, 0.45 * rate)
    h = 2 * hi * np.sinc(2 * hi * t) - 2 * lo * np.sinc(2 * lo * t)
    h *= np.hanning(len(h) + 2)[1:-1]
    h /= CHIP_RATE_HZ  # a chip is 1/CHIP_RATE_HZ s: unit pulse area per unit chip
    # unit RMS for random ±1 chips: the power is sum(h^2 over the polyphase branch) per output sample
    h /= np.sqrt(np.sum(h**2) / up) if up else 1.0
    return _Pulse(up=up, down=down, taps=h, delay=half // down)


def _carrier(chip_values: np.ndarray, rate: int, start: int, length: int) -> np.ndarray:
    """The band-limited carrier at `rate` for samples [start, start + length).

    Chip j (at time j / CHIP_RATE_HZ) has value chip_values[j mod len(chip_values)], so the
    carrier is periodic, defined for any sample, and the same whichever block asks for it."""
    p = _pulse(rate)
    margin = p.delay // p.up + 2  # whole (up-sample, down-chip) units either side
    unit0 = start // p.up - margin
    unit1 = -(-(start + length) // p.up) + margin
    chips = np.arange(unit0 * p.down, unit1 * p.down)
    y: np.ndarray = sps.upfirdn(p.taps, chip_values[chips % len(chip_values)], up=p.up, down=p.down)
    first = start - unit0 * p.up + p.delay
    return y[first:first + length]


# -- embedding ---------------------------------------------------------------------------------


class WatermarkEmbedder:
    """Adds the mark of `payload` to audio streamed through `process`, block by block.

    The output for a sample depends on the input up to it and its absolute frame index
    only, so any block size gives the same output. The one piece of state is the causal
    envelope; a block that does not start where the last one ended restarts it."""

    def __init__(self, key: bytes, payload: int, rate: int, channels: int) -> None:
        if not 0 <= payload < 1 << ID_BITS:
            raise ValueError(f"payload must be a {ID_BITS}-bit unsigned integer")
        if rate < 8000:
            raise ValueError(f"rate must be at least 8000 Hz, got {rate}")
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}")
        keyed = _keyed(bytes(key))
        frame = _frame_bits(keyed, payload)
        self._chips = keyed.chips * np.repeat(frame, CHIPS_PER_SYMBOL)
        self.rate, self.channels = rate, channels
        a = np.exp(-1.0 / (ENVELOPE_TAU_S * rate))
        self._env_b, self._env_a = np.array([1.0 - a]), np.array([1.0, -a])
        self._zi = np.zeros(1)
        self._next = 0

    def __repr__(self) -> str:
        return f"WatermarkEmbedder(rate={self.rate}, channels={self.channels})"  # never the key or payload

    def process(self, block: np.ndarray, offset: int) -> np.ndarray:
        if block.ndim != 2 or block.shape[1] != self.channels:
            raise ValueError(f"block must be shaped (frames, {self.channels}), got {block.shape}")
        n = block.shape[0]
        if n == 0:
            return block
        if offset != self._next:
            self._zi = np.zeros(1)
        mono = block.mean(axis=1, dtype=np.float64)
        power, self._zi = sps.lfilter(self._env_b, self._env_a, mono * mono, zi=self._zi)
        self._next = offset + n
        mark = ALPHA * np.sqrt(np.maximum(power, 0.0)) * _carrier(self._chips, self.rate, offset, n)
        out: np.ndarray = np.clip(block + mark[:, None].astype(np.float32), -1.0, 1.0)
        return out


# -- detection ---------------------------------------------------------------------------------


def _mono_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    x = samples.astype(np.float64)
    if x.ndim == 2:
        x = x.mean(axis=1)
    x = x[:int(MAX_DETECT_S * rate)]
    if rate != DETECT_RATE_HZ:
        g = gcd(rate, DETECT_RATE_HZ)
        x = sps.resample_poly(x, DETECT_RATE_HZ // g, rate // g)
    return x


def _flatten(x: np.ndarray) -> np.ndarray:
    """Each STFT bin divided by its smoothed magnitude: the host's spectral envelope removed."""
    if len(x) < STFT_BINS:
        return x
    _, _, z = sps.stft(x, nperseg=STFT_BINS, noverlap=STFT_BINS // 2, boundary="zeros")
    mag = np.abs(z)
    smooth = sps.convolve2d(mag, np.ones((9, 3)) / 27.0, mode="same", boundary="symm")
    floor = 1e-3 * (np.mean(mag) + 1e-12)
    _, y = sps.istft(z / (smooth + floor), nperseg=STFT_BINS, noverlap=STFT_BINS // 2, boundary=True)
    flat: np.ndarray = y[:len(x)]
    return flat


def _fold(x: np.ndarray, period: int) -> np.ndarray:
    reps = -(-len(x) // period)
    padded = np.zeros(reps * period)
    padded[:len(x)] = x
    folded: np.ndarray = padded.reshape(reps, period).sum(axis=0)
    return folded


def _peaks(score: np.ndarray, count: int, guard: int) -> list[int]:
    out: list[int] = []
    s = score.copy()
    for _ in range(count):
        i = int(np.argmax(s))
        out.append(i)
        idx = np.arange(i - guard, i + guard + 1) % len(s)
        s[idx] = -np.inf
    return out


def detect(samples: np.ndarray, rate: int, key: bytes) -> Detection | None:
    """The payload marked under `key` in `samples` (float, (frames,) or (frames, channels)), or None."""
    keyed = _keyed(bytes(key))
    period = FRAME_CHIPS * DETECT_RATE_HZ // CHIP_RATE_HZ
    per_symbol = period // FRAME_SYMBOLS
    x = _mono_16k(samples, rate)
    if len(x) < per_symbol * 8 or not np.any(x):
        return None
    folded = _fold(_flatten(x), period)
    base = _carrier(keyed.chips, DETECT_RATE_HZ, 0, period)  # the unmodulated carrier, one frame
    sync_frame = np.zeros(FRAME_SYMBOLS)
    sync_frame[keyed.sync_at] = keyed.sync
    sync_ref = base * np.repeat(sync_frame, per_symbol)
    # corr[tau] = sum_m folded[m] * sync_ref[(m + tau) mod period]: sample m is frame position m + tau
    corr = np.fft.irfft(np.conj(np.fft.rfft(folded)) * np.fft.rfft(sync_ref), period)
    spread = np.median(np.abs(corr)) / 0.6745 + 1e-30
    for tau in _peaks(corr, MAX_CANDIDATES, guard=DETECT_RATE_HZ // 1000):
        aligned = np.roll(folded, tau)  # aligned[p] = folded[p - tau]
        soft = (aligned * base).reshape(FRAME_SYMBOLS, per_symbol).sum(axis=1)
        coded = soft[keyed.order]
        info = _viterbi(coded)
        value = int("".join(map(str, info.tolist())), 2)
        payload, mac = value >> MAC_BITS, value & ((1 << MAC_BITS) - 1)
        if _mac(keyed.mac_key, payload) != mac:
            continue
        expected = 1.0 - 2.0 * _conv_encode(info)
        confidence = float(np.dot(expected, coded) / (np.linalg.norm(coded) * np.sqrt(len(coded)) + 1e-30))
        return Detection(payload=payload, sync_score=float(corr[tau] / spread), confidence=confidence)
    return None


# -- one mark per fetch ------------------------------------------------------------------------

WATERMARK_ID_PREFIX = "wm_"


def watermark_id(payload: int) -> str:
    """The id as recorded in the clip.fetch entry and the watermarks table: "wm_" and 10 hex digits."""
    return f"{WATERMARK_ID_PREFIX}{payload:0{ID_BITS // 4}x}"


def payload_of(watermark_id: str) -> int:
    if not watermark_id.startswith(WATERMARK_ID_PREFIX) or len(watermark_id) != len(WATERMARK_ID_PREFIX) + ID_BITS // 4:
        raise ValueError("watermark id must be 'wm_' and 10 hex digits")
    return int(watermark_id[len(WATERMARK_ID_PREFIX):], 16)


class ForensicWatermarks:
    """The `WatermarkSource` of FetchClip: a fresh random id per fetch, embedded under the service key."""

    def __init__(self, key: bytes, *, randbits: Callable[[int], int] = secrets.randbits) -> None:
        _keyed(bytes(key))  # fail at start-up, not at the first fetch
        self._key, self._randbits = bytes(key), randbits

    def __repr__(self) -> str:
        return "ForensicWatermarks(<key hidden>)"

    def for_fetch(self, *, grant_id: str, reviewer_id: str) -> WatermarkPlan:
        payload = self._randbits(ID_BITS)
        key = self._key
        return WatermarkPlan(watermark_id(payload),
                             lambda rate, channels: WatermarkEmbedder(key, payload, rate, channels))

    def detect(self, samples: np.ndarray, rate: int) -> Detection | None:
        return detect(samples, rate, self._key)

    def identify(self, data: bytes) -> Detection | None:
        """The mark in an audio file (WAV, FLAC, Ogg Vorbis or Opus); `UnsupportedAudio` if it does not decode."""
        samples, rate = read_audio(data)
        return self.detect(samples, rate)


def read_audio(data: bytes) -> tuple[np.ndarray, int]:
    """At most MAX_DETECT_S (and MAX_DETECT_SAMPLES) of an audio file, mixed to mono, as float32 (frames, 1), and
    its rate.

    Read in slices of at most `READ_SLICE_SAMPLES` and mixed down as it goes: a hostile header's claimed
    length, rate or channel count (up to 1024 in a WAV) sizes nothing; a rate above the decoder's
    `MAX_RATE_HZ` is refused (2**31 Hz would size the resampler's filter in hundreds of GB)."""
    import soundfile  # the audio extra

    from clipstore.audio.codecs import MAX_RATE_HZ

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sound:
            rate, channels = int(sound.samplerate), int(sound.channels)
            if not 0 < rate <= MAX_RATE_HZ or channels <= 0:
                raise UnsupportedAudio(f"the file's header claims {rate} Hz; at most {MAX_RATE_HZ} Hz is read")
            left, mono = min(int(MAX_DETECT_S * rate), MAX_DETECT_SAMPLES // channels), []
            while left > 0:
                block = sound.read(min(left, max(1, READ_SLICE_SAMPLES // channels)), dtype="float32",
                                   always_2d=True)
                if not len(block):
                    break
                mono.append(block.mean(axis=1, dtype=np.float32))
                left -= len(block)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise UnsupportedAudio("the file is not WAV, FLAC, Ogg Vorbis or Ogg Opus audio") from exc
    samples = np.concatenate(mono) if mono else np.zeros(0, dtype=np.float32)
    return samples.reshape(-1, 1), rate
