"""Forensic watermark benchmark (not a test): robustness, false identification, inaudibility, cost.

  python bench/watermark.py [--trials 40] [--fp-trials 200] [--big-mib 50]

Robustness: each trial marks 10 s of speech-like audio (tests/audio_speech.py,
speakers a/b/c, a fresh key and a random 40-bit id per trial) and attacks it;
`recovered_<attack>` is the share of trials whose detection returns exactly
that id, `wrong_<attack>` the count that returned another id (a false
identification). Attacks (issue 18): Ogg Vorbis (libsndfile's default quality
and compression_level 0.9, its lowest) and Ogg Opus re-encodes; resampling
44.1 kHz -> 16 kHz and 16 kHz -> 44.1 kHz; volume -6 / +6 dB; a second trimmed
from each end; white noise at 20 dB SNR; and all of them at once (trim, -6 dB,
44.1 -> 16 kHz, Vorbis, noise).

False identification: unmarked speech, white noise, and marked audio read
under a wrong key; the design bound is 8 * 2^-26 per file (docs/watermark.md).

Inaudibility: SNR of the mark against the host (whole clip) and segmental SNR
(20 ms frames with speech, each clamped to [-10, 35] dB, averaged), and the
same for a Vorbis encode at default quality, the peer: the mark is quieter
than what a lossy codec already changes.

Cost: CPU seconds (process time) to embed into and detect in 10 s at 16 kHz
mono and 44.1 kHz stereo; the peer is soundfile's Ogg Vorbis encode of the same
audio. Then FetchClip's whole audio path (decode WAV, disguise + watermark,
encode WAV) over 10 s, against decode + encode alone, and the peak RSS growth
while a --big-mib WAV clip streams through the watermark.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import soundfile  # noqa: E402

from clipstore.audio import watermark as wm  # noqa: E402
from clipstore.audio.fetch import FetchAudio, FetchPlan, WatermarkPlan  # noqa: E402
from tests.audio_attacks import gain, noise, ogg, resample  # noqa: E402
from tests.audio_speech import encoded, speech  # noqa: E402

SECONDS = 10.0


Attack = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, int]]
ATTACKS: dict[str, tuple[int, Attack]] = {  # name -> (rate marked at, attack -> (audio, rate))
    "none": (16000, lambda x, rng: (x, 16000)),
    "vorbis": (16000, lambda x, rng: (ogg(x, 16000, "VORBIS"), 16000)),
    "vorbis_lowest": (16000, lambda x, rng: (ogg(x, 16000, "VORBIS", 0.9), 16000)),
    "opus": (16000, lambda x, rng: (ogg(x, 16000, "OPUS"), 16000)),
    "resample_44k_to_16k": (44100, lambda x, rng: (resample(x, 44100, 16000), 16000)),
    "resample_16k_to_44k": (16000, lambda x, rng: (resample(x, 16000, 44100), 44100)),
    "volume_minus_6db": (16000, lambda x, rng: (gain(x, -6), 16000)),
    "volume_plus_6db": (16000, lambda x, rng: (gain(x, 6), 16000)),
    "trim_1s_each_end": (16000, lambda x, rng: (x[16000:-16000], 16000)),
    "noise_20db": (16000, lambda x, rng: (noise(x, 20, rng), 16000)),
    "combined": (44100, lambda x, rng: (noise(ogg(resample(gain(x[44100:-44100], -6), 44100, 16000), 16000,
                                                   "VORBIS"), 20, rng), 16000)),
}


def host(trial: int, rate: int, channels: int = 1) -> np.ndarray:
    return speech("abc"[trial % 3], SECONDS, rate=rate, channels=channels, seed=1000 + trial)


def robustness(trials: int) -> None:
    for name, (rate, attack) in ATTACKS.items():
        ok = wrong = 0
        for t in range(trials):
            rng = np.random.default_rng(t)
            key, payload = rng.bytes(32), int(rng.integers(0, 1 << wm.ID_BITS))
            marked = wm.WatermarkEmbedder(key, payload, rate, 1).process(host(t, rate), 0)
            audio, at = attack(marked, rng)
            found = wm.detect(audio, at, key)
            ok += found is not None and found.payload == payload
            wrong += found is not None and found.payload != payload
        print(f"recovered_{name}={ok / trials:.3f}")
        print(f"wrong_{name}={wrong}")
        sys.stdout.flush()
    print(f"robustness_trials_per_attack={trials}")


def false_identification(trials: int) -> None:
    hits = {"unmarked_speech": 0, "white_noise": 0, "wrong_key": 0}
    for t in range(trials):
        rng = np.random.default_rng(10_000 + t)
        key = rng.bytes(32)
        hits["unmarked_speech"] += wm.detect(host(t, 16000), 16000, key) is not None
        hits["white_noise"] += wm.detect(rng.normal(0, 0.1, (int(SECONDS * 16000), 1)), 16000, key) is not None
        marked = wm.WatermarkEmbedder(rng.bytes(32), 1, 16000, 1).process(host(t, 16000), 0)
        hits["wrong_key"] += wm.detect(marked, 16000, key) is not None
    for name, count in hits.items():
        print(f"false_identifications_{name}={count}/{trials}")
    print(f"false_identification_bound_per_file={wm.MAX_CANDIDATES * 2.0 ** -wm.MAC_BITS:.2e}")


def _snr(clean: np.ndarray, other: np.ndarray, rate: int) -> tuple[float, float]:
    x, d = clean.astype(np.float64)[:, 0], (other - clean).astype(np.float64)[:, 0]
    snr = 10 * np.log10(np.sum(x ** 2) / np.sum(d ** 2))
    frame = rate // 50
    n = len(x) // frame
    xf, df = x[:n * frame].reshape(n, frame), d[:n * frame].reshape(n, frame)
    px, pd = np.sum(xf ** 2, axis=1), np.sum(df ** 2, axis=1) + 1e-20
    active = px > 1e-4 * np.max(px)
    seg = np.clip(10 * np.log10(px[active] / pd[active]), -10, 35)
    return float(snr), float(np.mean(seg))


def inaudibility(trials: int) -> None:
    marks, codecs = [], []
    for t in range(trials):
        clean = host(t, 16000)
        marked = wm.WatermarkEmbedder(bytes(32), t, 16000, 1).process(clean, 0)
        marks.append(_snr(clean, marked, 16000))
        coded = ogg(clean, 16000, "VORBIS")[:len(clean)]
        codecs.append(_snr(clean, coded, 16000))
    m, c = np.mean(marks, axis=0), np.mean(codecs, axis=0)
    print(f"mark_snr_db={m[0]:.1f}")
    print(f"mark_segmental_snr_db={m[1]:.1f}")
    print(f"vorbis_snr_db={c[0]:.1f}")
    print(f"vorbis_segmental_snr_db={c[1]:.1f}")
    print(f"alpha_db={20 * np.log10(wm.ALPHA):.1f}")


def _cpu(fn: Callable[[], object], repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def cost() -> None:
    key = bytes(range(32))
    for rate, channels in ((16000, 1), (44100, 2)):
        clean = host(0, rate, channels)
        marked = wm.WatermarkEmbedder(key, 5, rate, channels).process(clean, 0)
        embed = _cpu(lambda c=clean, r=rate, ch=channels: wm.WatermarkEmbedder(key, 5, r, ch).process(c, 0))
        detect = _cpu(lambda m=marked, r=rate: wm.detect(m, r, key))
        vorbis = _cpu(lambda c=clean, r=rate: soundfile.write(io.BytesIO(), c, r, format="OGG", subtype="VORBIS"))
        tag = f"{rate // 1000}k_{channels}ch"
        print(f"embed_cpu_ms_per_10s_{tag}={embed * 1000:.1f}")
        print(f"detect_cpu_ms_per_10s_{tag}={detect * 1000:.1f}")
        print(f"vorbis_encode_cpu_ms_per_10s_{tag}={vorbis * 1000:.1f}")
        print(f"embed_vs_vorbis_encode_{tag}={embed / vorbis:.2f}")

    # FetchClip's audio path over a 10 s WAV: decode, transforms, encode
    wav = encoded(host(0, 16000), 16000, "audio/wav")
    mark = WatermarkPlan("wm_0000000005", lambda r, ch: wm.WatermarkEmbedder(key, 5, r, ch))

    def fetch(plan: FetchPlan) -> None:
        for _ in FetchAudio.apply(plan, "audio/wav", lambda: iter([wav]), size_bytes=len(wav)):
            pass

    plain = _cpu(lambda: fetch(FetchPlan("pitch_formant", None, 1)))  # the codecs alone cost nothing here
    both = _cpu(lambda: fetch(FetchPlan("pitch_formant", mark, 1)))
    mark_only = _cpu(lambda: fetch(FetchPlan("off", mark, 1)))
    print(f"fetch_audio_cpu_ms_per_10s_wav_watermark={mark_only * 1000:.1f}")
    print(f"fetch_audio_cpu_ms_per_10s_wav_disguise={plain * 1000:.1f}")
    print(f"fetch_audio_cpu_ms_per_10s_wav_disguise_and_watermark={both * 1000:.1f}")
    print(f"watermark_share_of_fetch_audio_cpu={(both - plain) / both:.2f}")


def memory(mib: int) -> None:
    rate = 16000
    frames = (mib << 20) // 2
    one = host(0, rate)
    header = encoded(one[:0], rate, "audio/wav")[:44]
    import struct
    header = header[:4] + struct.pack("<I", 36 + frames * 2) + header[8:40] + struct.pack("<I", frames * 2)
    pcm = np.clip(np.round(one[:, 0] * 32767), -32768, 32767).astype("<i2").tobytes()

    def plaintext() -> Iterator[bytes]:
        yield header
        sent = 0
        while sent < frames * 2:
            part = pcm[:min(len(pcm), frames * 2 - sent)]
            for i in range(0, len(part), 65536):
                yield part[i:i + 65536]
            sent += len(part)

    key = bytes(range(32))
    plan = FetchPlan("off", WatermarkPlan("wm_0000000005", lambda r, ch: wm.WatermarkEmbedder(key, 5, r, ch)), 1)
    proc = psutil.Process()
    base, peak, done = proc.memory_info().rss, [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start, out = time.process_time(), 0
    for chunk in FetchAudio.apply(plan, "audio/wav", plaintext, size_bytes=len(header) + frames * 2):
        out += len(chunk)
    cpu = time.process_time() - start
    done.set()
    watcher.join()
    print(f"big_clip_mib={mib}")
    print(f"big_clip_out_bytes={out}")
    print(f"big_clip_watermark_cpu_s={cpu:.2f}")
    print(f"big_clip_peak_rss_growth_mib={(peak[0] - base) / (1 << 20):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--fp-trials", type=int, default=200)
    parser.add_argument("--big-mib", type=int, default=50)
    parser.add_argument("--only", choices=["robustness", "false", "inaudibility", "cost", "memory"])
    args = parser.parse_args()
    random.seed(0)
    if args.only in (None, "inaudibility"):
        inaudibility(min(args.trials, 20))
    if args.only in (None, "cost"):
        cost()
    if args.only in (None, "memory"):
        memory(args.big_mib)
    if args.only in (None, "false"):
        false_identification(args.fp_trials)
    if args.only in (None, "robustness"):
        robustness(args.trials)


if __name__ == "__main__":
    main()
