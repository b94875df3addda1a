"""Standard captioning metrics with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr (+ SPICE if installed).

The scorers are built one by one: `COCOEvalCap.evaluate()` always builds SPICE, which
downloads Stanford CoreNLP and so fails offline. SPICE runs only when its jars are
already in place. The PTB tokenizer and METEOR need Java; without it the captions are
tokenized in Python (the same rules as the vocabulary) and METEOR is skipped, loudly.
The two Java programs are run here, not through pycocoevalcap's wrappers, with a timeout
(CAPTIONING_JAVA_TIMEOUT seconds per answer, default 120): a JVM that cannot start (say
JAVA_TOOL_OPTIONS=-Xms3g against METEOR's -Xmx2G) or never answers is skipped with a
warning, where pycocoevalcap's METEOR would wait forever. SPICE (a long batch job: CoreNLP
parses every caption) has its own limit, CAPTIONING_SPICE_TIMEOUT seconds for the whole run
(default 1800) or score_captions(spice_timeout=...): past it SPICE is reported as skipped, with the
reason, and every other metric is kept.

On a synthetic set whose captions file carries the generator's truth, `evaluate_checkpoint`
also reports semantic accuracy (captioning.semantics): whether the captions name the right
objects, which n-gram metrics cannot tell.
"""
import collections
import numbers
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
from collections import Counter

from .diagnostics import CIDER_MIN_IMAGES, bleu_statistics, too_few_images
from .karpathy import karpathy_test_images
from .vocabulary import caption_tokens, load_coco, tokenize

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def check_count(name, value):
    """`value` if it is a whole number >= 1 (a beam size, a number of images), else a ValueError naming
    `name`. The notebooks check their parameters with it, evaluate_checkpoint its arguments."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


def count_flag(text):
    """An argparse `type` for the CLI's count flags (--beam, --max-images...): the whole number in `text`, or
    argparse's one-line error naming the flag ("argument --max-images: must be >= 1, got 0")."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def java_available():
    return shutil.which("java") is not None


def spice_available():
    import pycocoevalcap.spice as spice

    return os.path.exists(os.path.join(os.path.dirname(spice.__file__), "lib", "stanford-corenlp-3.6.0.jar"))


def _python_tokenize(captions_for_image):
    return {k: [" ".join(tokenize(c)) for c in v] for k, v in captions_for_image.items()}


class JavaFailed(RuntimeError):
    """A Java scorer could not start, failed, or did not answer in time."""


def java_timeout():
    return float(os.environ.get("CAPTIONING_JAVA_TIMEOUT", "120"))


def spice_timeout():
    """Seconds SPICE may run in all (CAPTIONING_SPICE_TIMEOUT, default 1800); a bad value is a ValueError naming it."""
    text = os.environ.get("CAPTIONING_SPICE_TIMEOUT", "1800")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"CAPTIONING_SPICE_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return value


class _JavaProcess:
    """A Java program in its own process group, read by a thread, so that every wait has a timeout
    and the whole group can be killed (a `java` on the PATH may be a wrapper script)."""

    def __init__(self, cmd, cwd):
        try:
            self.p = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            raise JavaFailed(f"cannot start {cmd[0]}: {e}") from None
        self.lines = queue.Queue()
        self.said = collections.deque(maxlen=3), collections.deque(maxlen=3)    # last lines of stdout, stderr
        self.readers = [threading.Thread(target=self._read, args=(pipe, put, said), daemon=True)
                        for pipe, put, said in ((self.p.stdout, self.lines.put, self.said[0]),
                                                (self.p.stderr, None, self.said[1]))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(pipe, put, said):
        for line in pipe:
            said.append(line)
            if put:
                put(line)
        if put:
            put(None)

    def why(self, default):
        """What Java said last before it died (a JVM that cannot start says it on stdout), else `default`."""
        for reader in self.readers:
            reader.join(timeout=2)
        said = [line.decode(errors="replace").strip() for line in [*self.said[0], *self.said[1]]]
        said = [line for line in said if line and not line.startswith("Picked up JAVA_TOOL_OPTIONS")]
        return ": ".join(said[-2:]) if said else default

    def finish(self, timeout):
        """Wait for the program to end by itself; an exit code other than 0 is a failure."""
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise JavaFailed(f"it did not end within {timeout:g} s") from None
        if self.p.returncode:
            raise JavaFailed(self.why(f"java exited with code {self.p.returncode}"))

    def ask(self, text, answers, timeout):
        """Send one line; return the next `answers` lines of output."""
        try:
            self.p.stdin.write(text.encode() + b"\n")
            self.p.stdin.flush()
        except OSError:                             # BrokenPipeError: the JVM is gone
            self.p.wait()
            raise JavaFailed(self.why(f"java exited with code {self.p.returncode}")) from None
        return [self.read(timeout) for _ in range(answers)]

    def read(self, timeout):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise JavaFailed(f"no answer within {timeout:g} s") from None
        if line is None:
            self.p.wait()
            raise JavaFailed(self.why(f"java exited with code {self.p.returncode}"))
        return line.decode(errors="replace").rstrip("\n")

    def close(self):
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.p.wait()
        for pipe in (self.p.stdin, self.p.stdout, self.p.stderr):
            try:
                pipe.close()
            except OSError:
                pass


def ptb_tokenize(captions_for_image, timeout=None):
    """pycocoevalcap's PTBTokenizer ({key: [captions]} -> {key: [tokenized]}), with a timeout.

    Blank captions (an empty prediction) are not sent to Java: they tokenize to "" here. The tokenizer
    reads one caption a line, and a blank last line is no line at all to it, so it would answer one
    line too few."""
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    timeout = java_timeout() if timeout is None else timeout
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
            java = _JavaProcess(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                                 "-lowerCase", path], folder)
            try:
                java.p.stdin.close()
                lines = [java.read(timeout) for _ in asked]
                java.finish(timeout)
            finally:
                java.close()
    answers = iter(lines)
    out = {}
    for key, sentence in zip(keys, sentences):
        line = next(answers) if sentence else ""
        out.setdefault(key, []).append(" ".join(w for w in line.rstrip().split(" ") if w and w not in ptb.PUNCTUATIONS))
    return out


def meteor_score(gts, res, timeout=None):
    """pycocoevalcap's METEOR (same jar, same protocol) -> (score, per-image scores), with a timeout."""
    import pycocoevalcap.meteor.meteor as meteor

    timeout = java_timeout() if timeout is None else timeout
    java = _JavaProcess(["java", "-jar", "-Xmx2G", meteor.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"],
                        os.path.dirname(os.path.abspath(meteor.__file__)))
    try:
        eval_line = "EVAL"
        for i in gts:
            hypothesis = res[i][0].replace("|||", "").replace("  ", " ")
            eval_line += " ||| " + java.ask(" ||| ".join(("SCORE", " ||| ".join(gts[i]), hypothesis)), 1,
                                            timeout)[0].strip()
        answers = java.ask(eval_line, len(gts) + 1, timeout)
        try:
            values = [float(a) for a in answers]
        except ValueError:
            raise JavaFailed(f"METEOR answered {answers[-1][:80]!r}, not a score") from None
    finally:
        java.close()
    return values[-1], values[:-1]


def spice_score(gts, res, timeout=None):
    """pycocoevalcap's SPICE (same jar, same arguments) -> (score, per-image scores), within `timeout`
    seconds for the whole run (spice_timeout() when None); JavaFailed when it fails or runs out of time."""
    import json

    import numpy as np
    import pycocoevalcap.spice.spice as spice

    timeout = spice_timeout() if timeout is None else timeout
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
        java = _JavaProcess(["java", "-jar", "-Xmx8G", spice.SPICE_JAR, in_path, *cached, "-out", out_path,
                             "-subset", "-silent"], home)
        try:
            java.p.stdin.close()
            java.finish(timeout)
        except JavaFailed:
            if java.p.poll() is None:
                raise JavaFailed(f"it did not end within {timeout:g} s (its limit: spice_timeout, "
                                 f"CAPTIONING_SPICE_TIMEOUT)") from None
            raise
        finally:
            java.close()
        try:
            with open(out_path) as f:
                results = {item["image_id"]: item["scores"] for item in json.load(f)}
            scores = [results[i] for i in ids]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise JavaFailed(f"SPICE wrote no usable results ({type(e).__name__}: {e})") from None

    def number(value):
        try:
            return float(value)
        except (TypeError, ValueError):
            return float("nan")

    per_image = [{category: {k: number(v) for k, v in values.items()} for category, values in s.items()}
                 for s in scores]
    return float(np.mean([p["All"]["f"] for p in per_image])), per_image


def score_captions(references, predictions, use_java=None, log=print, details=None, spice_timeout=None):
    """references {image_id: [captions]}, predictions {image_id: caption} -> (metrics, per-image scores).

    Per-image scores are {image_id: {metric: value}}, for finding the best and worst examples, plus
    "bleu": the image's BLEU counts (diagnostics.bleu_statistics), from which any subset's corpus
    BLEU can be recomputed. A `details` dict receives "tokenizer": "ptb-java" or "python", and "skipped":
    {metric: why} for a metric that could not be computed (METEOR, SPICE: Java failed or ran out of time).
    `spice_timeout`: seconds SPICE may run (None: CAPTIONING_SPICE_TIMEOUT, default 1800).
    On fewer than diagnostics.CIDER_MIN_IMAGES images CIDEr is None (n/a), with a warning: its idf
    is 0 for every n-gram there.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = sorted(predictions)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"no reference captions for image ids {missing[:5]}")
    if not ids:
        raise ValueError("nothing to score: no predictions")
    use_java = java_available() if use_java is None else use_java
    gts = {i: list(references[i]) for i in ids}
    res = {i: [predictions[i]] for i in ids}
    if use_java:
        try:  # one JVM for both: keys ("g", id) and ("r", id)
            both = ptb_tokenize({**{("g", i): c for i, c in gts.items()}, **{("r", i): c for i, c in res.items()}})
            gts, res = {i: both[("g", i)] for i in ids}, {i: both[("r", i)] for i in ids}
        except JavaFailed as e:
            log(f"warning: Java cannot run the PTB tokenizer ({e}): tokenizing in Python and skipping METEOR")
            use_java = False
    else:
        log("warning: Java not found: tokenizing in Python and skipping METEOR (install a JRE for the full set)")
    if not use_java:
        gts, res = _python_tokenize(gts), _python_tokenize(res)

    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"])]
    if use_java:
        scorers.append((None, ["METEOR"]))
    scorers.append((Rouge(), ["ROUGE_L"]))
    if len(ids) >= CIDER_MIN_IMAGES:
        scorers.append((Cider(), ["CIDEr"]))
    else:
        log(f"warning: CIDEr is n/a on {len(ids)} image: its idf, log(N/df), is 0 for every n-gram when N = 1 "
            f"(it needs {CIDER_MIN_IMAGES} images)")
    if use_java and spice_available():
        scorers.append(("spice", ["SPICE"]))
    metrics, per_image, skipped = {}, {i: {} for i in ids}, {}
    for scorer, names in scorers:
        if scorer is None or scorer == "spice":
            try:
                score, scores = meteor_score(gts, res) if scorer is None else \
                    spice_score(gts, res, spice_timeout)
            except JavaFailed as e:
                log(f"warning: METEOR skipped: Java cannot run it ({e})" if scorer is None else
                    f"warning: SPICE skipped: {e}; the other metrics are kept")
                skipped[names[0]] = str(e)
                continue
        else:
            score, scores = scorer.compute_score(gts, res, **({"verbose": 0} if isinstance(scorer, Bleu) else {}))
        if len(names) == 1:
            score, scores = [score], [scores]
        for name, value, values in zip(names, score, scores):
            metrics[name] = float(value)
            for i, v in zip(ids, values):
                per_image[i][name] = float(v) if not isinstance(v, dict) else float(v["All"]["f"])
    if "CIDEr" not in metrics and len(ids) < CIDER_MIN_IMAGES:
        metrics["CIDEr"] = None
        for i in ids:
            per_image[i]["CIDEr"] = None
    for i, row in zip(ids, bleu_statistics(gts, res, ids)):
        per_image[i]["bleu"] = row.tolist()
    if details is not None:
        details["tokenizer"] = "ptb-java" if use_java else "python"
        details["skipped"] = skipped
    return metrics, per_image


def heldout_split(config, split="val"):
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


def blind_baseline(train_json, image_ids):
    """The most frequent training caption (after tokenisation), predicted for every image."""
    caption = Counter(caption_tokens(train_json, progress=False).values()).most_common(1)[0][0]
    return {i: caption for i in image_ids}


def evaluate_checkpoint(checkpoint, split="val", beam_size=3, device="cpu", batch_size=64, weights=None,
                        progress=True, max_images=None, data_dir=None, spice_timeout=None):
    """Caption the held-out split with a checkpoint and score it. Returns a dict:
    {"metrics", "per_image", "predictions" {id: caption}, "references" {id: [captions]}, "paths" {id: path},
    "skipped_images" (file names that could not be read: skipped below 1% of the split, refused above),
    "skipped_metrics" ({metric: why}: METEOR or SPICE that Java could not run, or SPICE past its timeout),
    "semantic" (semantic_accuracy() where the captions file has ground truth, else None), "config",
    "diagnostics" (diagnostics.caption_diagnostics), "intervals" (bootstrap 95% intervals of BLEU-4
    and CIDEr), "signature" (how the scores were computed)}.

    `max_images`: score only the first N images of the split (None: all; below 1 is a ValueError).
    On a split too small for them (diagnostics.CIDER_MIN_IMAGES, INTERVAL_MIN_IMAGES), CIDEr and the
    intervals are None, with a warning, not a confident 0."""
    from . import diagnostics
    from .checkpoint import load_captioner
    from .data import skipped_line, too_many_unreadable
    from .inference import caption_images
    from .model import LENGTH_PENALTY
    from .semantics import ground_truth_from_coco, semantic_accuracy

    check_count("beam_size", beam_size)
    check_count("batch_size", batch_size)
    if max_images is not None:                # None: all of them; 0 or less is a mistake, not "all"
        check_count("max_images", max_images)
    encoder, decoder, vocab, config = load_captioner(checkpoint, device, weights)
    if data_dir:
        config.data_dir = data_dir
    folder, coco, ids = heldout_split(config, split)
    if max_images is not None:
        ids = ids[:max_images]
    paths = {i: os.path.join(folder, coco.imgs[i]["file_name"]) for i in ids}
    results = caption_images([paths[i] for i in ids], encoder, decoder, vocab, config, device, beam_size,
                             batch_size, progress=progress)
    failed = {os.path.basename(p): err for p, cap, err in results if err}
    error = too_many_unreadable(failed, len(ids), folder)     # more than 1%: refused, naming a few
    if error:
        raise error
    if failed:                                                  # fewer: skipped, counted and named
        print(f"{skipped_line(failed)} ({folder}: not scored)")
    predictions = {i: cap for i, (_, cap, err) in zip(ids, results) if err is None}
    references = {i: [a["caption"] for a in coco.imgToAnns[i]] for i in predictions}
    details = {}
    metrics, per_image = score_captions(references, predictions, details=details, spice_timeout=spice_timeout)
    truth = ground_truth_from_coco(coco.dataset, source=config.captions_json(split))
    semantic = semantic_accuracy(predictions, truth) if truth and predictions else None
    ids = sorted(per_image)
    warning = too_few_images(len(ids))
    if warning:
        print(warning)
    training = caption_tokens(config.captions_json("train"), progress=False).values() \
        if os.path.exists(config.captions_json("train")) else ()
    return {"metrics": metrics, "per_image": per_image, "predictions": predictions, "references": references,
            "paths": paths, "semantic": semantic, "config": config, "skipped_images": sorted(failed),
            "skipped_metrics": details.get("skipped", {}),
            "diagnostics": diagnostics.caption_diagnostics(predictions, references, training),
            "intervals": diagnostics.bootstrap_intervals([per_image[i]["bleu"] for i in ids],
                                                         [per_image[i]["CIDEr"] for i in ids]),
            "signature": diagnostics.signature(details["tokenizer"], references, split, len(ids), beam_size,
                                               LENGTH_PENALTY)}


def result_record(result, checkpoint, split, beam_size):
    """What `evaluate --out` writes: the scores, with what is needed to compare it with another run
    (`evaluate --compare`): the signature and every image's scores and caption."""
    return {"checkpoint": checkpoint, "split": split, "beam": beam_size, "images": len(result["predictions"]),
            "skipped_images": result.get("skipped_images", []), "skipped_metrics": result.get("skipped_metrics", {}),
            "metrics": result["metrics"], "intervals": result["intervals"], "signature": result["signature"],
            "diagnostics": result["diagnostics"], "semantic": result["semantic"],
            "per_image": {str(i): {**s, "caption": result["predictions"][i]} for i, s in result["per_image"].items()}}


def results_json(predictions):
    """COCO results format: [{"image_id", "caption"}], scoreable by any COCO caption evaluator."""
    return [{"image_id": i, "caption": c} for i, c in sorted(predictions.items())]


def format_table(rows):
    """rows {name: metrics} -> a fixed-width text table with the standard metric columns."""
    names = [m for m in METRICS if any(m in r for r in rows.values())]
    width = max(len(n) for n in rows) + 2
    lines = [" " * width + "".join(f"{m:>9}" for m in names)]
    for row_name, metrics in rows.items():
        values = [metrics.get(m, float("nan")) for m in names]        # None: n/a (too few images for it)
        lines.append(f"{row_name:<{width}}" + "".join(f"{'n/a':>9}" if v is None else f"{v:>9.3f}" for v in values))
    return "\n".join(lines)
