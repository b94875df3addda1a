"""Command line interface: the same functions the notebooks call.

    python -m captioning tinyset  --out DIR [--train N] [--val N] [--seed S] [--world shapes|relations]
                                  [--colours pink,navy=#1f3a93] [--shapes star,ring] [--background white]
    python -m captioning vocab    --captions JSON --out PKL [--threshold 4]
    python -m captioning resize   --src DIR --dst DIR [--size 256] [--workers N]
    python -m captioning train    --preset tiny|coco [--data-dir D] [--any-config-field VALUE ...]
                                  [--resume | --overwrite [delete]] [--init-from CKPT --objective scst]
    python -m captioning features [--preset tiny|coco] [--data-dir D] [--prune [--keep N]]
    python -m captioning standin  [--steps N] [--seed S] [--models-dir D] [--ship]
    python -m captioning caption  IMAGE_OR_DIR... --checkpoint CKPT | --model DIR [--runtime onnx] [--beam K] [--json]
                                  [--explain OUT_DIR [--explain-method attention|occlusion|gradcam]]
    python -m captioning evaluate --checkpoint CKPT | --model DIR --data-dir D [--runtime onnx] [--split val] [--beam K]
                                  [--out JSON] [--results JSON]
    python -m captioning export   --checkpoint CKPT --out DIR [--weights FILE] [--int8 IMAGES_DIR]
    python -m captioning import-chapter --encoder ENC.ckpt --decoder DEC.ckpt --vocabulary VOCAB.pkl --out CKPT
    python -m captioning export-chapter --checkpoint CKPT --out DIR

Heavy imports (torch, nltk, PIL, matplotlib) happen inside the command that needs them, so --help,
`resize` and `tinyset` start fast (tests/test_images.py checks that `resize` never imports torch).
"""
import argparse
import dataclasses
import json
import os
import pickle
import re
import sys
from collections.abc import Sequence

from .chapter_io import BOOK, export_chapter, import_chapter
from .config import Config, get_config
from .karpathy import coco_captions_file, ensure_coco_layout


def cmd_tinyset(args: argparse.Namespace) -> None:
    """Write a synthetic set: the tiny set (--world shapes) or the relations world (--world relations)."""
    from .relworld import make_relations_world  # lazy, both: PIL
    from .tinyset import BACKGROUND, make_tinyset, parse_colours, parse_rgb, parse_shapes

    colours = parse_colours(args.colours) if args.colours else None
    shapes = parse_shapes(args.shapes) if args.shapes else None
    background = parse_rgb(args.background) if args.background else BACKGROUND
    make = make_relations_world if args.world == "relations" else make_tinyset
    make(args.out, train=args.train, val=args.val, seed=args.seed, colours=colours, shapes=shapes,
         background=background)
    what = "the relations world" if args.world == "relations" else "the tiny dataset"
    print(f"wrote {what} ({args.train} train / {args.val} val images) to {args.out}")


def check_writable(path: str, flag: str) -> None:
    """Fail now, naming the flag, if `path` cannot be written, rather than after the work it would hold."""
    existed = os.path.lexists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise PermissionError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    if not existed:
        os.remove(path)


def cmd_vocab(args: argparse.Namespace) -> None:
    from .vocabulary import build_vocabulary, save_vocabulary  # lazy: nltk takes a fifth of a second

    if args.threshold < 1:
        raise ValueError(f"--threshold must be >= 1, got {args.threshold}")
    check_writable(args.out, "--out")
    vocab = build_vocabulary(coco_captions_file(args.captions), args.threshold)
    save_vocabulary(vocab, args.out)
    print(f"vocabulary of {len(vocab)} words saved to {args.out}")


def cmd_resize(args: argparse.Namespace) -> None:
    from .images import resize_images  # lazy: PIL, which --help and the other commands do not need

    r = resize_images(args.src, args.dst, args.size, args.workers)
    print(f"{r['resized']} resized, {r['skipped_up_to_date']} already up to date, {len(r['failed'])} unreadable "
          f"-> {args.dst}")
    if r["failed"]:
        sys.exit(1)


def _parse_value(field, text):
    """Text from --set FIELD=VALUE -> the field's type (bool, int, float, str, or None where allowed)."""
    kinds = [t for t in getattr(field.type, "__args__", (field.type,)) if t is not type(None)]
    if text.lower() == "none" and len(kinds) < len(getattr(field.type, "__args__", (field.type,))):
        return None
    kind = kinds[0]
    if kind is bool:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            sys.exit(f"error: {field.name} expects true/false, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    try:
        return kind(text)
    except ValueError:
        sys.exit(f"error: {field.name} expects {kind.__name__}, got {text!r}")


def _add_config_flags(parser):
    """--field-name VALUE for every Config field (but the preset), parsed by _parse_value in cmd_train."""
    helps = {"data_dir": "any COCO-layout folder (train2014/ val2014/ annotations/), or a Karpathy-format one "
                         "(dataset_*.json and the images: converted once)",
             "models_dir": "where checkpoints go (default: models_dir/<name of the data folder>)"}
    for field in dataclasses.fields(Config):
        if field.name != "preset":
            parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, metavar="VALUE",
                                help=helps.get(field.name, f"Config.{field.name} (default: the preset's)"))


def cmd_train(args: argparse.Namespace) -> None:
    from .training import train  # lazy: torch

    fields = {f.name: f for f in dataclasses.fields(Config)}
    # --epochs 3 and --set epochs=3 are the same override, parsed the same way
    overrides = {name: _parse_value(fields[name], getattr(args, name)) for name in fields
                 if name != "preset" and getattr(args, name, None) is not None}
    if args.no_cache:
        overrides["cache"] = False
    if args.dry_run:
        overrides.update(max_steps=2, save_every=1)
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            sys.exit(f"error: --set expects FIELD=VALUE with FIELD one of {sorted(fields)}; got {item!r}")
        overrides[name] = _parse_value(fields[name], value)
    config = get_config(args.preset, **overrides)
    summary = train(config, resume=args.resume, overwrite=args.overwrite or False, init_from=args.init_from)
    if summary["interrupted"]:                 # saved; the shell's codes for SIGTERM and Ctrl-C
        sys.exit(143 if summary["interrupted"] == "SIGTERM" else 130)


def cmd_features(args: argparse.Namespace) -> None:
    from .features import format_caches, list_feature_caches, prune_feature_caches  # lazy: torch

    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    features_dir = get_config(args.preset, **overrides).features_dir
    if args.prune:
        removed, in_use = prune_feature_caches(features_dir, args.keep)
        freed = sum(c["bytes"] for c in removed) / 1e6
        print(f"removed {len(removed)} feature cache(s), {freed:.1f} MB; "
              f"kept the {args.keep} most recently used of each split")
        for c in in_use:
            print(f"kept {os.path.basename(c['folder'])}: in use (being extracted, or open in a trainer)")
    caches = list_feature_caches(features_dir)
    if not caches:
        print(f"no feature caches in {features_dir}")
        return
    print(f"{features_dir}:")
    print(format_caches(caches))


def cmd_standin(args: argparse.Namespace) -> None:
    from .standin import SHIPPED_DIR, ensure_standin, ship_standin  # lazy: torch

    overrides = {name: value for name, value in (("standin_steps", args.steps), ("standin_seed", args.seed),
                                                 ("models_dir", args.models_dir)) if value is not None}
    path = ensure_standin(get_config("tiny", **overrides))
    print(f"the stand-in backbone: {path}")
    if args.ship:
        if os.path.dirname(path) == SHIPPED_DIR:
            print("it is the one that ships already")
        else:
            print(f"shipped: {ship_standin(path)} (commit it and its .json; the stand-in it replaces stays until "
                  f"you remove it)")


def cmd_caption(args: argparse.Namespace) -> None:
    # lazy, all four: torch
    from .device import pick_device
    from .export import load_model
    from .inference import caption_images, expand_paths
    from .saliency import pick_method, save_explanations

    if args.explain_method and not args.explain:
        raise ValueError("--explain-method says how to draw --explain OUT_DIR's maps: give --explain too")
    device = pick_device(args.device)
    missing: list[str] = []
    paths = expand_paths(args.images, missing)
    for path in missing:
        print(f"error: not an image file or folder: {path}", file=sys.stderr)
    if args.explain and args.runtime != "torch":
        raise ValueError(f"--explain reads the model's own tensors: it needs --runtime torch, not {args.runtime}")
    encoder, decoder, vocab, config = load_model(args.checkpoint, args.model, args.runtime, device, args.weights)
    method = pick_method(decoder, args.explain_method) if args.explain else None   # before captioning: a clear error
    if not paths:
        sys.exit("error: no images found in " + " ".join(args.images))
    results = caption_images(paths, encoder, decoder, vocab, config, device, args.beam, args.batch_size,
                             progress=len(paths) > args.batch_size)
    failed = len(missing)
    for path, caption, error in results:
        if error:
            failed += 1
            print(f"error: cannot read {path}: {error}", file=sys.stderr)
    ok = [(p, c) for p, c, e in results if e is None]
    if args.explain:
        for path in save_explanations([p for p, _ in ok], args.explain, encoder, decoder, vocab, config, args.beam,
                                      method):
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps([{"image": p, "caption": c} for p, c in ok], indent=1))
    else:
        for path, caption in ok:
            print(f"{path}\t{caption}")
    if failed:
        sys.exit(1)


def cmd_evaluate(args: argparse.Namespace) -> None:
    # lazy, all four: torch, and nltk (evaluation's imports take a third of a second)
    from . import diagnostics as dg
    from .device import pick_device
    from .evaluation import evaluate_checkpoint, format_table, result_record, results_json
    from .semantics import format_semantic

    if args.compare:
        files = []
        for path in args.compare:
            with open(path) as f:
                try:
                    files.append(json.load(f))
                except ValueError as e:
                    raise ValueError(f"{path}: not a JSON file written by evaluate --out ({e})") from None
        a, b = files
        for r, path in zip(files, args.compare):
            if "signature" in r:
                print(f"{path}: {dg.format_signature(r['signature'])}")
        print(dg.format_comparison(dg.compare_results(a, b, resamples=args.resamples), "A", "B"))
        return
    if not args.checkpoint and not args.model:
        raise ValueError("evaluate needs --checkpoint CKPT or --model DIR (or --compare A.json B.json)")
    for flag, path in (("--out", args.out), ("--results", args.results)):
        if path:
            check_writable(path, flag)
    device = pick_device(args.device)
    if args.data_dir:
        ensure_coco_layout(args.data_dir)
    r = evaluate_checkpoint(args.checkpoint, args.split, args.beam, device, args.batch_size, args.weights,
                            max_images=args.max_images, data_dir=args.data_dir, spice_timeout=args.spice_timeout,
                            model=args.model, runtime=args.runtime)
    print(format_table({f"beam {args.beam}" if args.beam > 1 else "greedy": r["metrics"]}))
    print(dg.format_intervals(r["metrics"], r["intervals"]))
    print(dg.format_signature(r["signature"]))
    print(dg.format_diagnostics(r["diagnostics"]))
    warning = dg.collapse_warning(r["diagnostics"])
    if warning:
        print(warning, file=sys.stderr)
    artifacts = dg.artifact_warning(r["diagnostics"])
    if artifacts:
        print(artifacts, file=sys.stderr)
    if r["semantic"]:
        print(format_semantic(r["semantic"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result_record(r, args.checkpoint or args.model, args.split, args.beam), f, indent=1)
    if args.results:
        with open(args.results, "w") as f:
            json.dump(results_json(r["predictions"]), f)


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_model  # lazy: torch, onnx

    export_model(args.checkpoint, args.out, args.weights, overwrite=args.overwrite, int8=args.int8)


def cmd_import_chapter(args: argparse.Namespace) -> None:
    import_chapter(args.encoder, args.decoder, args.vocabulary, args.out, args.backbone, args.embedding_size,
                   args.hidden_size, args.num_layers, args.max_seq_len, overwrite=args.overwrite)


def cmd_export_chapter(args: argparse.Namespace) -> None:
    export_chapter(args.checkpoint, args.out, args.weights, overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    """The commands and their options: one helper per command, in the order --help lists them."""
    parser = argparse.ArgumentParser(prog="python -m captioning", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tinyset_command(sub)
    _add_vocab_command(sub)
    _add_resize_command(sub)
    _add_train_command(sub)
    _add_features_command(sub)
    _add_standin_command(sub)
    _add_caption_command(sub)
    _add_evaluate_command(sub)
    _add_export_command(sub)
    _add_import_chapter_command(sub)
    _add_export_chapter_command(sub)
    return parser


def _count(text):
    """A count flag's type: a whole number >= 1, else argparse's one line naming the flag."""
    from .evaluation import count_flag  # lazy: evaluation's imports take a third of a second

    return count_flag(text)


def _add_tinyset_command(sub):
    p = sub.add_parser("tinyset", help="write the bundled synthetic dataset (or the relations world) in COCO 2014 "
                                       "layout")
    p.add_argument("--out", required=True,
                   help="the folder to write; by convention data_dir/tiny, or data_dir/relations for --world relations")
    p.add_argument("--world", choices=("shapes", "relations"), default="shapes",
                   help="shapes (default): the tiny set, one or two shapes and at most one relation per image; "
                        "relations: three shapes per image, each caption stating the relations that connect them "
                        "(captioning.relworld), conventionally in data_dir/relations")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--val", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--colours", metavar="LIST",
                   help="your own palette, comma-separated: names such as pink,cyan,grey, or NAME=#RRGGBB")
    p.add_argument("--shapes", metavar="LIST", help="comma-separated shape names, e.g. star,hexagon,ring")
    p.add_argument("--background", metavar="COLOUR", help="a colour name or #RRGGBB")
    p.set_defaults(func=cmd_tinyset)


def _add_vocab_command(sub):
    p = sub.add_parser("vocab", help="build vocabulary.pkl from a COCO captions file (or a Karpathy dataset_*.json)")
    p.add_argument("--captions", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=int, default=4)
    p.set_defaults(func=cmd_vocab)


def _add_resize_command(sub):
    p = sub.add_parser("resize", help="resize a folder of images to size x size, in parallel",
                       description="Resize every image of --src into --dst (same names), skipping those already "
                                   "done. Unreadable images are listed and skipped; the exit code is then 1.")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=cmd_resize)


def _add_train_command(sub):
    p = sub.add_parser("train", help="train the CNN-LSTM captioner (torchrun-aware)",
                       description="Every Config field can be set as --field-name VALUE (or --set field=VALUE).")
    p.add_argument("--preset", default="tiny", choices=["tiny", "coco"])
    _add_config_flags(p)
    p.add_argument("--resume", action="store_true", help="continue from models_dir/last.ckpt")
    p.add_argument("--overwrite", nargs="?", const="move", choices=["move", "delete"],
                   help="start afresh in a models_dir holding a run: its checkpoints, log, evaluation and "
                        "events are moved into models_dir/previous-<timestamp>/ (--overwrite delete: deleted)")
    p.add_argument("--init-from", metavar="CKPT",
                   help="start a new run from this checkpoint's weights, e.g. --objective scst (self-critical "
                        "fine-tuning on CIDEr-D) from a cross-entropy run's best.ckpt; the model and data settings "
                        "are the checkpoint's, and --models-dir must be another folder (default: its folder + "
                        "'-scst')")
    p.add_argument("--no-cache", action="store_true", help="run the frozen encoder at every step (the chapter's loop)")
    p.add_argument("--dry-run", action="store_true", help="two steps, to check that everything is wired up")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any Config field, e.g. --set backbone=resnet50 --set cache_views=3")
    p.set_defaults(func=cmd_train)


def _add_features_command(sub):
    p = sub.add_parser("features", help="list the feature caches; --prune removes the ones no longer used")
    p.add_argument("--preset", default="tiny", choices=["tiny", "coco"])
    p.add_argument("--data-dir", help="the dataset folder whose features/ to look at")
    p.add_argument("--prune", action="store_true",
                   help="delete all but the most recently used cache of each split (never one in use)")
    p.add_argument("--keep", type=int, default=1, help="with --prune: how many caches of each split to keep")
    p.set_defaults(func=cmd_features)


def _add_standin_command(sub):
    p = sub.add_parser("standin", help="the tiny preset's stand-in backbone: find it, or pretrain it on synthetic "
                                       "scenes (--ship: copy it into the package, to commit)")
    p.add_argument("--steps", type=int, help="pretraining steps (default: the tiny preset's standin_steps)")
    p.add_argument("--seed", type=int, help="default: the tiny preset's standin_seed")
    p.add_argument("--models-dir", help="its pretrained/ folder is made beside this one (default: the preset's)")
    p.add_argument("--ship", action="store_true",
                   help="write a half-precision copy into captioning/pretrained/, the stand-in that ships")
    p.set_defaults(func=cmd_standin)


# export.RUNTIMES, written out for the same reason (tests/test_export.py checks that the two agree)
RUNTIMES = ("torch", "onnx", "onnx-int8")
# saliency.METHODS, written out: importing saliency here would import torch for --help
# (tests/test_attention_maps.py checks that the two agree)
EXPLAIN_METHODS = ("attention", "occlusion", "gradcam")


def _add_caption_command(sub):
    p = sub.add_parser("caption", help="caption image files or folders")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--json", action="store_true", help="print a JSON list of {image, caption}")
    p.add_argument("--explain", metavar="OUT_DIR",
                   help="also write OUT_DIR/<image>.png: which part of the image drove each word; an attention "
                        "model's own attention, one panel per word (Show, Attend and Tell), or occlusion for the "
                        "chapter's pooled model")
    p.add_argument("--explain-method", choices=EXPLAIN_METHODS,
                   help="how --explain makes each word's map (default: attention for an attention model, occlusion "
                        "otherwise); the chapter's pooled model has no attention, so only occlusion or gradcam")
    _add_checkpoint_flags(p, required=True)
    p.set_defaults(func=cmd_caption)


def _add_evaluate_command(sub):
    p = sub.add_parser("evaluate", help="BLEU/METEOR/ROUGE-L/CIDEr on the held-out split")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--out", help="write the metrics (and semantic accuracy, where known) here (JSON)")
    p.add_argument("--results", help="write the captions here in COCO results format")
    p.add_argument("--max-images", type=_count, metavar="N", help="score only the first N images of the split")
    p.add_argument("--data-dir", help="where the dataset is, if not where the checkpoint was trained")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="compare two --out files of the same split: B - A with paired bootstrap intervals")
    p.add_argument("--resamples", type=_count, default=1000, help="bootstrap resamples for --compare")
    p.add_argument("--spice-timeout", type=float, metavar="SECONDS",
                   help="give up on SPICE after this long (default: $CAPTIONING_SPICE_TIMEOUT or 1800); "
                        "the other metrics are kept")
    _add_checkpoint_flags(p, required=False)         # --compare needs no checkpoint
    p.set_defaults(func=cmd_evaluate)


def _add_checkpoint_flags(p, required):
    """The flags that caption and evaluate share: the model (a checkpoint or an exported folder; `required`:
    one of them), and how to run it."""
    which = p.add_mutually_exclusive_group(required=required)
    which.add_argument("--checkpoint", help="a training checkpoint (.ckpt)")
    which.add_argument("--model", metavar="DIR", help="an exported folder (python -m captioning export)")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help="torch (default), or onnx: ONNX Runtime on an exported folder's encoder.onnx and "
                        "decoder_step.onnx (onnx-int8: with its int8 encoder, export --int8)")
    p.add_argument("--beam", type=_count, default=3, help="beam size (1 = greedy, the chapter's sample())")
    p.add_argument("--batch-size", type=_count, default=32)
    p.add_argument("--weights", help="local .pth file for a frozen pretrained backbone (offline machines)")
    p.add_argument("--device", default="")


def _add_export_command(sub):
    p = sub.add_parser("export", help="a checkpoint -> a folder anyone can load: model.safetensors, config.json, "
                                      "vocab.json, encoder.onnx, decoder_step.onnx, README.md (the model card)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--weights", help="local .pth file of a frozen pretrained backbone the checkpoint leaves out "
                                     "(coco), on a machine that cannot download it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --out: its files are moved into --out/previous-<timestamp>/")
    p.add_argument("--int8", metavar="IMAGES_DIR",
                   help="also write encoder.int8.onnx, its convolutions quantized to int8, calibrated on 100 images "
                        "of this folder (the training images, e.g. data_dir/tiny/resized_images/train2014)")
    p.set_defaults(func=cmd_export)


def _add_import_chapter_command(sub):
    p = sub.add_parser("import-chapter", help="the book's encoder/decoder .ckpt and vocabulary.pkl -> one checkpoint",
                       description="Sizes left out are read off the weights (the book's, unless they say "
                                   "otherwise); a size that disagrees with the weights is an error.")
    p.add_argument("--encoder", required=True, help="the book's encoder-E-S.ckpt (CNNModel state_dict)")
    p.add_argument("--decoder", required=True, help="the book's decoder-E-S.ckpt (LSTMModel state_dict)")
    p.add_argument("--vocabulary", required=True, help="the book's vocabulary.pkl")
    p.add_argument("--out", required=True, help="the checkpoint to write")
    p.add_argument("--backbone", help=f"default: the weights' ResNet (the book: {BOOK['backbone']})")
    for flag in ("embedding_size", "hidden_size", "num_layers"):
        p.add_argument("--" + flag.replace("_", "-"), type=int, help=f"default: the weights' (the book: {BOOK[flag]})")
    p.add_argument("--max-seq-len", type=int, help=f"longest caption generated (default: the book's "
                                                   f"{BOOK['max_seq_len']}; not in the weights)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out: the old file is moved into previous-<timestamp>/ beside it")
    p.set_defaults(func=cmd_import_chapter)


def _add_export_chapter_command(sub):
    p = sub.add_parser("export-chapter", help="a checkpoint -> DIR/encoder.ckpt, decoder.ckpt, vocabulary.pkl "
                                              "for the book's notebook")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="the folder to write the three files to")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --out: its files are moved into --out/previous-<timestamp>/")
    p.add_argument("--weights", help="local .pth file for a frozen pretrained backbone (offline machines)")
    p.set_defaults(func=cmd_export_chapter)


# exceptions whose message says what is wrong by itself; any other is shown with its type
MESSAGE_ERRORS = (OSError, ValueError, RuntimeError, pickle.UnpicklingError)


def one_line(error: BaseException) -> str:
    """An exception's message on one line. A DataLoader worker's error carries the worker's traceback
    in its message: its last line is the original error."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback (most recent call last)" in text:
        return re.sub(rf"^([\w.]+\.)?{type(error).__name__}: ", "", lines[-1])
    return " ".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command; a bad input ends with one 'error:' line and exit 1, Ctrl-C with exit 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "beam", 1) < 1:
        parser.error("--beam must be >= 1")
    try:
        args.func(args)
    except KeyboardInterrupt:                  # a second Ctrl-C, after the interrupted state was saved
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, MESSAGE_ERRORS):
            sys.exit(f"error: {one_line(e)}")
        sys.exit(f"error: {type(e).__name__}: {one_line(e)} (python -m captioning --debug ... shows where)")


if __name__ == "__main__":
    main()
