"""Does the captioner see? Semantic accuracy with a random frozen backbone against the stand-in.

Trains the tiny preset's captioner twice on each of three synthetic sets, side by side, and
scores every held-out caption against what the generator drew (captioning.semantics):

- the bundled tiny set (3000 train / 250 val; six colours, circle / square / triangle);
- "own shapes": other colours, other shapes (a thin bar among them) and another background, on
  landscape and portrait images (1500 train / 200 val);
- "unseen shapes": shapes the stand-in never saw in pretraining (tinyset.HELDOUT_SHAPES), other
  colours again, on a dark background (1500 train / 200 val).

The two backbones are the tiny preset's earlier encoder, a random ResNet-18 whose BatchNorm
statistics are estimated from the training images (`--set weights=none`), and the stand-in
pretrained on synthetic scenes (the preset's default). Everything else is the preset's.

    python benchmarks/standin_quality.py [--out runs/standin_quality] [--epochs N] [--standin-only]
                                         [--sets "own shapes" ...] [--set lr=0.002 ...]
"""
import argparse
import dataclasses
import os
import time

from captioning.__main__ import _parse_value
from captioning.backbone import STANDIN
from captioning.config import Config, get_config
from captioning.evaluation import evaluate_checkpoint
from captioning.tinyset import HELDOUT_SHAPES, NAMED_COLOURS, make_tinyset
from captioning.training import train

# other colours, shapes and background than the bundled set; landscape and portrait images, a thin shape
OWN = dict(train=1500, val=200, seed=7, shapes=("star", "hexagon", "diamond", "heart", "cross", "bar"),
           colours={c: NAMED_COLOURS[c] for c in ("pink", "cyan", "brown", "grey", "navy", "lime")},
           background=(240, 230, 210), image_size=((72, 176), (64, 150)), object_size=(0.26, 0.42))
# shapes the stand-in never saw in pretraining, other colours again, on a dark background
UNSEEN = dict(train=1500, val=200, seed=8, shapes=HELDOUT_SHAPES,
              colours={c: NAMED_COLOURS[c] for c in ("white", "yellow", "orange", "magenta", "teal", "lime")},
              background=(30, 30, 40), image_size=((64, 176), (64, 176)), object_size=(0.26, 0.42))
SETS = {"tiny set": dict(train=3000, val=250, seed=0), "own shapes": OWN, "unseen shapes": UNSEEN}


def run(name, data_dir, models_dir, weights, epochs, overrides=None):
    overrides = {**({"epochs": epochs} if epochs else {}), **(overrides or {})}
    config = get_config("tiny", data_dir=data_dir, models_dir=models_dir, weights=weights, progress=False,
                        **overrides)
    t = time.time()                          # train() builds the stand-in first when it is missing
    summary = train(config, overwrite=True)   # a rerun replaces the previous one
    seconds = time.time() - t
    result = evaluate_checkpoint(summary["best"], beam_size=3, progress=False, data_dir=data_dir)
    return {"name": name, "seconds": seconds, **{k: result["semantic"][k] for k in
                                                 ("objects", "colours", "shapes", "relation")},
            "Bleu_4": result["metrics"]["Bleu_4"], "CIDEr": result["metrics"]["CIDEr"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/standin_quality")
    parser.add_argument("--epochs", type=int, help="decoder epochs (default: the tiny preset's)")
    parser.add_argument("--standin-only", action="store_true", help="leave out the random-backbone baselines")
    parser.add_argument("--sets", nargs="+", choices=sorted(SETS), default=list(SETS))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="another captioner setting than the preset's, as train's --set")
    args = parser.parse_args()
    fields = {f.name: f for f in dataclasses.fields(Config)}
    overrides = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            parser.error(f"--set expects FIELD=VALUE with FIELD a Config field; got {item!r}")
        overrides[name] = _parse_value(fields[name], value)
    sets = {name: SETS[name] for name in args.sets}
    backbones = [("random ResNet-18, BatchNorm estimated", None), ("stand-in", STANDIN)][args.standin_only:]
    rows = []
    for set_name, spec in sets.items():
        data = os.path.join(args.out, "data", set_name.replace(" ", "_"))
        if not os.path.exists(os.path.join(data, "annotations", "captions_val2014.json")):
            make_tinyset(data, **spec)
        for backbone, weights in backbones:
            models = os.path.join(args.out, "models", f"{set_name.replace(' ', '_')}-{weights or 'random'}")
            row = run(f"{set_name}: {backbone}", data, models, weights, args.epochs, overrides)
            rows.append(row)
            print(f"done: {row['name']} ({row['seconds']:.0f} s)", flush=True)
    print(f"\n{'':<48}{'objects':>9}{'colours':>9}{'shapes':>9}{'relation':>9}{'BLEU-4':>8}{'CIDEr':>7}")
    for r in rows:
        relation = "n/a" if r["relation"] is None else f"{r['relation']:.1%}"
        print(f"{r['name']:<48}{r['objects']:>9.1%}{r['colours']:>9.1%}{r['shapes']:>9.1%}{relation:>9}"
              f"{r['Bleu_4']:>8.3f}{r['CIDEr']:>7.2f}")


if __name__ == "__main__":
    main()
