"""Standard captioning metrics with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr (+ SPICE if installed).

The scorers are built one by one: `COCOEvalCap.evaluate()` always builds SPICE, which
downloads Stanford CoreNLP and so fails offline. SPICE runs only when its jars are
already in place. The PTB tokenizer and METEOR need Java; without it the captions are
tokenized in Python (the same rules as the vocabulary) and METEOR is skipped, loudly.
The three Java programs are run here, not through pycocoevalcap's wrappers, under
captioning.java's time limits (CAPTIONING_JAVA_TIMEOUT seconds per answer, default 120): a JVM
that cannot start or never answers is skipped with a warning, where pycocoevalcap's METEOR would
wait forever. SPICE has its own limit, CAPTIONING_SPICE_TIMEOUT seconds for the whole run (default
1800) or score_captions(spice_timeout=...): past it SPICE is reported as skipped, with the reason,
and every other metric is kept.

On a synthetic set whose captions file carries the generator's truth, `evaluate_checkpoint`
also reports semantic accuracy (captioning.semantics): whether the captions name the right
objects, which n-gram metrics cannot tell.
"""
import argparse
import json
import numbers
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from pycocotools.coco import COCO

from . import diagnostics, java
from .config import Config
from .diagnostics import CIDER_MIN_IMAGES, bleu_statistics, too_few_images
from .karpathy import karpathy_test_images
from .modelcard import complete_card, evaluation_info
from .semantics import ground_truth_from_coco, semantic_accuracy
from .vocabulary import caption_tokens, load_coco, tokenize

if TYPE_CHECKING:           # for an annotation only: torch is slow to import, and the CLI's count_flag needs none of it
    import torch

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
_K = TypeVar("_K", bound=Hashable)
Tokenized = dict[int, list[str]]                        # {image_id: [tokenized captions]}, as pycocoevalcap takes them
_SKIPPED_WARNING = {"METEOR": "warning: METEOR skipped: Java cannot run it ({})",
                    "SPICE": "warning: SPICE skipped: {}; the other metrics are kept"}


def check_count(name: str, value: object) -> int:
    """`value` if it is a whole number >= 1 (a beam size, a number of images), else a ValueError naming
    `name`. The notebooks check their parameters with it, evaluate_checkpoint its arguments."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


def count_flag(text: str) -> int:
    """An argparse `type` for the CLI's count flags (--beam, --max-images...): the whole number in `text`, or
    argparse's one-line error naming the flag ("argument --max-images: must be >= 1, got 0")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def spice_available() -> bool:
    """Whether SPICE's Stanford CoreNLP jars are in place (pycocoevalcap would download them)."""
    # lazy, as every pycocoevalcap import here: the CLI imports this module for count_flag alone
    import pycocoevalcap.spice as spice

    return os.path.exists(os.path.join(os.path.dirname(spice.__file__), "lib", "stanford-corenlp-3.6.0.jar"))


def _python_tokenize(captions_for_image):
    return {k: [" ".join(tokenize(c)) for c in v] for k, v in captions_for_image.items()}


def ptb_tokenize(captions_for_image: Mapping[_K, list[str]], timeout: float | None = None) -> dict[_K, list[str]]:
    """pycocoevalcap's PTBTokenizer ({key: [captions]} -> {key: [tokenized]}), with a timeout.

    Blank captions (an empty prediction) are not sent to Java: they tokenize to "" here. The tokenizer
    reads one caption a line, and a blank last line is no line at all to it, so it would answer one
    line too few."""
    # lazy: see spice_available
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    timeout = java.java_timeout() if timeout is None else timeout
    jar = os.path.join(os.path.dirname(os.path.abspath(ptb.__file__)), ptb.STANFORD_CORENLP_3_4_1_JAR)
    keys = [k for k, captions in captions_for_image.items() for _ in captions]
    sentences = [" ".join(c.split()) for captions in captions_for_image.values() for c in captions]
    asked = [s for s in sentences if s]
    lines = []
    if asked:
        with tempfile.TemporaryDirectory() as folder:      # not in site-packages, as pycocoevalcap does
            path = os.path.join(folder, "captions.txt")
            with open(path, "w") as f:
                f.write("\n".join(asked))
            process = java.JavaProcess(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
                                        "-preserveLines", "-lowerCase", path], folder)
            try:
                process.stdin.close()
                lines = [process.read(timeout) for _ in asked]
                process.finish(timeout)
            finally:
                process.close()
    answers = iter(lines)
    out: dict[_K, list[str]] = {}
    for key, sentence in zip(keys, sentences):
        line = next(answers) if sentence else ""
        out.setdefault(key, []).append(" ".join(w for w in line.rstrip().split(" ") if w and w not in ptb.PUNCTUATIONS))
    return out


def meteor_score(gts: Tokenized, res: Tokenized, timeout: float | None = None) -> tuple[float, list[float]]:
    """pycocoevalcap's METEOR (same jar, same protocol) -> (score, per-image scores), with a timeout."""
    # lazy: see spice_available
    import pycocoevalcap.meteor.meteor as meteor

    timeout = java.java_timeout() if timeout is None else timeout
    process = java.JavaProcess(["java", "-jar", "-Xmx2G", meteor.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"],
                               os.path.dirname(os.path.abspath(meteor.__file__)))
    try:
        eval_line = "EVAL"
        for i in gts:
            hypothesis = res[i][0].replace("|||", "").replace("  ", " ")
            eval_line += " ||| " + process.ask(" ||| ".join(("SCORE", " ||| ".join(gts[i]), hypothesis)), 1,
                                               timeout)[0].strip()
        answers = process.ask(eval_line, len(gts) + 1, timeout)
        try:
            values = [float(a) for a in answers]
        except ValueError:
            raise java.JavaFailed(f"METEOR answered {answers[-1][:80]!r}, not a score") from None
    finally:
        process.close()
    return values[-1], values[:-1]


def spice_score(gts: Tokenized, res: Tokenized,
                timeout: float | None = None) -> tuple[float, list[dict[str, dict[str, float]]]]:
    """pycocoevalcap's SPICE (same jar, same arguments) -> (score, per-image scores), within `timeout`
    seconds for the whole run (java.spice_timeout() when None); JavaFailed when it fails or runs out of time."""
    # lazy: see spice_available
    import pycocoevalcap.spice.spice as spice

    timeout = java.spice_timeout() if timeout is None else timeout
    home = os.path.dirname(os.path.abspath(spice.__file__))
    ids = sorted(gts)
    with tempfile.TemporaryDirectory() as folder:        # not in site-packages, as pycocoevalcap does
        in_path, out_path = os.path.join(folder, "in.json"), os.path.join(folder, "out.json")
        with open(in_path, "w") as f:
            json.dump([{"image_id": i, "test": res[i][0], "refs": gts[i]} for i in ids], f)
        cache = os.path.join(home, spice.CACHE_DIR)       # its parse cache, where pycocoevalcap keeps it
        try:
            os.makedirs(cache, exist_ok=True)
            cached = ["-cache", cache] if os.access(cache, os.W_OK) else []
        except OSError:
            cached = []
        process = java.JavaProcess(["java", "-jar", "-Xmx8G", spice.SPICE_JAR, in_path, *cached, "-out", out_path,
                                    "-subset", "-silent"], home)
        try:
            process.stdin.close()
            process.finish(timeout)
        except java.JavaFailed:
            if process.p.poll() is None:
                raise java.JavaFailed(f"it did not end within {timeout:g} s (its limit: spice_timeout, "
                                      f"CAPTIONING_SPICE_TIMEOUT)") from None
            raise
        finally:
            process.close()
        try:
            with open(out_path) as f:
                results = {item["image_id"]: item["scores"] for item in json.load(f)}
            scores = [results[i] for i in ids]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise java.JavaFailed(f"SPICE wrote no usable results ({type(e).__name__}: {e})") from None

    def number(value):
        try:
            return float(value)
        except (TypeError, ValueError):
            return float("nan")

    per_image = [{category: {k: number(v) for k, v in values.items()} for category, values in s.items()}
                 for s in scores]
    return float(np.mean([p["All"]["f"] for p in per_image])), per_image


def _tokenized(gts, res, use_java, log):
    """(gts, res, use_java): the captions tokenized by the PTB tokenizer in Java, else (no Java, or a Java
    that cannot run it: use_java becomes False, with a warning) in Python."""
    if use_java:
        try:  # one JVM for both: keys ("g", id) and ("r", id)
            both = ptb_tokenize({**{("g", i): c for i, c in gts.items()}, **{("r", i): c for i, c in res.items()}})
            return {i: both[("g", i)] for i in gts}, {i: both[("r", i)] for i in res}, True
        except java.JavaFailed as e:
            log(f"warning: Java cannot run the PTB tokenizer ({e}): tokenizing in Python and skipping METEOR")
    else:
        log("warning: Java not found: tokenizing in Python and skipping METEOR (install a JRE for the full set)")
    return _python_tokenize(gts), _python_tokenize(res), False


def _scorers(images, use_java, spice_timeout, log):
    """[(metric names, scorer (gts, res) -> (score(s), per-image score(s)))] of the metrics to compute, in
    the order of METRICS. CIDEr is left out, with a warning, on fewer than CIDER_MIN_IMAGES images."""
    # lazy: see spice_available
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu = Bleu(4)
    scorers = [(("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"), lambda gts, res: bleu.compute_score(gts, res, verbose=0))]
    if use_java:
        scorers.append((("METEOR",), meteor_score))
    scorers.append((("ROUGE_L",), Rouge().compute_score))
    if images >= CIDER_MIN_IMAGES:
        scorers.append((("CIDEr",), Cider().compute_score))
    else:
        log(f"warning: CIDEr is n/a on {images} image: its idf, log(N/df), is 0 for every n-gram when N = 1 "
            f"(it needs {CIDER_MIN_IMAGES} images)")
    if use_java and spice_available():
        scorers.append((("SPICE",), lambda gts, res: spice_score(gts, res, spice_timeout)))
    return scorers


def _compute_metrics(scorers, gts, res, ids, log):
    """(metrics {name: score}, per-image {id: {name: score}}, skipped {name: why}) from running each scorer;
    a Java scorer that fails (METEOR, SPICE) is skipped with a warning, and the others are kept."""
    metrics, per_image, skipped = {}, {i: {} for i in ids}, {}
    for names, scorer in scorers:
        try:
            score, scores = scorer(gts, res)
        except java.JavaFailed as e:
            log(_SKIPPED_WARNING[names[0]].format(e))
            skipped[names[0]] = str(e)
            continue
        if len(names) == 1:
            score, scores = [score], [scores]
        for name, value, values in zip(names, score, scores):
            metrics[name] = float(value)
            for i, v in zip(ids, values):
                per_image[i][name] = float(v) if not isinstance(v, dict) else float(v["All"]["f"])
    return metrics, per_image, skipped


def score_captions(references: Mapping[int, list[str]], predictions: Mapping[int, str], use_java: bool | None = None,
                   log: Callable[[str], object] = print, details: dict[str, Any] | None = None,
                   spice_timeout: float | None = None) -> tuple[dict[str, float | None], dict[int, dict[str, Any]]]:
    """references {image_id: [captions]}, predictions {image_id: caption} -> (metrics, per-image scores).

    Per-image scores are {image_id: {metric: value}}, for finding the best and worst examples, plus
    "bleu": the image's BLEU counts (diagnostics.bleu_statistics), from which any subset's corpus
    BLEU can be recomputed. A `details` dict receives "tokenizer": "ptb-java" or "python", and "skipped":
    {metric: why} for a metric that could not be computed (METEOR, SPICE: Java failed or ran out of time).
    `spice_timeout`: seconds SPICE may run (None: CAPTIONING_SPICE_TIMEOUT, default 1800).
    On fewer than diagnostics.CIDER_MIN_IMAGES images CIDEr is None (n/a), with a warning: its idf
    is 0 for every n-gram there.
    """
    ids = sorted(predictions)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"no reference captions for image ids {missing[:5]}")
    if not ids:
        raise ValueError("nothing to score: no predictions")
    use_java = java.java_available() if use_java is None else use_java
    gts, res, use_java = _tokenized({i: list(references[i]) for i in ids}, {i: [predictions[i]] for i in ids},
                                    use_java, log)
    scorers = _scorers(len(ids), use_java, spice_timeout, log)
    metrics, per_image, skipped = _compute_metrics(scorers, gts, res, ids, log)
    if len(ids) < CIDER_MIN_IMAGES:                             # n/a, not a confident 0
        metrics["CIDEr"] = None
        for i in ids:
            per_image[i]["CIDEr"] = None
    for i, row in zip(ids, bleu_statistics(gts, res, ids)):
        per_image[i]["bleu"] = row.tolist()
    if details is not None:
        details["tokenizer"] = "ptb-java" if use_java else "python"
        details["skipped"] = skipped
    return metrics, per_image


def heldout_split(config: Config, split: str = "val") -> tuple[str, COCO, list[int]]:
    """(image folder, captions json, image ids) of the split the metrics are computed on.

    - with a Karpathy split file (`dataset_coco.json`, `dataset_flickr8k.json`...) in the data folder:
      its test images;
    - without it: the `config.heldout_images` val images with the smallest ids, all of them when 0
      (COCO: 5000 of val2014; train2014 is all we train on, so any part of val2014 is held out,
      and the smallest ids make it reproducible everywhere; the tiny preset: its whole val split).

    The images are read from resized_images/<split>2014 when it holds any of them, else from
    <split>2014. None of them in either is an error naming the count, the captions file and the folder;
    some of them missing is a warning naming how many.
    """
    if split not in ("val", "train"):
        raise ValueError(f"split must be 'val' or 'train', got {split!r}")
    json_path = config.captions_json(split)
    coco = load_coco(json_path)
    ids = sorted(coco.getImgIds())
    test_names = karpathy_test_images(config.data_dir) if split == "val" else None
    if test_names is not None:
        ids = [i for i in ids if coco.imgs[i]["file_name"] in test_names]
    elif split == "val" and config.heldout_images:
        ids = ids[:config.heldout_images]
    if not ids:
        raise ValueError(f"nothing to score: {json_path} lists no images"
                         + (" of the Karpathy split's test images" if test_names is not None else ""))
    folder, found = None, []
    for candidate in (config.resized_images(split), config.split_images(split)):
        present = set(os.listdir(candidate)) if os.path.isdir(candidate) else set()
        found = [i for i in ids if coco.imgs[i]["file_name"] in present]
        if found:
            folder = candidate
            break
    if folder is None:
        folder = config.split_images(split)
        where = folder if os.path.isdir(folder) else f"{folder} (no such folder)"
        raise FileNotFoundError(f"none of the {len(ids)} images in {json_path} are in {where}: put the images "
                                f"there (notebook 01 gets the data) or give the data folder that has them (--data-dir)")
    if len(found) < len(ids):
        print(f"warning: {len(ids) - len(found)} of the {len(ids)} images in {json_path} are not in {folder}: "
              f"scoring the other {len(found)}")
    return folder, coco, found


def blind_baseline(train_json: str, image_ids: Iterable[int]) -> dict[int, str]:
    """The most frequent training caption (after tokenisation), predicted for every image."""
    caption = Counter(caption_tokens(train_json, progress=False).values()).most_common(1)[0][0]
    return {i: caption for i in image_ids}


def _caption_heldout(captioner, paths, folder, device, beam_size, batch_size, progress):
    """(predictions {id: caption}, failed {file name: error}) of captioning `paths` {id: path} with
    captioner = (encoder, decoder, vocab, config): unreadable images are skipped below 1% of them, refused above."""
    # lazy: torch, which the CLI's count_flag does not need
    from .data import skipped_line, too_many_unreadable
    from .inference import caption_images

    ids = list(paths)
    results = caption_images([paths[i] for i in ids], *captioner, device, beam_size, batch_size, progress=progress)
    failed = {os.path.basename(p): err for p, cap, err in results if err}
    error = too_many_unreadable(failed, len(ids), folder)     # more than 1%: refused, naming a few
    if error:
        raise error
    if failed:                                                  # fewer: skipped, counted and named
        print(f"{skipped_line(failed)} ({folder}: not scored)")
    return {i: cap for i, (_, cap, err) in zip(ids, results) if err is None}, failed


def _intervals(per_image):
    """Bootstrap 95% intervals of BLEU-4 and CIDEr over the scored images (diagnostics.bootstrap_intervals)."""
    ids = sorted(per_image)
    return diagnostics.bootstrap_intervals([per_image[i]["bleu"] for i in ids], [per_image[i]["CIDEr"] for i in ids])


def evaluate_checkpoint(checkpoint: str | None, split: str = "val", beam_size: int = 3,
                        device: "str | torch.device" = "cpu", batch_size: int = 64, weights: str | None = None,
                        progress: bool = True, max_images: int | None = None, data_dir: str | None = None,
                        spice_timeout: float | None = None, model: str | None = None,
                        runtime: str = "torch") -> dict[str, Any]:
    """Caption the held-out split with a checkpoint, or with an exported folder (`model`, export.py; it holds
    no data paths, so `data_dir` is needed), on `runtime` ("torch", or "onnx" for an export), and score it.
    Returns a dict:
    {"metrics", "per_image", "predictions" {id: caption}, "references" {id: [captions]}, "paths" {id: path},
    "skipped_images" (file names that could not be read: skipped below 1% of the split, refused above),
    "skipped_metrics" ({metric: why}: METEOR or SPICE that Java could not run, or SPICE past its timeout),
    "semantic" (semantic_accuracy() where the captions file has ground truth, else None), "config",
    "diagnostics" (diagnostics.caption_diagnostics), "intervals" (bootstrap 95% intervals of BLEU-4
    and CIDEr), "signature" (how the scores were computed), "model_card" (the model card beside a run's
    best.ckpt that this evaluation completed, modelcard.py, or None)}.

    `max_images`: score only the first N images of the split (None: all; below 1 is a ValueError).
    On a split too small for them (diagnostics.CIDER_MIN_IMAGES, INTERVAL_MIN_IMAGES), CIDEr and the
    intervals are None, with a warning, not a confident 0."""
    # lazy: torch, which the CLI's count_flag does not need
    from .export import load_model
    from .model import LENGTH_PENALTY

    check_count("beam_size", beam_size)
    check_count("batch_size", batch_size)
    if max_images is not None:                # None: all of them; 0 or less is a mistake, not "all"
        check_count("max_images", max_images)
    if model is not None and not data_dir:
        raise ValueError("evaluate --model needs --data-dir: an exported folder holds no data paths")
    encoder, decoder, vocab, config = load_model(checkpoint, model, runtime, device, weights)
    if data_dir:
        config.data_dir = data_dir
    folder, coco, ids = heldout_split(config, split)
    if max_images is not None:
        ids = ids[:max_images]
    paths = {i: os.path.join(folder, coco.imgs[i]["file_name"]) for i in ids}
    predictions, failed = _caption_heldout((encoder, decoder, vocab, config), paths, folder, device, beam_size,
                                           batch_size, progress)
    references = {i: [a["caption"] for a in coco.imgToAnns[i]] for i in predictions}
    details: dict[str, Any] = {}
    metrics, per_image = score_captions(references, predictions, details=details, spice_timeout=spice_timeout)
    truth = ground_truth_from_coco(coco.dataset, source=config.captions_json(split))
    semantic = semantic_accuracy(predictions, truth, intervals=True) if truth and predictions else None
    warning = too_few_images(len(per_image))
    if warning:
        print(warning)
    training = caption_tokens(config.captions_json("train"), progress=False).values() \
        if os.path.exists(config.captions_json("train")) else ()
    result = {"metrics": metrics, "per_image": per_image, "predictions": predictions, "references": references,
              "paths": paths, "semantic": semantic, "config": config, "skipped_images": sorted(failed),
              "skipped_metrics": details.get("skipped", {}),
              "diagnostics": diagnostics.caption_diagnostics(predictions, references, training, tokenized=True),
              "intervals": _intervals(per_image),
              "signature": diagnostics.signature(details["tokenizer"], references, split, len(per_image), beam_size,
                                                 LENGTH_PENALTY)}
    result["model_card"] = _complete_model_card(checkpoint, result, split, beam_size) if checkpoint else None
    return result


def _complete_model_card(checkpoint: str, result: dict[str, Any], split: str, beam_size: int) -> str | None:
    """The evaluation of a run's best.ckpt completes the model card training wrote beside it
    (modelcard.complete_card); returns the card's path, or None: another checkpoint (early.ckpt and
    last.ckpt never change the card's numbers), no card of ours there, or one it keeps (modelcard.supersedes).
    The scores are computed whatever happens here: a card that cannot be written is a warning."""
    if os.path.basename(checkpoint) != "best.ckpt":
        return None
    folder = os.path.dirname(os.path.abspath(checkpoint))
    try:
        return complete_card(folder, evaluation_info(result, checkpoint, split, beam_size))
    except Exception as e:            # OSError (a read-only folder, a full disk), or a card this result breaks
        print(f"warning: the model card in {folder} could not be completed ({type(e).__name__}: {e})")
        return None


def result_record(result: dict[str, Any], checkpoint: str, split: str, beam_size: int) -> dict[str, Any]:
    """What `evaluate --out` writes: the scores, with what is needed to compare it with another run
    (`evaluate --compare`): the signature and every image's scores and caption."""
    return {"checkpoint": checkpoint, "split": split, "beam": beam_size, "images": len(result["predictions"]),
            "skipped_images": result.get("skipped_images", []), "skipped_metrics": result.get("skipped_metrics", {}),
            "metrics": result["metrics"], "intervals": result["intervals"], "signature": result["signature"],
            "diagnostics": result["diagnostics"], "semantic": result["semantic"],
            "per_image": {str(i): {**s, "caption": result["predictions"][i]} for i, s in result["per_image"].items()}}


def results_json(predictions: Mapping[int, str]) -> list[dict[str, Any]]:
    """COCO results format: [{"image_id", "caption"}], scoreable by any COCO caption evaluator."""
    return [{"image_id": i, "caption": c} for i, c in sorted(predictions.items())]


def format_table(rows: Mapping[str, Mapping[str, float | None]]) -> str:
    """rows {name: metrics} -> a fixed-width text table with the standard metric columns."""
    names = [m for m in METRICS if any(m in r for r in rows.values())]
    width = max(len(n) for n in rows) + 2
    lines = [" " * width + "".join(f"{m:>9}" for m in names)]
    for row_name, metrics in rows.items():
        values = [metrics.get(m, float("nan")) for m in names]        # None: n/a (too few images for it)
        lines.append(f"{row_name:<{width}}" + "".join(f"{'n/a':>9}" if v is None else f"{v:>9.3f}" for v in values))
    return "\n".join(lines)
