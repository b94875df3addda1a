"""How well do a stand-in's frozen features name the objects of a set it never saw? Recipes side by side.

Pretrains the stand-in once per recipe (or takes a weights file already made), then fits a linear
probe (a logistic regression from the pooled feature vector, the one the captioner's encoder
reads, to which colour-shape objects an image shows) on each set of standin_quality.py, and scores
it on that set's held-out images: with the number of objects given, are the probe's top picks
exactly the true objects? A probe takes seconds where training a captioner takes minutes, and the
two rank recipes alike, so it is the quick way to compare pretraining recipes.

    python benchmarks/standin_probe.py [--recipes default steps=1400,lr=2e-3 ...] [--files OLD.pth ...]
                                       [--breakdown "own shapes"]

A recipe is "default" (pretrain_standin's defaults) or NAME=VALUE,... overriding them: steps,
low_share (the share of steps on small images), low_batch (how many times the batch those take),
batch_size, lr, label_smoothing, bf16=1 (bfloat16 autocast), radius=LOW-HIGH, aspect=LOW-HIGH,
shapes=NAME/NAME/..., shapes=tiny11 (the eleven shapes of the recipe before the thin ones were added)
or shapes=all17 (every drawable shape but the held-out ones).
"""
import argparse
import json
import os
import time

import torch
import torch.nn as nn
from standin_quality import SETS

from captioning.backbone import build_resnet
from captioning.data import eval_transform
from captioning.standin import pooled_features, pretrain_standin, probe_hits, probe_objects, recorded_objects
from captioning.tinyset import DRAWABLE_SHAPES, HELDOUT_SHAPES, make_tinyset

SIZE, CROP = 64, 56   # the tiny preset's


def load_split(root, split):
    """(images as the captioner's cache sees them at eval, their (colour, shape) objects)."""
    return recorded_objects(os.path.join(root, "annotations", f"captions_{split}2014.json"),
                            os.path.join(root, f"{split}2014"), eval_transform(SIZE, CROP), resize=SIZE)


ELEVEN = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "octagon", "star", "cross", "heart",
          "ring")
# every drawable shape but the held-out ones, thin ones included
SEVENTEEN = tuple(s for s in DRAWABLE_SHAPES if s not in HELDOUT_SHAPES)


def parse_recipe(text):
    """'steps=1400,radius=0.15-0.23' -> pretrain_standin keyword arguments."""
    kwargs = {}
    for item in filter(None, text.split(",")) if text != "default" else ():
        name, value = item.split("=")
        if name in ("radius", "aspect"):
            kwargs[name] = tuple(float(v) for v in value.split("-"))
        elif name == "shapes":
            kwargs[name] = {"tiny11": ELEVEN, "all17": SEVENTEEN}.get(value) or tuple(value.split("/"))
        elif name == "bf16":
            kwargs[name] = value.lower() in ("1", "true", "yes")
        else:
            kwargs[name] = int(value) if name in ("steps", "low_batch", "batch_size") else float(value)
    return kwargs


def breakdown(resnet, root, train, val):
    """Objects right, and shapes right leaving colours aside, by object count and by the pictures' proportions."""
    with open(os.path.join(root, "annotations", "captions_val2014.json")) as f:
        aspect = [im["width"] / im["height"] for im in json.load(f)["images"] if im.get("objects")]
    x, xv = pooled_features(resnet, train[0]), pooled_features(resnet, val[0])
    objects = probe_hits(x, train[1], xv, val[1])
    shapes = probe_hits(x, [[s for _, s in o] for o in train[1]], xv, [[s for _, s in o] for o in val[1]])
    groups = {"one object": [len(o) == 1 for o in val[1]], "two objects": [len(o) == 2 for o in val[1]],
              "width/height < 0.8": [a < 0.8 for a in aspect], "0.8 to 1.25": [0.8 <= a < 1.25 for a in aspect],
              "1.25 to 1.8": [1.25 <= a < 1.8 for a in aspect], "1.8 and over": [a >= 1.8 for a in aspect]}
    print(f"{'':<22}{'images':>8}{'objects right':>15}{'shapes right':>14}")
    for name, chosen in groups.items():
        n = sum(chosen)
        if n:
            right = sum(h for h, c in zip(objects, chosen) if c) / n
            shape_right = sum(h for h, c in zip(shapes, chosen) if c) / n
            print(f"{name:<22}{n:>8}{right:>15.1%}{shape_right:>14.1%}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="*", help="recipes to pretrain and probe (default: 'default' unless "
                                                      "--files is given)")
    parser.add_argument("--files", nargs="*", default=[], help="stand-in weights files to probe as they are")
    parser.add_argument("--breakdown", metavar="SET", help="also split SET's val images by object count and "
                                                           "proportions, with shapes scored apart from colours")
    parser.add_argument("--out", default="runs/standin_probe")
    args = parser.parse_args()
    if args.recipes is None:
        args.recipes = [] if args.files else ["default"]
    if args.breakdown and args.breakdown not in SETS:
        parser.error(f"--breakdown takes one of {', '.join(SETS)}")
    splits = {}
    for name, spec in SETS.items():
        data = os.path.join(args.out, name.replace(" ", "_"))
        if not os.path.exists(os.path.join(data, "annotations", "captions_val2014.json")):
            make_tinyset(data, **spec)
        splits[name] = load_split(data, "train"), load_split(data, "val")
    rows = []
    for item in [*args.recipes, *args.files]:
        seconds, heldout = float("nan"), {}
        path = item
        if item in args.recipes:
            t = time.perf_counter()
            state, heldout = pretrain_standin("resnet18", SIZE, CROP, progress=False, **parse_recipe(item))
            seconds = time.perf_counter() - t
            path = os.path.join(args.out, f"standin-{item.replace('=', '-').replace(',', '_').replace('/', '+')}.pth")
            torch.save(state, path)
        resnet = build_resnet("resnet18", path)
        resnet.fc = nn.Identity()
        resnet.eval()
        right = {name: probe_objects(pooled_features(resnet, train[0]), train[1], pooled_features(resnet, val[0]),
                                     val[1])
                 for name, (train, val) in splits.items()}
        rows.append((os.path.basename(item), seconds, heldout.get("heldout_single_shape_accuracy"), right))
        print(f"done: {item} ({seconds:.0f} s)", flush=True)
        if args.breakdown:
            breakdown(resnet, os.path.join(args.out, args.breakdown.replace(" ", "_")), *splits[args.breakdown])
    print(f"\n{'recipe':<44}{'s':>6}{'lone shapes':>13}" + "".join(f"{name:>15}" for name in SETS))
    for item, seconds, single, right in rows:
        single = "" if single is None else f"{single:.1%}"
        print(f"{item[:43]:<44}{seconds:>6.0f}{single:>13}" + "".join(f"{v:>15.1%}" for v in right.values()))


if __name__ == "__main__":
    main()
