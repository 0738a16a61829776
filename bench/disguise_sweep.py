"""Sweep of voice-disguise parameters (not a test): speaker similarity against intelligibility, per setting.

  python bench/disguise_sweep.py [--rhyme-sets 28] [--draws 3] [--only NAME ...]

For each candidate DisguisePolicy (pitch ratio range, direction, formant
exponent, formant knee), and the deployable POLICIES last, it prints
one row: the share of disguised clips whose MFCC speaker similarity to their
original falls below the equal-error threshold (bench/audio.py's baseline, 10
espeak-ng voices, --draws disguised clips per voice), the rhyme-test accuracy
kept (disguised / original, pocketsphinx, 4 voices x 6 x --rhyme-sets words)
and the closed-vocabulary WER. Ratios are drawn per utterance as FetchClip
draws them per fetch; every candidate gets the same seed, so rows differ by
their parameters, not their luck. Goal (issue 18 and docs/voice-disguise.md):
similarity pass rate >= 0.9 and rhyme accuracy kept >= 0.8.

Setup as for bench/audio.py (espeak-ng, the audio-bench extra).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.audio import (  # noqa: E402
    CARRIER,
    INTELLIGIBILITY_VOICES,
    RATE,
    RHYME_KEPT_THRESHOLD,
    RHYME_SETS,
    SENTENCES,
    VOICES,
    Recogniser,
    equal_error_threshold,
    say,
    words_error_rate,
)
from clipstore.audio.disguise import POLICIES, DisguisePolicy  # noqa: E402
from clipstore.audio.transform import Pipeline  # noqa: E402
from tests.audio_measures import SpeakerSpace  # noqa: E402

SIMILARITY_PASS = 0.9  # share of disguised clips below the same-speaker threshold


def candidate(name: str, pitch: tuple[float, float], formant_exponent: float,
              direction: Literal["both", "down", "up"] = "both", formant_above_hz: float = 0.0) -> DisguisePolicy:
    return DisguisePolicy(name=name, pitch_ratios=pitch, formant_exponent=formant_exponent,
                          formant_above_hz=formant_above_hz, direction=direction)


CANDIDATES = [
    candidate("former", (1.25, 1.4), 0.75),
    candidate("p1.25-1.4_f0.5", (1.25, 1.4), 0.5),
    candidate("p1.25-1.4_f0.25", (1.25, 1.4), 0.25),
    candidate("p1.25-1.4_f0", (1.25, 1.4), 0.0),
    candidate("p1.15-1.25_f0.75", (1.15, 1.25), 0.75),
    candidate("p1.15-1.25_f0.5", (1.15, 1.25), 0.5),
    candidate("p1.1-1.2_f1", (1.1, 1.2), 1.0),
    candidate("p1.25-1.4_f0.75_up", (1.25, 1.4), 0.75, "up"),
    candidate("p1.25-1.4_f0.75_down", (1.25, 1.4), 0.75, "down"),
    candidate("p1.25-1.4_f0.5_up", (1.25, 1.4), 0.5, "up"),
    candidate("p1.25-1.4_f0.5_down", (1.25, 1.4), 0.5, "down"),
    candidate("p1.4-1.6_f0.25", (1.4, 1.6), 0.25),
    candidate("p1.4-1.6_f0", (1.4, 1.6), 0.0),
    candidate("p1.25-1.4_f0.75_above1500", (1.25, 1.4), 0.75, formant_above_hz=1500),
    candidate("p1.25-1.4_f1_above1500", (1.25, 1.4), 1.0, formant_above_hz=1500),
    candidate("p1.25-1.4_f1_above2500", (1.25, 1.4), 1.0, formant_above_hz=2500),
    candidate("p1.25-1.4_f0.75_above1000", (1.25, 1.4), 0.75, formant_above_hz=1000),
    candidate("p1.25-1.4_f1.25_above2500", (1.25, 1.4), 1.25, formant_above_hz=2500),
    candidate("p1.25-1.4_f1.5_above3000", (1.25, 1.4), 1.5, formant_above_hz=3000),
    candidate("p1.4-1.6_f1_above2500", (1.4, 1.6), 1.0, formant_above_hz=2500),
    candidate("p1.4-1.6_f0.75_above2000", (1.4, 1.6), 0.75, formant_above_hz=2000),
    candidate("p1.3-1.5_f1_above2500", (1.3, 1.5), 1.0, formant_above_hz=2500),
    candidate("p1.25-1.4_f0.25_down", (1.25, 1.4), 0.25, "down"),
    candidate("p1.25-1.4_f1_above2500_down", (1.25, 1.4), 1.0, "down", 2500),
    candidate("p1.15-1.3_f0.5_down", (1.15, 1.3), 0.5, "down"),
    candidate("p1.25-1.4_f0_down", (1.25, 1.4), 0.0, "down"),
    candidate("p1.15-1.3_f0.75_down", (1.15, 1.3), 0.75, "down"),
    *POLICIES.values(),  # what a deployment can name
]


def shift(x: np.ndarray, c: DisguisePolicy, rng: random.Random) -> np.ndarray:
    """`x` disguised by the policy with ratios drawn from `rng`, as FetchClip would (one draw per clip)."""
    t = c.transform(rate=RATE, channels=1, rng=rng)
    block = x.reshape(-1, 1)
    steps = (block[i:i + RATE // 2] for i in range(0, len(block), RATE // 2))
    return np.concatenate(list(Pipeline([t]).run(steps)))[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rhyme-sets", type=int, default=len(RHYME_SETS))
    parser.add_argument("--draws", type=int, default=3, help="disguised clips per voice for the similarity")
    parser.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    parser.add_argument("--seed", type=int, default=18)
    args = parser.parse_args()
    candidates = [c for c in CANDIDATES if not args.only or c.name in args.only]
    print(f"load_average_1min={os.getloadavg()[0]:.2f}", flush=True)

    takes = {(v, t): np.concatenate([say(s, v, t) for s in SENTENCES[:3]]) for v in VOICES[:10] for t in (0, 1)}
    space = SpeakerSpace(list(takes.values()), RATE)
    voices = VOICES[:10]
    same = [space.similarity(takes[v, 0], takes[v, 1]) for v in voices]
    different = [space.similarity(takes[v, 0], takes[u, 0]) for v in voices for u in voices if u != v]
    threshold = equal_error_threshold(same, different)
    print(f"similarity_threshold_eer={threshold:.3f}", flush=True)

    recogniser = Recogniser(SENTENCES)
    rhyme = [(i, word, say(CARRIER.format(word), voice)) for voice in INTELLIGIBILITY_VOICES
             for i, words in enumerate(RHYME_SETS[:args.rhyme_sets]) for word in words.split()]
    sentences = [(s, say(s, voice)) for voice in INTELLIGIBILITY_VOICES for s in SENTENCES]

    def rhyme_accuracy(version: Callable[[np.ndarray], np.ndarray]) -> float:
        return sum(recogniser.rhyme(version(x), i) == w for i, w, x in rhyme) / len(rhyme)

    def wer(version: Callable[[np.ndarray], np.ndarray]) -> float:
        counts = [words_error_rate(s, recogniser.words(version(x))) for s, x in sentences]
        return sum(c[0] for c in counts) / sum(c[1] for c in counts)

    base_acc, base_wer = rhyme_accuracy(lambda x: x), wer(lambda x: x)
    print(f"rhyme_accuracy_original={base_acc:.3f} wer_original={base_wer:.3f} words={len(rhyme)}", flush=True)
    header = ("| candidate | pitch ratio | direction | formants | similarity below threshold | "
              "similarity mean | rhyme accuracy | kept | WER | both goals |")
    print(header)
    print("|---" * 10 + "|")
    for c in candidates:
        rng = random.Random(args.seed)
        scores = [space.similarity(takes[v, 0], shift(takes[v, 0], c, rng))
                  for v in voices for _ in range(args.draws)]
        passed = sum(s < threshold for s in scores) / len(scores)
        rng = random.Random(args.seed)
        acc = rhyme_accuracy(partial(shift, c=c, rng=rng))
        rng = random.Random(args.seed)
        w = wer(partial(shift, c=c, rng=rng))
        kept = acc / base_acc
        ok = passed >= SIMILARITY_PASS and kept >= RHYME_KEPT_THRESHOLD
        knee = f" above {c.formant_above_hz:.0f} Hz" if c.formant_above_hz else ""
        print(f"| {c.name} | {c.pitch_ratios[0]}-{c.pitch_ratios[1]} | {c.direction} | r^{c.formant_exponent}{knee} | "
              f"{passed:.2f} | "
              f"{statistics.mean(scores):.3f} | {acc:.3f} | {kept:.2f} | {w:.3f} | {'yes' if ok else 'no'} |",
              flush=True)


if __name__ == "__main__":
    main()
