"""CIDEr-D rewards for one self-critical step: captioning.cider.CiderD beside pycocoevalcap's CiderScorer.

    python benchmarks/cider_speed.py [--images 32] [--samples 5] [--refs 5] [--train 3000] [--repeats 21]

Synthetic captions of the relations world's size (10 to 26 words from a few dozen, "a red circle to the
left of a blue square and ..."): document frequencies from --train images of --refs captions, then each
call scores --images x --samples sampled captions against their images' references. Both sides use the
same df, computed once outside the timing: pycocoevalcap's CiderScorer gets the training counts and a
ref_len held at log(--train) (its compute_cider would otherwise reset it to log of the images scored),
and per call cooks the captions and runs compute_cider, as an SCST reward built on it would.
CiderD is timed cold (a fresh cache each call: an image's first visit, as in the first epoch) and warm
(image ids as keys, their reference vectors already cached: every later visit). The calls take turns,
so a machine that slows down slows every method; the table gives each one's median and the ratio.
"""
import argparse
import random
import statistics
import time

import numpy as np
from pycocoevalcap.cider.cider_scorer import CiderScorer

from captioning.cider import CiderD

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
RELATIONS = ("to the left of", "to the right of", "above", "below", "next to")


def caption(rng, low=10, high=26):
    """A relations-world-like caption of low to high words."""
    words = []
    while len(words) < high:
        first, second = (f"{rng.choice(('a', 'the'))} {rng.choice(COLOURS)} {rng.choice(SHAPES)}" for _ in range(2))
        words += f"{first} {rng.choice(RELATIONS)} {second}".split() + ["and"]
    return " ".join(words[:rng.randint(low, high)])


class PinnedRefLen(CiderScorer):
    """CiderScorer with ref_len held at the training set's value (compute_cider sets it to log(len(crefs)))."""

    def __init__(self, ref_len):
        self._pinned = ref_len
        super().__init__()

    ref_len = property(lambda self: self._pinned, lambda self, value: None)


def pycoco_rewards(document_frequency, ref_len, candidates, references):
    scorer = PinnedRefLen(ref_len)
    for candidate, refs in zip(candidates, references):
        scorer.cook_append(candidate, refs)
    scorer.document_frequency = document_frequency
    return np.array(scorer.compute_cider())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    rng = random.Random(0)
    train = [[caption(rng) for _ in range(args.refs)] for _ in range(args.train)]
    ids = rng.sample(range(args.train), args.images)
    keys = [i for i in ids for _ in range(args.samples)]
    references = [train[i] for i in keys]
    candidates = [caption(rng) for _ in keys]

    t = time.perf_counter()
    cider = CiderD(train)
    build = time.perf_counter() - t
    counting = CiderScorer()
    for refs in train:
        counting.cook_append(None, refs)
    counting.compute_doc_freq()
    document_frequency, ref_len = counting.document_frequency, np.log(float(args.train))

    def cold():
        cider.clear_cache()
        return cider.score(candidates, references, keys)

    methods = {
        "pycocoevalcap CiderScorer (same df)": lambda: pycoco_rewards(document_frequency, ref_len, candidates,
                                                                      references),
        "CiderD.score, cold cache": cold,
        "CiderD.score, warm cache (keys)": lambda: cider.score(candidates, references, keys),
    }
    expected = methods["pycocoevalcap CiderScorer (same df)"]()
    difference = max(float(np.abs(fn() - expected).max()) for fn in methods.values())
    times = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    print(f"{args.images} images x {args.samples} samples, {args.refs} refs each, df from {args.train} images "
          f"(CiderD built in {build * 1e3:.0f} ms); median of {args.repeats}; "
          f"largest difference from pycocoevalcap {difference:.1e}\n")
    print(f"{'method':<40}{'ms/call':>10}{'vs pycocoevalcap':>18}")
    base = statistics.median(times["pycocoevalcap CiderScorer (same df)"])
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<40}{median * 1e3:>10.2f}{base / median:>17.1f}x")


if __name__ == "__main__":
    main()
