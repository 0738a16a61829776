"""Audio benchmark (not a test): what FetchClip's voice disguise costs, and what it does to voices and words.

  python bench/audio.py [--fetches 20] [--voices 10] [--no-cpu] [--no-recogniser] [--rhyme-sets 28]

1. Server CPU (issue 18's budget: both transforms add < 200 ms per 10 s clip).
   Two `clipstore serve` subprocesses, one with no transform (`review.disguise
   = off`, `review.watermark = off`), one with both (`pitch_formant`, `on`),
   each holding --fetches + 1 copies of the same 10 s of speech (espeak-ng, or
   the test generator's without it) in every content type: 16 kHz mono, Opus at
   48 kHz. One reviewer fetches them all; the server process's CPU time
   (psutil, user + system) is read before and after each FetchClip (the first
   of each type is a warm-up), and the means compared per type:
   `fetch_added_cpu_ms_<type>_<rate>` (decode + disguise + watermark + encode),
   `fetch_added_cpu_ms_worst` against `fetch_added_cpu_budget_ms`. Then the
   same path in-process, stage by stage (best of 3): codec alone (decode +
   encode), disguise, watermark, both: `fetch_audio_cpu_ms_<stage>_<type>_<rate>_<ch>`,
   also at 48 kHz and in stereo. With --big-opus-mib 50: a 50 MiB Ogg Opus
   clip streamed through all of it, peak RSS growth and CPU.
2. Speaker similarity (docs/voice-disguise.md): the MFCC-statistics cosine of
   tests/audio_measures.py over espeak-ng voices (the same three sentences per
   voice; a second take of a voice is the same text at another rate and pitch).
   The threshold is the equal-error point between same-voice and
   different-voice pairs in this run; `disguised_below_threshold` is the share
   of disguised clips scoring below it against their original.
3. Intelligibility, with pocketsphinx (its bundled en-US model), closed
   vocabulary, so that clean speech scores well above chance and the figure
   can move: a rhyme test in the manner of the Modified Rhyme Test (28 sets of
   six words differing in one consonant, "would you write ___ now", one JSGF
   grammar per set: a six-way forced choice, chance 1/6), and the word error
   rate over the ten sentences with a uniform unigram model of their 60 words.
   Four espeak-ng voices (INTELLIGIBILITY_VOICES); original, disguised, and
   each part of the disguise alone (the vocoder at ratio 1.01, pitch only,
   formants only). `intelligible_by_rhyme_test` says whether the disguised
   accuracy keeps RHYME_KEPT_THRESHOLD (80 %) of the original's.

Setup (outside CI; no network beyond the package registries):
  apt-get install espeak-ng                      # Debian: the voices
  pip install -e '.[audio,audio-bench]'          # pocketsphinx and its en-US model
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import soundfile  # noqa: E402

from bench._servers import clipstore_server, put_requests  # noqa: E402
from bench.review import enrol  # noqa: E402
from clipstore.audio.codecs import CONTENT_TYPES, decode, encode  # noqa: E402
from clipstore.audio.disguise import POLICIES, PitchFormantShift  # noqa: E402
from clipstore.audio.fetch import FetchAudio, FetchPlan  # noqa: E402
from clipstore.audio.transform import Pipeline  # noqa: E402
from clipstore.audio.watermark import ForensicWatermarks  # noqa: E402
from clipstore.v1 import account_pb2, account_pb2_grpc, clip_pb2, clip_pb2_grpc, review_pb2  # noqa: E402
from tests.audio_measures import SpeakerSpace  # noqa: E402
from tests.audio_speech import chunks, encoded, speech  # noqa: E402

RATE = 16000
CLIP_S = 10.0
BUDGET_MS = 200  # issue 18: both transforms on a 10 s clip add less than this much server CPU
SERVER_RATES = {"audio/opus": 48000}  # Opus at its native rate (the costliest); the others at 16 kHz
IN_PROCESS = [(t, RATE, 1) for t in sorted(CONTENT_TYPES)] + [
    ("audio/opus", 48000, 1), ("audio/wav", 48000, 1), ("audio/opus", 48000, 2), ("audio/ogg", 48000, 2)]
# Harvard sentences (IEEE 1969), the usual intelligibility material, plus assistant-style requests.
SENTENCES = [
    "the birch canoe slid on the smooth planks",
    "glue the sheet to the dark blue background",
    "it is easy to tell the depth of a well",
    "these days a chicken leg is a rare dish",
    "rice is often served in round bowls",
    "the juice of lemons makes fine punch",
    "what is the weather like in paris tomorrow",
    "open the window and turn on the lights",
    "set a timer for ten minutes",
    "call my sister and tell her i am late",
]
VOICES = ["en-us", "en-us+m1", "en-us+m3", "en-us+m5", "en-us+m7", "en-us+f1", "en-us+f2", "en-us+f3",
          "en-us+f4", "en-us+klatt4", "en-us+klatt2", "en-us+m2"]
TAKES = [("150", "50"), ("170", "62")]  # (words per minute, pitch 0-99): one voice, two deliveries


def resample(x: np.ndarray, rate: int, to: int) -> np.ndarray:
    n = int(round(len(x) * to / rate))
    return (np.fft.irfft(np.fft.rfft(x)[:n // 2 + 1], n) * (n / len(x))).astype(np.float32)


def say(text: str, voice: str, take: int = 0) -> np.ndarray:
    wpm, pitch = TAKES[take]
    out = subprocess.run(["espeak-ng", "-v", voice, "-s", wpm, "-p", pitch, "--stdout", text],
                         capture_output=True, check=True).stdout
    x, rate = soundfile.read(io.BytesIO(out), dtype="float32")
    return resample(x, rate, RATE)


def disguise(x: np.ndarray, rng: random.Random) -> np.ndarray:
    plan = FetchPlan("pitch_formant", None, rng.getrandbits(63))
    data = encoded(x.reshape(-1, 1), RATE, "audio/pcm")
    out = b"".join(FetchAudio.apply(plan, "audio/pcm", lambda: iter(chunks(data)), size_bytes=len(data)))
    return np.frombuffer(out, "<i2").astype(np.float32) / 32768.0


def shifted(x: np.ndarray, pitch: float, formant: float) -> np.ndarray:
    shift = PitchFormantShift(rate=RATE, channels=1, pitch_ratio=pitch, formant_ratio=formant)
    block = x.reshape(-1, 1)
    steps = (block[i:i + RATE // 2] for i in range(0, len(block), RATE // 2))
    return np.concatenate(list(Pipeline([shift]).run(steps)))[:, 0]


def ten_seconds(espeak: bool) -> np.ndarray:
    if not espeak:
        return speech("a", CLIP_S)
    parts, total = [], 0
    for sentence in SENTENCES * 3:
        parts.append(np.concatenate([say(sentence, "en-us+m3"), np.zeros(RATE // 5, np.float32)]))
        total += len(parts[-1])
        if total >= CLIP_S * RATE:
            break
    return np.concatenate(parts)[:int(CLIP_S * RATE)].reshape(-1, 1)


# -- 1. CPU ---------------------------------------------------------------------------------------------------
def clip_for(content_type: str, clip: np.ndarray, rate: int) -> bytes:
    """`clip` (16 kHz, (frames, channels)) at `rate`, as a device would upload it."""
    x = np.stack([resample(c, RATE, rate) for c in clip.T], axis=1) if rate != RATE else clip
    return encoded(x, rate, content_type)


def fetch_cpu_ms(settings: dict[str, str], clips: dict[str, bytes], fetches: int) -> dict[str, float]:
    """Mean server CPU per FetchClip, per content type: `fetches` clips of each type in one server."""
    env = {"CLIPSTORE_REVIEW_SAMPLE_RATE": "1.0", **settings}
    with clipstore_server(**env) as server, grpc.insecure_channel(server.address) as channel:
        ingest = (("authorization", f"Bearer {server.keys['ingest']}"),)
        account_pb2_grpc.AccountServiceStub(channel).SetReviewPreference(account_pb2.SetReviewPreferenceRequest(
            account_id="bench-account", allow_human_review=True), metadata=ingest)
        put = clip_pb2_grpc.ClipServiceStub(channel)
        for content_type, data in clips.items():
            for i in range(fetches + 1):  # the first fetch of each type warms imports and caches
                meta = clip_pb2.ClipMetadata(identity=clip_pb2.ClipIdentity(account_id="bench-account",
                                                                            device_serial="S1"),
                                             locale="en-US", content_type=content_type, wake_word_detected=True,
                                             idempotency_key=f"{content_type}-{i}", duration_ms=int(CLIP_S * 1000))
                put.PutClip(put_requests(meta, chunks(data)), metadata=ingest)
        stub, md, token = enrol(channel, (("authorization", f"Bearer {server.keys['admin']}"),), 1)[0]
        proc = psutil.Process(server.proc.pid)
        costs: dict[str, list[float]] = {t: [] for t in clips}
        warm: set[str] = set()
        for _ in range(len(clips) * (fetches + 1)):
            a = stub.NextAssignment(review_pb2.NextAssignmentRequest(session_token=token), metadata=md)
            g = stub.RequestGrant(review_pb2.RequestGrantRequest(session_token=token,
                                                                 assignment_id=a.assignment_id), metadata=md)
            time.sleep(0.2)  # let the grant's commit and any checkpoint work settle
            before = sum(proc.cpu_times()[:2])
            got = sum(len(m.audio_chunk) for m in stub.FetchClip(review_pb2.FetchClipRequest(
                session_token=token, grant=g.grant, review_clip_id=g.review_clip_id), metadata=md))
            after = sum(proc.cpu_times()[:2])
            assert got > 0
            if a.clip.content_type in warm:
                costs[a.clip.content_type].append((after - before) * 1000)
            warm.add(a.clip.content_type)
        # the counters tick every 10 ms: a mean of many fetches, not a median
        return {t: statistics.mean(c) for t, c in costs.items() if c}


def fetch_audio_cpu_ms(data: bytes, content_type: str, plan: FetchPlan, repeats: int = 3) -> float:
    """Decode, transforms and encode of one clip in this process (what FetchClip adds), best of `repeats`."""
    costs = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in FetchAudio.apply(plan, content_type, lambda: iter(chunks(data)), size_bytes=len(data)):
            pass
        costs.append((time.process_time() - start) * 1000)
    return min(costs)


def cpu(clip: np.ndarray, fetches: int) -> None:
    """Server CPU added by disguise + watermark per FetchClip of each content type, then the same path
    in-process, stage by stage."""
    server_clips = {t: clip_for(t, clip, SERVER_RATES.get(t, RATE)) for t in sorted(CONTENT_TYPES)}
    plain = fetch_cpu_ms({"CLIPSTORE_REVIEW_DISGUISE": "off", "CLIPSTORE_REVIEW_WATERMARK": "off"},
                         server_clips, fetches)
    both = fetch_cpu_ms({"CLIPSTORE_REVIEW_DISGUISE": "pitch_formant", "CLIPSTORE_REVIEW_WATERMARK": "on"},
                        server_clips, fetches)
    worst = 0.0
    for content_type in sorted(server_clips):
        name = f"{content_type.split('/')[1].lower()}_{SERVER_RATES.get(content_type, RATE) // 1000}k"
        added = both[content_type] - plain[content_type]
        worst = max(worst, added)
        print(f"fetch_cpu_ms_plain_{name}={plain[content_type]:.1f}")
        print(f"fetch_cpu_ms_disguise_watermark_{name}={both[content_type]:.1f}")
        print(f"fetch_added_cpu_ms_{name}={added:.1f}")
    print(f"fetch_added_cpu_ms_worst={worst:.1f}")
    print(f"fetch_added_cpu_budget_ms={BUDGET_MS}")
    print(f"fetch_added_cpu_within_budget={'yes' if worst < BUDGET_MS else 'no'}")
    sys.stdout.flush()

    marks = ForensicWatermarks(bytes(range(32)))
    for content_type, rate, channels in IN_PROCESS:
        name = f"{content_type.split('/')[1].lower()}_{rate // 1000}k_{channels}ch"
        x = np.repeat(clip, channels, axis=1) * np.linspace(1.0, 0.8, channels, dtype=np.float32)
        data = clip_for(content_type, x, rate)
        print(f"fetch_audio_cpu_ms_codec_{name}={codec_cpu_ms(data, content_type):.1f}")
        stages = {
            "disguise": FetchPlan("pitch_formant", None, 1),
            "watermark": FetchPlan("off", marks.for_fetch(grant_id="g", reviewer_id="r"), 1),
            "both": FetchPlan("pitch_formant", marks.for_fetch(grant_id="g", reviewer_id="r"), 1),
        }
        for stage, plan in stages.items():
            print(f"fetch_audio_cpu_ms_{stage}_{name}={fetch_audio_cpu_ms(data, content_type, plan):.1f}")
        sys.stdout.flush()


def codec_cpu_ms(data: bytes, content_type: str, repeats: int = 3) -> float:
    costs = []
    for _ in range(repeats):
        start = time.process_time()
        decoded = decode(content_type, lambda: iter(chunks(data)), size_bytes=len(data))
        for _ in encode(decoded.format, decoded.blocks, frames=decoded.frames):
            pass
        costs.append((time.process_time() - start) * 1000)
    return min(costs)


# -- 2. and 3. ------------------------------------------------------------------------------------------------
def equal_error_threshold(same: list[float], different: list[float]) -> float:
    candidates = sorted(same + different)
    def gap(t: float) -> float:
        false_reject = sum(s < t for s in same) / len(same)
        false_accept = sum(d >= t for d in different) / len(different)
        return abs(false_reject - false_accept)
    return min(candidates, key=gap)


def words_error_rate(reference: str, hypothesis: str) -> tuple[int, int]:
    ref, hyp = reference.split(), hypothesis.split()
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def big_opus_memory(mib: int) -> None:
    """A `mib` MiB Ogg Opus clip (48 kHz mono at 256 kbit/s, written by the service's own encoder) streamed
    through decode, disguise, watermark and encode: peak RSS growth (sampled every 10 ms) and CPU."""
    import threading

    from clipstore.audio import codecs

    one = speech("a", 10.0, rate=48000)
    fmt = codecs.AudioFormat(rate=48000, channels=1, subtype="OPUS", container="OGG", bitrate=256_000)
    saved = codecs.OPUS_BITRATE_PER_CHANNEL
    codecs.OPUS_BITRATE_PER_CHANNEL = (24_000, 256_000)  # libopus's ceiling, to make the clip big
    parts, size = [], 0
    endless = (one[i:i + 24000] for _ in iter(int, 1) for i in range(0, len(one), 24000))
    writer = encode(fmt, endless, frames=None)
    for chunk in writer:  # cut at the size: no end-of-stream page, which libsndfile tolerates
        parts.append(chunk)
        size += len(chunk)
        if size >= mib << 20:
            break
    writer.close()
    codecs.OPUS_BITRATE_PER_CHANNEL = saved
    data = b"".join(parts)
    plan = FetchPlan("pitch_formant", ForensicWatermarks(bytes(range(32))).for_fetch(grant_id="g", reviewer_id="r"), 1)
    proc = psutil.Process()
    base, peak, done = proc.memory_info().rss, [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start, out = time.process_time(), 0
    pieces = lambda: (data[i:i + 65536] for i in range(0, len(data), 65536))  # noqa: E731  one at a time
    for chunk in FetchAudio.apply(plan, "audio/opus", pieces, size_bytes=len(data)):
        out += len(chunk)
    cpu_s = time.process_time() - start
    done.set()
    watcher.join()
    print(f"big_opus_clip_mib={len(data) / 2**20:.1f}")
    print(f"big_opus_out_mib={out / 2**20:.1f}")
    print(f"big_opus_cpu_s={cpu_s:.1f}")
    print(f"big_opus_peak_rss_growth_mib={(peak[0] - base) / 2**20:.1f}  # the input itself is held by the bench")


# -- 3. intelligibility ----------------------------------------------------------------------------------------
# Rhyme sets in the manner of the Modified Rhyme Test (House et al., 1965; ANSI S3.2): six words differing in
# their first or last consonant, said in a carrier phrase; the listener picks one of the six (chance 1/6). These
# 28 sets are made here from words in the recogniser's dictionary, after the MRT's pattern, not the MRT lists.
RHYME_SETS = [
    "bat bad back bass ban bath", "bean beach beat beam bead beak", "bust bus but bug buck buff",
    "dun dub dug duck dud dung", "cane case cape cake came cave", "pig pill pin pip pit pick",
    "sad sass sat sack sag sap", "pup puck pun pus puff pub", "suds sum sun sung sup sub",
    "peat peak peal peas peach peace", "map mat math man mass mad", "heat heap heal hear heath heave",
    "kit kid kin kill kiss king", "tab tan tam tap tack tang",
    "went sent bent dent tent rent", "hold cold told fold sold gold", "pat sat mat bat fat that",
    "sick lick tick kick pick wick", "hip tip lip dip sip rip", "game came same name fame tame",
    "fit hit wit kit bit sit", "top hop pop cop mop shop", "rang fang gang bang hang sang",
    "feel heel reel keel peel seal", "bill fill hill kill mill will", "led red bed wed fed shed",
    "wig dig big fig pig rig", "ray way day say pay may",
]
CARRIER = "would you write {} now"
INTELLIGIBILITY_VOICES = ["en-us", "en-us+m3", "en-us+f2", "en-us+f4"]  # two male, two female variants
# The disguise keeps speech intelligible, by this measure, when the rhyme test's accuracy on disguised speech
# is at least this share of the accuracy on the same speech undisguised.
RHYME_KEPT_THRESHOLD = 0.8


class Recogniser:
    """pocketsphinx (its bundled en-US acoustic model), closed-vocabulary: a JSGF grammar per rhyme set
    (the carrier phrase around one of the six words), and a uniform unigram model over the test
    sentences' words for the word error rate."""

    def __init__(self, sentences: list[str]) -> None:
        import math
        import tempfile

        from pocketsphinx import Decoder

        self._decoder = Decoder(samprate=RATE, loglevel="FATAL")
        for i, words in enumerate(RHYME_SETS):
            choice = " | ".join(words.split())
            self._decoder.add_jsgf_string(f"rhyme{i}", f"#JSGF V1.0;\ngrammar rhyme{i};\npublic <s> = "
                                                       f"{CARRIER.format('( ' + choice + ' )')} ;\n")
        vocabulary = sorted({w for s in sentences for w in s.split()})
        logp = math.log10(1 / (len(vocabulary) + 1))
        with tempfile.NamedTemporaryFile("w", suffix=".arpa", delete=False) as arpa:
            arpa.write(f"\\data\\\nngram 1={len(vocabulary) + 2}\n\n\\1-grams:\n"
                       + "".join(f"{logp:.4f} {w}\n" for w in [*vocabulary, "</s>"]) + "-99 <s>\n\n\\end\\\n")
        self._decoder.add_lm_file("sentences", arpa.name)
        Path(arpa.name).unlink()

    def _decode(self, x: np.ndarray, search: str) -> str:
        self._decoder.activate_search(search)
        self._decoder.start_utt()
        self._decoder.process_raw((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes(), full_utt=True)
        self._decoder.end_utt()
        hyp = self._decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    def rhyme(self, x: np.ndarray, set_index: int) -> str:
        """The word picked from the set; "" when the recogniser does not get through the carrier phrase."""
        words = self._decode(x, f"rhyme{set_index}").split()
        return words[3] if len(words) == 5 else ""

    def words(self, x: np.ndarray) -> str:
        return self._decode(x, "sentences")


def intelligibility(rng: random.Random, rhyme_sets: int) -> None:
    """Rhyme-test accuracy and closed-vocabulary WER, original against disguised, and for each part of the
    disguise alone (the vocoder at ratio 1.01, pitch only, formants only)."""
    recogniser = Recogniser(SENTENCES)
    parts: dict[str, tuple[float, float] | None] = {
        "original": None, "vocoder_only": (1.01, 1.0), "pitch_only": (1.3, 1.0), "formant_only": (1.0, 1.3 ** 0.75),
        "disguised": (0.0, 0.0)}  # drawn per utterance from the policy, as FetchClip does

    def version(x: np.ndarray, kind: str) -> np.ndarray:
        ratios = parts[kind]
        if ratios is None:
            return x
        return disguise(x, rng) if kind == "disguised" else shifted(x, *ratios)

    right = {k: 0 for k in parts}
    errors = {k: [0, 0] for k in parts}
    asked = 0
    for voice in INTELLIGIBILITY_VOICES:
        per_voice = {k: 0 for k in parts}
        for i, words in enumerate(RHYME_SETS[:rhyme_sets]):
            for word in words.split():
                x = say(CARRIER.format(word), voice)
                asked += 1
                for kind in parts:
                    hit = recogniser.rhyme(version(x, kind), i) == word
                    right[kind] += hit
                    per_voice[kind] += hit
        n = 6 * min(rhyme_sets, len(RHYME_SETS))
        print(f"rhyme_accuracy_{voice.replace('+', '_').replace('-', '_')}_original={per_voice['original'] / n:.3f}")
        print(f"rhyme_accuracy_{voice.replace('+', '_').replace('-', '_')}_disguised={per_voice['disguised'] / n:.3f}")
        for sentence in SENTENCES:
            x = say(sentence, voice)
            for kind in parts:
                wrong, total = words_error_rate(sentence, recogniser.words(version(x, kind)))
                errors[kind][0] += wrong
                errors[kind][1] += total
        sys.stdout.flush()
    print(f"rhyme_words_per_condition={asked}")
    print(f"rhyme_chance={1 / 6:.3f}")
    for kind in parts:
        print(f"rhyme_accuracy_{kind}={right[kind] / asked:.3f}")
    kept = right["disguised"] / max(right["original"], 1)
    print(f"rhyme_accuracy_kept={kept:.2f}")
    print(f"rhyme_accuracy_kept_threshold={RHYME_KEPT_THRESHOLD}")
    print(f"intelligible_by_rhyme_test={'yes' if kept >= RHYME_KEPT_THRESHOLD else 'no'}")
    for kind, (wrong, total) in errors.items():
        print(f"wer_closed_vocabulary_{kind}={wrong / max(total, 1):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fetches", type=int, default=20)
    parser.add_argument("--voices", type=int, default=10)
    parser.add_argument("--no-recogniser", action="store_true")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU figures (section 1)")
    parser.add_argument("--big-opus-mib", type=int, default=0, help="stream an Opus clip this big (e.g. 50)")
    parser.add_argument("--rhyme-sets", type=int, default=len(RHYME_SETS), help="rhyme sets per voice (6 words each)")
    args = parser.parse_args()
    espeak = shutil.which("espeak-ng") is not None
    print(f"speech_source={'espeak-ng' if espeak else 'tests/audio_speech.py'}")

    clip = ten_seconds(espeak)
    print(f"load_average_1min={os.getloadavg()[0]:.2f}")
    if not args.no_cpu:
        cpu(clip, args.fetches)
    if args.big_opus_mib:
        big_opus_memory(args.big_opus_mib)
    if not espeak:
        print("similarity=skipped (apt-get install espeak-ng)")
        return

    rng = random.Random(18)
    voices = VOICES[:args.voices]
    text = SENTENCES[:3]
    takes = {(v, t): np.concatenate([say(s, v, t) for s in text]) for v in voices for t in (0, 1)}
    space = SpeakerSpace(list(takes.values()), RATE)
    same = [space.similarity(takes[v, 0], takes[v, 1]) for v in voices]
    different = [space.similarity(takes[v, 0], takes[u, 0]) for v in voices for u in voices if u != v]
    threshold = equal_error_threshold(same, different)
    dis = [space.similarity(takes[v, 0], disguise(takes[v, 0], rng)) for v in voices]
    print(f"similarity_policy={POLICIES['pitch_formant']}")
    print(f"similarity_same_voice_mean={statistics.mean(same):.3f}")
    print(f"similarity_different_voice_mean={statistics.mean(different):.3f}")
    print(f"similarity_threshold_eer={threshold:.3f}")
    print(f"similarity_eer={sum(s < threshold for s in same) / len(same):.2f}")
    print(f"similarity_disguised_mean={statistics.mean(dis):.3f}")
    print(f"similarity_disguised_max={max(dis):.3f}")
    print(f"disguised_below_threshold={sum(d < threshold for d in dis) / len(dis):.2f}")
    if args.no_recogniser:
        return
    try:
        import pocketsphinx  # noqa: F401
    except ImportError:
        print("intelligibility=skipped (pip install -e '.[audio-bench]')")
        return
    intelligibility(rng, args.rhyme_sets)

if __name__ == "__main__":
    main()
