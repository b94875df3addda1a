"""Standard captioning metrics with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr (+ SPICE if installed).

The scorers are built one by one: `COCOEvalCap.evaluate()` always builds SPICE, which
downloads Stanford CoreNLP and so fails offline. SPICE runs only when its jars are
already in place. The PTB tokenizer and METEOR need Java; without it the captions are
tokenized in Python (the same rules as the vocabulary) and METEOR is skipped, loudly.

On a synthetic set whose captions file carries the generator's truth, `evaluate_checkpoint`
also reports semantic accuracy (captioning.semantics): whether the captions name the right
objects, which n-gram metrics cannot tell.
"""
import os
import shutil
from collections import Counter

from .karpathy import karpathy_test_images
from .vocabulary import caption_tokens, load_coco, tokenize

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def java_available():
    return shutil.which("java") is not None


def spice_available():
    import pycocoevalcap.spice as spice

    return os.path.exists(os.path.join(os.path.dirname(spice.__file__), "lib", "stanford-corenlp-3.6.0.jar"))


def _python_tokenize(captions_for_image):
    return {k: [" ".join(tokenize(c)) for c in v] for k, v in captions_for_image.items()}


def score_captions(references, predictions, use_java=None, log=print):
    """references {image_id: [captions]}, predictions {image_id: caption} -> (metrics, per-image scores).

    Per-image scores are {image_id: {metric: value}}, for finding the best and worst examples.
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
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": c} for c in caps] for i, caps in gts.items()})
        res = tokenizer.tokenize({i: [{"caption": c} for c in caps] for i, caps in res.items()})
    else:
        log("warning: Java not found: tokenizing in Python and skipping METEOR (install a JRE for the full set)")
        gts, res = _python_tokenize(gts), _python_tokenize(res)

    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"])]
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor

        scorers.append((Meteor(), ["METEOR"]))
    scorers += [(Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]
    if use_java and spice_available():
        from pycocoevalcap.spice.spice import Spice

        scorers.append((Spice(), ["SPICE"]))
    metrics, per_image = {}, {i: {} for i in ids}
    for scorer, names in scorers:
        score, scores = scorer.compute_score(gts, res, **({"verbose": 0} if isinstance(scorer, Bleu) else {}))
        if len(names) == 1:
            score, scores = [score], [scores]
        for name, value, values in zip(names, score, scores):
            metrics[name] = float(value)
            for i, v in zip(ids, values):
                per_image[i][name] = float(v) if not isinstance(v, dict) else float(v["All"]["f"])
    return metrics, per_image


def heldout_split(config, split="val"):
    """(image folder, captions json, image ids) of the split the metrics are computed on.

    - with a Karpathy split file (`dataset_coco.json`, `dataset_flickr8k.json`...) in the data folder:
      its test images;
    - without it: the `config.heldout_images` val images with the smallest ids, all of them when 0
      (COCO: 5000 of val2014; train2014 is all we train on, so any part of val2014 is held out,
      and the smallest ids make it reproducible everywhere; the tiny preset: its whole val split).
    """
    if split not in ("val", "train"):
        raise ValueError(f"split must be 'val' or 'train', got {split!r}")
    folder = config.resized_images(split)
    if not os.path.isdir(folder):
        folder = config.split_images(split)
    json_path = config.captions_json(split)
    coco = load_coco(json_path)
    ids = sorted(coco.getImgIds())
    test_names = karpathy_test_images(config.data_dir) if split == "val" else None
    if test_names is not None:
        ids = [i for i in ids if coco.imgs[i]["file_name"] in test_names]
    elif split == "val" and config.heldout_images:
        ids = ids[:config.heldout_images]
    present = set(os.listdir(folder))
    ids = [i for i in ids if coco.imgs[i]["file_name"] in present]
    return folder, coco, ids


def blind_baseline(train_json, image_ids):
    """The most frequent training caption (after tokenisation), predicted for every image."""
    caption = Counter(caption_tokens(train_json, progress=False).values()).most_common(1)[0][0]
    return {i: caption for i in image_ids}


def evaluate_checkpoint(checkpoint, split="val", beam_size=3, device="cpu", batch_size=64, weights=None,
                        progress=True, max_images=None, data_dir=None):
    """Caption the held-out split with a checkpoint and score it. Returns a dict:
    {"metrics", "per_image", "predictions" {id: caption}, "references" {id: [captions]}, "paths" {id: path},
    "semantic" (semantic_accuracy() where the captions file has ground truth, else None), "config"}."""
    from .checkpoint import load_captioner
    from .inference import caption_images
    from .semantics import ground_truth_from_coco, semantic_accuracy

    encoder, decoder, vocab, config = load_captioner(checkpoint, device, weights)
    if data_dir:
        config.data_dir = data_dir
    folder, coco, ids = heldout_split(config, split)
    if max_images:
        ids = ids[:max_images]
    paths = {i: os.path.join(folder, coco.imgs[i]["file_name"]) for i in ids}
    results = caption_images([paths[i] for i in ids], encoder, decoder, vocab, config, device, beam_size,
                             batch_size, progress=progress)
    failed = [(p, err) for p, cap, err in results if err]
    if failed:
        print(f"skipped {len(failed)} unreadable image(s): " + "; ".join(f"{p}: {e}" for p, e in failed[:5]))
    predictions = {i: cap for i, (_, cap, err) in zip(ids, results) if err is None}
    references = {i: [a["caption"] for a in coco.imgToAnns[i]] for i in predictions}
    metrics, per_image = score_captions(references, predictions)
    truth = ground_truth_from_coco(coco.dataset, source=config.captions_json(split))
    semantic = semantic_accuracy(predictions, truth) if truth and predictions else None
    return {"metrics": metrics, "per_image": per_image, "predictions": predictions, "references": references,
            "paths": paths, "semantic": semantic, "config": config}


def results_json(predictions):
    """COCO results format: [{"image_id", "caption"}], scoreable by any COCO caption evaluator."""
    return [{"image_id": i, "caption": c} for i, c in sorted(predictions.items())]


def format_table(rows):
    """rows {name: metrics} -> a fixed-width text table with the standard metric columns."""
    names = [m for m in METRICS if any(m in r for r in rows.values())]
    width = max(len(n) for n in rows) + 2
    lines = [" " * width + "".join(f"{m:>9}" for m in names)]
    for row_name, metrics in rows.items():
        lines.append(f"{row_name:<{width}}" + "".join(f"{metrics.get(m, float('nan')):>9.3f}" for m in names))
    return "\n".join(lines)
