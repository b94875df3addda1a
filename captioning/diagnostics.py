"""What a table of metrics does not say: is the model captioning each image or repeating itself,
how sure is each score, and how exactly was it computed.

- caption_diagnostics: distinct captions, captions copied from the training set, words used,
  caption length against the references'. collapse_warning turns them into a warning when the
  model says the same thing for most images, the peers' most reported failure.
- caption_artifacts: captions that end mid-phrase (their last word never ends a reference) or say a
  word or phrase twice in a row (where no reference does), self-critical training's known failure
  modes; artifact_warning warns above ARTIFACTS_ABOVE of the captions.
- BLEU-4 and CIDEr with bootstrap 95% intervals over images. Corpus BLEU is not a mean of
  per-image scores, so each image keeps its BLEU sufficient statistics (clipped n-gram matches,
  n-gram counts, its length and the closest reference length, as pycocoevalcap counts them), and
  each resample adds them up again. CIDEr is a mean of per-image scores.
- compare_results: a paired bootstrap of two result files on the same images.
- signature: one line naming how the scores were computed, so that two numbers can be compared
  honestly (sacreBLEU's idea).

Too few images give numbers that look sure and mean nothing, so below a minimum they are n/a (None):
- CIDEr needs CIDER_MIN_IMAGES = 2. Its idf is log(N / df), N the number of images scored and df the
  number of images whose references hold the n-gram: with N = 1 every df is 1, every idf 0, and CIDEr
  is 0.000 whatever the captions say.
- The bootstrap intervals (and the paired comparison) need INTERVAL_MIN_IMAGES = 5. A resample of
  n images is one of C(2n-1, n) multisets (1 for n = 1, 35 for n = 4): the 2.5th and 97.5th
  percentiles are then a few extreme resamples, and never reach past the best and worst image. With
  one image the interval is [x, x], a certainty it does not have. (collapse_warning waits for 5 too.)
"""
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from statistics import mean
from typing import Any

import numpy as np
from pycocoevalcap.bleu.bleu_scorer import BleuScorer, cook_refs, cook_test

from .vocabulary import tokenize

DISTINCT_BELOW = 0.2     # warn when fewer than this share of images get a caption of their own
ONE_CAPTION_ABOVE = 0.5  # or when one caption is given to more than this share of images
CIDER_MIN_IMAGES = 2     # fewer: CIDEr's idf is 0 for every n-gram (see above)
INTERVAL_MIN_IMAGES = 5  # fewer: no bootstrap intervals, no paired comparison (see above)
ARTIFACTS_ABOVE = 0.05   # warn when more than this share of captions end mid-phrase or repeat themselves
ARTIFACT_EXAMPLES = 3    # example captions kept for each kind of artifact


def _words(caption: str) -> str:
    return " ".join(tokenize(caption))


def _immediate_repeats(words: Sequence[str]) -> set[tuple[str, ...]]:
    """The n-grams (n >= 1) said twice in a row: "a red red circle" -> {("red",)},
    "the circle the circle" -> {("the", "circle")}. O(len(words)^2), captions are short."""
    found = set()
    for n in range(1, len(words) // 2 + 1):
        for i in range(len(words) - 2 * n + 1):
            if words[i:i + n] == words[i + n:i + 2 * n]:
                found.add(tuple(words[i:i + n]))
    return found


def _artifacts(said: Sequence[Sequence[str]], originals: Sequence[str],
               reference_words: Iterable[Sequence[str]]) -> dict[str, Any]:
    """caption_artifacts from tokenized captions (said, with their original strings) and references."""
    endings: set[str] = set()
    allowed: set[tuple[str, ...]] = set()    # repeats the references make themselves
    for words in reference_words:
        if words:
            endings.add(words[-1])
            allowed |= _immediate_repeats(words)
    examples: dict[str, list[str]] = {"dangling": [], "repeated": []}
    counts = {"dangling": 0, "repeated": 0}
    for words, original in zip(said, originals):
        kinds = []
        if endings and (not words or words[-1] not in endings):
            kinds.append("dangling")
        if _immediate_repeats(words) - allowed:
            kinds.append("repeated")
        for kind in kinds:
            counts[kind] += 1
            if len(examples[kind]) < ARTIFACT_EXAMPLES and original not in examples[kind]:
                examples[kind].append(original)
    n = len(said)
    return {"images": n, "dangling": counts["dangling"] / n if endings else None,
            "repeated": counts["repeated"] / n, "examples": examples}


def caption_artifacts(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> dict[str, Any]:
    """Self-critical training's known failure modes: predictions {image_id: caption}, references
    {image_id: [captions]} (all images' references are pooled).

    Returns a dict: images, dangling (share of captions whose last word never ends a reference, or
    that are empty: "a red circle to the left of a"; None when there are no references to tell),
    repeated (share of captions that say a word or an n-gram twice in a row, "red red", "the circle
    the circle", a repeat that no reference makes), examples ({"dangling": [...], "repeated": [...]},
    up to ARTIFACT_EXAMPLES distinct captions each).
    """
    if not predictions:
        raise ValueError("no captions to diagnose")
    originals = list(predictions.values())
    return _artifacts([tokenize(c) for c in originals], originals,
                      (tokenize(r) for refs in references.values() for r in refs))


def caption_diagnostics(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]],
                        training_captions: Iterable[str] = (), tokenized: bool = False) -> dict[str, Any]:
    """predictions {image_id: caption}, references {image_id: [captions]}, training_captions: strings.

    `tokenized`: the training captions are already tokens joined by spaces, as
    `vocabulary.caption_tokens` caches them, and are used as they are: tokenizing COCO's 414k
    captions again would take a minute.

    Returns a dict: images, distinct (share of distinct captions), top_caption and top_share (the
    most frequent caption and the share of images it was given to), copied (share of captions that
    are, word for word, a training caption), words_used, mean_length and reference_mean_length
    (in words), and caption_artifacts' dangling, repeated and artifact_examples.
    """
    if not predictions:
        raise ValueError("no captions to diagnose")
    originals = list(predictions.values())
    tokens = [tokenize(c) for c in originals]
    said = [" ".join(t) for t in tokens]
    counts = Counter(said)
    top, top_count = counts.most_common(1)[0]
    seen = set(training_captions) if tokenized else {_words(c) for c in training_captions}
    reference_words = {i: [tokenize(r) for r in refs] for i, refs in references.items()}
    ref_lengths = [len(r) for i in predictions for r in reference_words.get(i, ())]
    artifacts = _artifacts(tokens, originals, (r for refs in reference_words.values() for r in refs))
    return {
        "images": len(said), "distinct": len(counts) / len(said), "top_caption": top,
        "top_share": top_count / len(said), "copied": sum(s in seen for s in said) / len(said) if seen else None,
        "words_used": len({w for s in said for w in s.split()}),
        "mean_length": mean(len(s.split()) for s in said),
        "reference_mean_length": mean(ref_lengths) if ref_lengths else None,
        "dangling": artifacts["dangling"], "repeated": artifacts["repeated"],
        "artifact_examples": artifacts["examples"],
    }


def collapse_warning(diagnostics: Mapping[str, Any]) -> str | None:
    """A warning (str) when the captions look collapsed, else None."""
    d = diagnostics
    if d["images"] < 5:  # too few images to tell
        return None
    if d["distinct"] >= DISTINCT_BELOW and d["top_share"] <= ONE_CAPTION_ABOVE:
        return None
    distinct = round(d["distinct"] * d["images"])
    return (f"warning: caption collapse: {distinct} distinct caption{'s' if distinct != 1 else ''} for "
            f"{d['images']} images, and {d['top_share']:.0%} of them get \"{d['top_caption']}\". The model is "
            f"ignoring the image. Likely causes: "
            f"images normalised differently than in training (mean/std, size), a learning rate too high for "
            f"the decoder, or an untrained or collapsed checkpoint (check the training log's loss).")


def artifact_warning(diagnostics: Mapping[str, Any]) -> str | None:
    """A warning (str) when more than ARTIFACTS_ABOVE of the captions end mid-phrase or repeat a word
    or phrase, else None (and None on fewer than 5 images, or on a dict without these fields)."""
    d = diagnostics
    if d["images"] < 5:  # too few images to tell
        return None
    dangling, repeated = d.get("dangling"), d.get("repeated")
    if (dangling or 0) <= ARTIFACTS_ABOVE and (repeated or 0) <= ARTIFACTS_ABOVE:
        return None
    examples = d.get("artifact_examples") or {}
    found = []
    for share, kind, what in ((dangling, "dangling", "end mid-phrase"),
                              (repeated, "repeated", "repeat a word or phrase")):
        if share is not None:
            example = f" (\"{examples[kind][0]}\")" if examples.get(kind) else ""
            found.append(f"{share:.0%} {what}{example}")
    return (f"warning: caption artifacts: of {d['images']} captions, {' and '.join(found)}. Such captions score on "
            f"n-grams but read badly. Likely causes: self-critical training (SCST) on CIDEr, which rewards n-grams "
            f"and does not penalise an unfinished sentence or a repeat (add an end-of-sentence or repetition "
            f"penalty, or train fewer SCST steps); and, for captions that end mid-phrase, a max_seq_len that cuts "
            f"them before their <end> (compare their length with the checkpoint's max_seq_len).")


def format_diagnostics(d: Mapping[str, Any]) -> str:
    copied = f"{d['copied']:.0%}" if d["copied"] is not None else "n/a"
    ref = f"{d['reference_mean_length']:.1f}" if d["reference_mean_length"] is not None else "n/a"
    artifacts = []                      # absent in files of older versions: say nothing about them
    if d.get("dangling") is not None:
        artifacts.append(f"{d['dangling']:.0%} end mid-phrase")
    if d.get("repeated") is not None:
        artifacts.append(f"{d['repeated']:.0%} repeat a word")
    return (f"captions: {d['distinct']:.0%} distinct over {d['images']} images (most frequent: {d['top_share']:.0%}), "
            f"{copied} copied from the training set, {d['words_used']} words used, "
            f"mean length {d['mean_length']:.1f} words (references {ref})"
            + "".join(f", {a}" for a in artifacts))


# --- BLEU from sufficient statistics -------------------------------------------------------------
# columns of a statistics row: test length, closest reference length, guesses for n = 1..4, matches for n = 1..4
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's smoothing constants


def bleu_statistics(tokenized_references: Mapping[Any, list[str]], tokenized_predictions: Mapping[Any, list[str]],
                    ids: Iterable[Any]) -> np.ndarray:
    """(len(ids), 10) array of each image's BLEU counts, from already tokenized captions (as scored)."""
    rows = []
    for i in ids:
        refs = cook_refs(tokenized_references[i])
        test = cook_test(tokenized_predictions[i][0], refs)
        closest = BleuScorer._single_reflen(None, test["reflen"], "closest", test["testlen"])
        rows.append([test["testlen"], closest, *test["guess"][:4], *test["correct"][:4]])
    return np.asarray(rows, dtype=np.float64)


def corpus_bleu4(sums: np.ndarray) -> float | np.ndarray:
    """BLEU-4 from summed statistics: (10,) or (R, 10) -> float or (R,)."""
    sums = np.atleast_2d(sums)
    precision = np.prod((sums[:, 6:10] + _TINY) / (sums[:, 2:6] + _SMALL), axis=1) ** 0.25
    ratio = (sums[:, 0] + _TINY) / (sums[:, 1] + _SMALL)
    brevity = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1)), 1.0)
    out = precision * brevity
    return out if out.size > 1 else float(out[0])


def _resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) counts: how often each image is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1 / n), size=resamples).astype(np.float64)


def too_few_images(n: int) -> str | None:
    """A warning (str) when n images are too few for the bootstrap intervals, else None. (score_captions
    warns about CIDEr itself.)"""
    if n >= INTERVAL_MIN_IMAGES:
        return None
    return (f"warning: only {n} image{'s' if n != 1 else ''} scored: the 95% bootstrap intervals need "
            f"{INTERVAL_MIN_IMAGES} and are n/a")


def bootstrap_intervals(bleu_stats: np.ndarray, cider: Sequence[float] | np.ndarray, resamples: int = 1000,
                        seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float] | None]:
    """95% intervals over images: {"Bleu_4": (low, high), "CIDEr": (low, high)}; both None on fewer
    than INTERVAL_MIN_IMAGES images (see the module's docstring)."""
    if len(bleu_stats) != len(cider) or not len(cider):
        raise ValueError("bootstrap needs the same, non-zero number of BLEU rows and CIDEr scores")
    if len(cider) < INTERVAL_MIN_IMAGES:
        return {"Bleu_4": None, "CIDEr": None}
    cider = np.asarray(cider, dtype=np.float64)
    w = _resample_weights(len(cider), resamples, seed)
    tail = (1 - level) / 2 * 100
    bleu = corpus_bleu4(w @ bleu_stats)
    cid = w @ cider / len(cider)
    return {"Bleu_4": tuple(np.percentile(bleu, [tail, 100 - tail])),
            "CIDEr": tuple(np.percentile(cid, [tail, 100 - tail]))}


def compare_results(a: Mapping[str, Any], b: Mapping[str, Any], resamples: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict[str, dict[str, Any]]:
    """Paired bootstrap of two evaluations of the same images (dicts as `evaluate --out` writes them).

    Returns {metric: {"a", "b", "difference" (b - a), "interval", "b_better" (share of resamples)}}.
    """
    for name, r in (("first", a), ("second", b)):
        if "per_image" not in r:
            raise ValueError(f"the {name} file has no per-image scores: write it with this version's evaluate --out")
    ids = sorted(set(a["per_image"]) & set(b["per_image"]))
    if len(ids) != len(a["per_image"]) or len(ids) != len(b["per_image"]):
        raise ValueError(f"the two files score different images ({len(a['per_image'])} and {len(b['per_image'])}, "
                         f"{len(ids)} in common): compare evaluations of the same split")
    if len(ids) < INTERVAL_MIN_IMAGES:
        raise ValueError(f"the two files score {len(ids)} image{'s' if len(ids) != 1 else ''}: a paired bootstrap "
                         f"needs at least {INTERVAL_MIN_IMAGES}")
    if a.get("signature", {}).get("tokenizer") != b.get("signature", {}).get("tokenizer"):
        raise ValueError("the two files were tokenized differently (PTB/Java against Python): their scores differ "
                         "for that reason alone")
    stats = {k: np.array([r["per_image"][i]["bleu"] for i in ids]) for k, r in (("a", a), ("b", b))}
    cider = {k: np.array([r["per_image"][i]["CIDEr"] for i in ids]) for k, r in (("a", a), ("b", b))}
    w = _resample_weights(len(ids), resamples, seed)
    tail = (1 - level) / 2 * 100
    out = {}
    for metric, full, boot in (
            ("Bleu_4", lambda k: corpus_bleu4(stats[k].sum(0)), lambda k: corpus_bleu4(w @ stats[k])),
            ("CIDEr", lambda k: float(cider[k].mean()), lambda k: w @ cider[k] / len(ids))):
        diff = boot("b") - boot("a")
        out[metric] = {"a": full("a"), "b": full("b"), "difference": full("b") - full("a"),
                       "interval": tuple(np.percentile(diff, [tail, 100 - tail])), "b_better": float(np.mean(diff > 0))}
    return out


def format_comparison(result: Mapping[str, Mapping[str, Any]], name_a: str = "A", name_b: str = "B") -> str:
    lines = [f"{'':<8}{name_a:>10}{name_b:>10}{'B - A':>10}   95% interval        B better in"]
    for metric, r in result.items():
        lo, hi = r["interval"]
        lines.append(f"{metric:<8}{r['a']:>10.3f}{r['b']:>10.3f}{r['difference']:>+10.3f}   [{lo:+.3f}, {hi:+.3f}]"
                     f"   {r['b_better']:.0%} of resamples")
    return "\n".join(lines)


def signature(tokenizer: str, references: Mapping[Any, Sequence[str]], split: str, images: int, beam_size: int,
              length_penalty: float) -> dict[str, Any]:
    """How the scores were computed, as a dict; format_signature prints it in one line."""
    try:
        scorer = f"pycocoevalcap {version('pycocoevalcap')}"
    except PackageNotFoundError:
        scorer = "pycocoevalcap ?"
    counts = sorted({len(r) for r in references.values()})
    refs = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return {"scorer": scorer, "tokenizer": tokenizer, "refs": refs, "split": f"{split} ({images} images)",
            "beam": beam_size, "length_penalty": length_penalty if beam_size > 1 else None, "scale": "0-1"}


def format_signature(sig: Mapping[str, Any]) -> str:
    lp = "none" if sig["length_penalty"] is None else f"{sig['length_penalty']:g}"
    return (f"signature: {sig['scorer']} | tok:{sig['tokenizer']} | refs:{sig['refs']} | split:{sig['split']} | "
            f"beam:{sig['beam']} | lp:{lp} | scale:{sig['scale']}")


def format_intervals(metrics: Mapping[str, float | None], intervals: Mapping[str, Sequence[float] | None],
                     resamples: int = 1000) -> str:
    """One line: each metric with its interval; n/a for a score or interval that is None (too few images)."""
    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    parts = [f"{m} {number(metrics.get(m))} " + ("[n/a]" if span is None else f"[{span[0]:.3f}, {span[1]:.3f}]")
             for m, span in intervals.items()]
    if any(span is None for span in intervals.values()):
        return "   ".join(parts) + f"   (95% bootstrap intervals need at least {INTERVAL_MIN_IMAGES} images)"
    return "   ".join(parts) + f"   (95% bootstrap intervals over images, {resamples} resamples)"

