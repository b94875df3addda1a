"""A model card (README.md, in the Hugging Face template's form) beside a run's best.ckpt.

    info = {"training": training_info(config, len(vocab), step=..., epoch=..., device="cpu", wall_seconds=...,
                                      train_images=..., val_images=...)}
    write_card(config.models_dir, info)              # training does this when it ends (training._fit)
    complete_card(folder, evaluation_info(result, "best.ckpt", "val", 3))   # evaluate_checkpoint does this

The card is YAML front matter (pipeline_tag, license, library_name, tags, datasets, metrics and, once the
model is evaluated, a model-index of its results) and short sections: model description, intended use and
limitations, training data, training procedure, evaluation, how to use. Its last line is an HTML comment
holding, as JSON, everything it was rendered from (`read_card_info`), so that evaluation can add its results
and render it again. The card is generated: edits to it are lost when evaluation rewrites it. A README.md
without that last line is not ours, and is never overwritten.

License: the repository has no LICENSE file, so the card's `license: mit` is this project's choice for the
cards it writes (LICENSE below); change it here if the project adopts another. A COCO-trained model also
inherits the terms of COCO's annotations (CC BY 4.0) and of its Flickr images.

No torch import: the CLI and evaluation import this module.
"""
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from .atomic import atomic_write
from .diagnostics import format_signature

LICENSE = "mit"
MARKER = "<!-- captioning-model-card "
CARD_NAME = "README.md"
PATH_FIELDS = ("data_dir", "models_dir")     # where a run was, not what it is: left out of the card
# (key in evaluate_checkpoint's metrics, name on the card, Hugging Face metric type)
METRIC_NAMES = (("Bleu_1", "BLEU-1", "bleu"), ("Bleu_2", "BLEU-2", "bleu"), ("Bleu_3", "BLEU-3", "bleu"),
                ("Bleu_4", "BLEU-4", "bleu"), ("METEOR", "METEOR", "meteor"), ("ROUGE_L", "ROUGE-L", "rouge"),
                ("CIDEr", "CIDEr", "cider"), ("SPICE", "SPICE", "spice"))
INDEXED = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")     # the model-index's: the headline scores
SEMANTIC_KEYS = ("objects", "relation", "all")                 # semantics.semantic_accuracy's, on the card
# fields that say nothing about a run they do not apply to: left out of its table (they stay in the JSON)
_ONLY_FOR = {"attention": ("grid_layer", "grid_position", "attention_size", "alpha_c", "dropout"),
             "scst": ("scst_samples", "scst_baseline", "scst_xe"),
             "standin": ("standin_steps", "standin_seed"),
             "train_backbone": ("backbone_lr",),
             "cache": ("cache_kind", "cache_views", "cache_jitter")}
# how a run was saved and logged, not what it learned: left out of its table too
_BOOKKEEPING = ("save_every", "log_every", "keep_epoch", "channels_last")


# ---- the pieces of info --------------------------------------------------------------------------

def _is_path(weights: Any) -> bool:
    return isinstance(weights, str) and (os.sep in weights or weights.endswith((".pth", ".pt")))


def _short_path(path: str) -> str:
    """The last folder and the file name ("tiny/best.ckpt"): enough to recognise, nothing of the machine."""
    path = os.path.normpath(path)
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def training_info(config: Any, vocab_size: int, *, step: int, epoch: int, device: str | None,
                  epochs: int | None = None,
                  wall_seconds: float | None,
                  train_images: int | None, val_images: int | None, init_from: Mapping[str, Any] | None = None,
                  synthetic: bool | None = None) -> dict[str, Any]:
    """The training part of a card's info, plain JSON: the config's hyperparameters (without its paths; a local
    weights file by its name only), the data folder's name, the vocabulary size, the steps and epochs done, the
    hardware, the wall time and the image counts (None: not known, as for a card export makes from a bare
    checkpoint). `epochs`: the epochs the run planned, where min_steps made them more than config.epochs.

    `init_from`: the checkpoint the run started from (training.start_from's dict: path, step, objective).
    `synthetic`: whether the data is a synthetic set whose captions file carries the generator's truth
    (tinyset, relworld); None guesses it from the preset (anything but coco)."""
    hyper = {k: v for k, v in config.hyperparameters().items() if k not in PATH_FIELDS}
    if _is_path(hyper.get("weights")):
        hyper["weights"] = os.path.basename(hyper["weights"])
    info: dict[str, Any] = {
        "run": os.path.basename(os.path.normpath(config.models_dir)),
        "data": os.path.basename(os.path.normpath(config.data_dir)),
        "synthetic": config.preset != "coco" if synthetic is None else bool(synthetic),
        "hyperparameters": hyper, "vocab_size": int(vocab_size), "step": int(step), "epoch": int(epoch),
        "epochs": int(epochs) if epochs else hyper.get("epochs"),
        "device": None if device is None else str(device),
        "wall_seconds": None if wall_seconds is None else round(float(wall_seconds), 1),
        "train_images": train_images, "val_images": val_images, "init_from": None}
    if init_from:
        where = init_from.get("path") or init_from.get("checkpoint")
        info["init_from"] = {"checkpoint": _short_path(where) if where else None, "step": init_from.get("step"),
                             "objective": init_from.get("objective")}
    if config.decoder == "attention":
        from .attention import grid_cells  # lazy: torch, which this module does not otherwise need

        layer = config.resolved_grid_layer
        info["grid"] = {"layer": layer, "cells": grid_cells(config.crop_size, layer)}
    return info


def _number(value: Any) -> float | None:
    """A score as plain JSON, to 6 decimals (what a card shows is 3); None for n/a."""
    return None if value is None or not math.isfinite(float(value)) else round(float(value), 6)


def _span(span: Any) -> list[float] | None:
    if span is None:
        return None
    low, high = _number(span[0]), _number(span[1])
    return None if low is None or high is None else [low, high]


def evaluation_info(result: Mapping[str, Any], checkpoint: str, split: str, beam: int) -> dict[str, Any]:
    """The evaluation part of a card's info, plain JSON, from what evaluation.evaluate_checkpoint returns:
    the metrics, the bootstrap intervals, the signature, the semantic accuracies with their intervals (no
    per-image data), and what was evaluated (checkpoint file name, data folder, split, beam, image count)."""
    config = result.get("config")
    semantic = result.get("semantic")
    info: dict[str, Any] = {
        "checkpoint": os.path.basename(checkpoint),
        "data": os.path.basename(os.path.normpath(config.data_dir)) if config is not None else None,
        "split": split, "beam": int(beam), "images": len(result["predictions"]),
        "metrics": {k: _number(v) for k, v in result["metrics"].items()},
        "intervals": {k: _span(v) for k, v in (result.get("intervals") or {}).items()},
        "signature": dict(result["signature"]),
        "semantic": None}
    skipped = {k: str(v) for k, v in (result.get("skipped_metrics") or {}).items()}
    if skipped:
        info["skipped_metrics"] = skipped
    if semantic:
        spans = semantic.get("intervals") or {}
        info["semantic"] = {k: _number(semantic.get(k)) for k in SEMANTIC_KEYS}
        info["semantic"]["intervals"] = {k: _span(spans.get(k)) for k in SEMANTIC_KEYS}
    return info


# ---- rendering -----------------------------------------------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._()/+-]*$")


def _yaml(value: Any) -> str:
    """A YAML scalar: plain where it is unambiguous, else a JSON string (which YAML reads as a quoted one)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    text = str(value)
    reserved = text.lower() in ("true", "false", "yes", "no", "on", "off", "null", "none", "~")
    if _PLAIN.match(text) and not reserved and not re.fullmatch(r"[0-9.eE+-]+", text):
        return text
    return json.dumps(text)


def _dataset(training: Mapping[str, Any]) -> str:
    return str(training.get("data") or "unknown")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _count(value: Any) -> str:
    return "unknown" if value is None else f"{value:,}"


def _percent(value: float | None, span: Any = None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" + ("" if span is None else f" [{100 * span[0]:.1f}, {100 * span[1]:.1f}]")


def _front_matter(info: Mapping[str, Any]) -> list[str]:
    training, evaluation = info.get("training") or {}, info.get("evaluation")
    hyper = training.get("hyperparameters") or {}
    attention = hyper.get("decoder") == "attention"
    tags = ["image-captioning", "show-attend-and-tell" if attention else "show-and-tell"]
    if hyper.get("objective") == "scst":
        tags.append("self-critical")
    lines = ["---", "pipeline_tag: image-to-text", f"license: {LICENSE}", "library_name: pytorch", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += ["datasets:", f"- {_yaml(_dataset(training))}", "metrics:", "- bleu", "- meteor", "- rouge", "- cider"]
    if evaluation:
        data = evaluation.get("data") or _dataset(training)
        synthetic = " (synthetic)" if training.get("synthetic") and data == _dataset(training) else ""
        lines += ["model-index:", f"- name: {_yaml(training.get('run') or data)}", "  results:",
                  "  - task: {type: image-to-text, name: Image captioning}",
                  f"    dataset: {{type: {_yaml(data)}, name: {_yaml(data + synthetic)}, "
                  f"split: {_yaml(evaluation['split'])}}}", "    metrics:"]
        args = f"{{beam: {evaluation['beam']}, images: {evaluation['images']}}}"
        for key, name, kind in METRIC_NAMES:
            value = (evaluation.get("metrics") or {}).get(key)
            if value is not None and key in INDEXED:
                lines.append(f"    - {{type: {kind}, name: {name}, value: {value:.4f}, args: {args}}}")
    return lines + ["---"]


def _weights(hyper: Mapping[str, Any]) -> str:
    weights = hyper.get("weights")
    if weights == "standin":
        return (f"the tiny preset's synthetic stand-in for ImageNet (pretrained {hyper.get('standin_steps')} steps "
                f"on synthetic shape scenes)")
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        return "random initialisation" + ("" if hyper.get("train_backbone") else
                                          " (BatchNorm statistics estimated from training images)")
    if _is_path(weights):
        return f"a local weights file ({weights})"
    return f"ImageNet ({weights})"


def _description(training: Mapping[str, Any]) -> list[str]:
    hyper = training.get("hyperparameters") or {}
    backbone = str(hyper.get("backbone", "?")).replace("resnet", "ResNet-")
    frozen = "trained with the decoder" if hyper.get("train_backbone") else "frozen"
    size, hidden = hyper.get("embedding_size"), hyper.get("hidden_layer_size")
    words = (f"a vocabulary of {_count(training.get('vocab_size'))} words, captions up to "
             f"{hyper.get('max_seq_len')} tokens")
    if hyper.get("decoder") == "attention":
        grid = training.get("grid") or {}
        cells = grid.get("cells")
        placed = ", plus a fixed code of its place" if hyper.get("grid_position") else ""
        what = (f"Show, Attend and Tell: a CNN encoder ({backbone}, weights: {_weights(hyper)}; {frozen}) cut after "
                f"ResNet layer {grid.get('layer', '?')}, each cell of its {cells} x {cells} grid passed through the "
                f"chapter's Linear + BatchNorm head to {size}-d{placed}; an attention decoder (LSTM cell, hidden size "
                f"{hidden}, additive attention {hyper.get('attention_size')} wide, dropout {hyper.get('dropout')}, "
                f"doubly stochastic regularisation alpha_c {hyper.get('alpha_c')}) that reads the grid before each "
                f"word; {words}.")
    else:
        what = (f"The chapter's Show and Tell model (Mastering PyTorch, chapter 2): a CNN encoder ({backbone}, "
                f"weights: {_weights(hyper)}; {frozen}) whose pooled features pass through a Linear + BatchNorm head "
                f"to a {size}-d embedding, and a {hyper.get('num_layers')}-layer LSTM decoder (hidden size {hidden}); "
                f"{words}.")
    if hyper.get("objective") == "scst":
        start = training.get("init_from") or {}
        source = (f"`{start.get('checkpoint')}` ({start.get('objective')}, step {start.get('step')})"
                  if start.get("checkpoint") else "a cross-entropy checkpoint (not recorded)")
        objective = (f"Objective: self-critical sequence training on CIDEr-D ({hyper.get('scst_samples')} sampled "
                     f"captions per image, {hyper.get('scst_baseline')} baseline, cross-entropy weight "
                     f"{hyper.get('scst_xe')}), started from {source}.")
    else:
        objective = "Objective: cross-entropy of each reference word given the ones before it (teacher forcing)."
    return ["## Model description", "", what, "", objective]


def _limitations(training: Mapping[str, Any]) -> list[str]:
    if training.get("synthetic"):
        text = (f"A teaching model that only knows coloured shapes on a plain background; it will caption any "
                f"photograph as shapes. It was trained on `{_dataset(training)}`, a synthetic set: use it to learn "
                f"and test the pipeline, not to describe real images.")
    else:
        text = (f"General English captions of everyday scenes, in the style of the `{_dataset(training)}` captions. "
                f"It carries COCO's known biases (which scenes, people and activities are shown, and how annotators "
                f"described them); its output has no safety filtering; do not use it where accessibility depends "
                f"on it (alt text, descriptions for blind users) without human review.")
    return ["## Intended use and limitations", "", text]


def _training_data(training: Mapping[str, Any]) -> list[str]:
    hyper = training.get("hyperparameters") or {}
    kind = "synthetic, COCO 2014 layout" if training.get("synthetic") else "COCO 2014 layout"
    return ["## Training data", "",
            f"`{_dataset(training)}` ({kind}): {_count(training.get('train_images'))} training images, "
            f"{_count(training.get('val_images'))} validation images (those the validation loss reads). "
            f"Vocabulary: {_count(training.get('vocab_size'))} words, those seen at least "
            f"{hyper.get('vocab_threshold')} times in the training captions."]


def _shown_hyperparameters(hyper: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters that apply to this run (the attention decoder's only for it, and so on), without
    the bookkeeping ones."""
    hidden: set[str] = set(_BOOKKEEPING)
    for condition, names in _ONLY_FOR.items():
        applies = {"attention": hyper.get("decoder") == "attention", "scst": hyper.get("objective") == "scst",
                   "standin": hyper.get("weights") == "standin", "train_backbone": bool(hyper.get("train_backbone")),
                   "cache": bool(hyper.get("cache")) and not hyper.get("train_backbone")}[condition]
        if not applies:
            hidden.update(names)
    return {k: v for k, v in hyper.items() if k not in hidden}


def _procedure(training: Mapping[str, Any]) -> list[str]:
    hyper = training.get("hyperparameters") or {}
    planned = training.get("epochs") or hyper.get("epochs")
    epochs = f"{training.get('epoch')} of {planned} epochs" if planned else \
        f"{training.get('epoch')} epochs"
    device = training.get("device") or "hardware not recorded"
    lines = ["## Training procedure", "",
             f"{epochs} done, {_count(training.get('step'))} steps, on {device}; wall time "
             f"{_duration(training.get('wall_seconds'))} (the session that ended the run). The hyperparameters "
             f"that apply to this run (all are in the JSON on the last line):", "",
             "| hyperparameter | value | hyperparameter | value |", "|---|---|---|---|"]
    items = list(_shown_hyperparameters(hyper).items())
    half = (len(items) + 1) // 2
    for (k1, v1), right in zip(items[:half], items[half:] + [("", "")]):
        k2, v2 = right
        lines.append(f"| {k1} | {v1} | {k2} | {v2} |")
    return lines


def _evaluation(info: Mapping[str, Any]) -> list[str]:
    evaluation = info.get("evaluation")
    if not evaluation and info.get("export"):
        return ["## Evaluation", "", "Not evaluated: evaluate the checkpoint (`python -m captioning evaluate "
                "--checkpoint RUN/best.ckpt`) and export it again, or score this folder (`python -m captioning "
                "evaluate --model THIS_FOLDER --data-dir DATA`)."]
    if not evaluation:
        return ["## Evaluation", "", "Not evaluated yet: run `python -m captioning evaluate --checkpoint "
                "FOLDER/best.ckpt` (FOLDER: this card's), or notebook 08; either completes this card."]
    metrics, intervals = evaluation.get("metrics") or {}, evaluation.get("intervals") or {}
    lines = ["## Evaluation", "",
             f"`{evaluation.get('checkpoint')}` on the {evaluation.get('split')} split of `{evaluation.get('data')}` "
             f"({_count(evaluation.get('images'))} images), beam {evaluation.get('beam')}; 95% bootstrap intervals "
             f"over images:", "", "| metric | value | 95% interval |", "|---|---|---|"]
    for key, name, _ in METRIC_NAMES:
        if key in metrics:
            value = metrics[key]
            span = intervals.get(key)
            shown = "n/a" if value is None else f"{value:.3f}"
            spanned = f"[{span[0]:.3f}, {span[1]:.3f}]" if span else ("n/a" if key in intervals else "")
            lines.append(f"| {name} | {shown} | {spanned} |")
    for name, why in (evaluation.get("skipped_metrics") or {}).items():
        lines.append(f"\n{name} skipped: {why}")
    if evaluation.get("signature"):
        lines += ["", f"`{format_signature(evaluation['signature'])}`"]
    semantic = evaluation.get("semantic")
    if semantic:
        spans = semantic.get("intervals") or {}
        parts = [f"{k} {_percent(semantic.get(k), spans.get(k))}" for k in SEMANTIC_KEYS]
        lines += ["", "Semantic accuracy (each caption parsed back and compared with the generator's truth): "
                  + ", ".join(parts) + "."]
    return lines


_CAPTION = 'caption_images(["image.jpg"], encoder, decoder, vocab, config, beam_size=3)   # [(path, caption, error)]'


def _how_to_use(info: Mapping[str, Any]) -> list[str]:
    export = info.get("export")
    if export:
        runtimes = '"torch", "onnx" or "onnx-int8"' if export.get("int8") else '"torch" or "onnx"'
        return ["## How to use", "",
                f"This folder is `{export.get('checkpoint')}` (after {export.get('epoch')} epochs, step "
                f"{_count(export.get('step'))}) exported: {', '.join(export.get('files') or ())}. With the "
                f"`captioning` library (runtime {runtimes}):", "",
                "```python", "from captioning.export import load_exported",
                "from captioning.inference import caption_images", "",
                'encoder, decoder, vocab, config = load_exported("THIS_FOLDER", runtime="onnx")',
                _CAPTION,
                "```", "",
                "or: `python -m captioning caption IMAGE --model THIS_FOLDER --runtime onnx`. Without the library: "
                "encoder.onnx maps a preprocessed image batch (resize, centre crop, ImageNet normalisation; "
                "config.json) to the first step's log-probabilities and the decoder state; decoder_step.onnx "
                "maps (token ids, state) to the next; vocab.json turns ids into words."]
    return ["## How to use", "", "```python", "from captioning.checkpoint import load_captioner",
            "from captioning.inference import caption_images", "",
            'encoder, decoder, vocab, config = load_captioner("best.ckpt")',
            _CAPTION,
            "```", "", "or: `python -m captioning caption IMAGE --checkpoint best.ckpt`"]


def _embedded(info: Mapping[str, Any]) -> str:
    """info as one line of JSON that cannot end the HTML comment around it (no '<' or '>' in it)."""
    text = json.dumps(info, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e")


_UNSAFE = str.maketrans({c: "_" for c in "<>`|\r\n"})


def _clean(value: Any) -> Any:
    """value with every string in it made safe to show in Markdown: no HTML, code span or table cell ends."""
    if isinstance(value, str):
        return value.translate(_UNSAFE)
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def card_text(info: Mapping[str, Any]) -> str:
    """The model card (Markdown) of `info` = {"training": training_info(...), "evaluation": evaluation_info(...)
    or absent, "export": what export.py wrote (checkpoint, epoch, step, files, int8) or absent}; its last line
    embeds info as JSON (read_card_info). Names from the machine (folders, the
    device) are shown without the characters that Markdown would read as markup; the JSON keeps them as they are."""
    embedded, info = info, _clean(info)
    training = info.get("training") or {}
    title = training.get("run") or _dataset(training)
    parts = [_front_matter(info),
             [f"# {title}: an image captioning model", "",
              "<!-- generated by captioning.modelcard (training, then evaluation): edits here are lost -->"],
             _description(training), _limitations(training), _training_data(training), _procedure(training),
             _evaluation(info), _how_to_use(info), [MARKER + _embedded(embedded) + " -->"]]
    return "\n\n".join("\n".join(part) for part in parts) + "\n"


# ---- files ---------------------------------------------------------------------------------------

def read_card_info(path: str) -> dict[str, Any] | None:
    """The info a card embeds, or None: no such file, not a card written here, or its JSON unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    last = next((line for line in reversed(lines) if line.strip()), "").strip()
    if not (last.startswith(MARKER) and last.endswith("-->")):
        return None
    try:
        info = json.loads(last[len(MARKER):-3])
    except ValueError:
        return None
    return info if isinstance(info, dict) and isinstance(info.get("training"), dict) else None


def write_card(folder: str, info: Mapping[str, Any]) -> str:
    """Write folder/README.md atomically from `info`; returns its path. A README.md there that is not a card
    written here (read_card_info) is kept as it is: FileExistsError (an OSError) naming it."""
    path = os.path.join(folder, CARD_NAME)
    if os.path.lexists(path) and read_card_info(path) is None:
        raise FileExistsError(f"{path} is not a model card written by captioning: it is left as it is "
                              f"(move it away for the card to be written)")
    text = card_text(info)
    with atomic_write(path, "wb") as f:
        f.write(text.encode("utf-8"))
    return path


def _rank(evaluation: Mapping[str, Any]) -> tuple[bool, int, bool]:
    return (evaluation.get("split") == "val", int(evaluation.get("images") or 0), int(evaluation.get("beam") or 1) > 1)


def supersedes(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    """Whether evaluation `new` replaces the card's `old` one: unless the old one is on held-out (val) images
    and the new one is not, or on more images (a --max-images run), or is beam search where the new one is
    greedy (notebook 08 evaluates both, beam first). A later evaluation that is as good replaces it."""
    return old is None or _rank(new) >= _rank(old)


def complete_card(folder: str, evaluation: dict[str, Any]) -> str | None:
    """Add `evaluation` (evaluation_info) to the card in folder/README.md and write it again; returns its path.

    None, and the file untouched, when there is no card there, the README.md is not one of ours, or the
    card holds an evaluation that this one does not supersede (see `supersedes`)."""
    path = os.path.join(folder, CARD_NAME)
    info = read_card_info(path)
    if info is None or not supersedes(evaluation, info.get("evaluation")):
        return None
    return write_card(folder, {**info, "evaluation": evaluation})
