"""How well do a stand-in's frozen features name the objects of a set it never saw? Recipes side by side.

Pretrains the stand-in once per recipe (or takes a weights file already made), then fits a linear
probe (a logistic regression from the pooled feature vector, the one the captioner's encoder
reads, to which colour-shape objects an image shows) on each set of standin_quality.py, and scores
it on that set's held-out images: with the number of objects given, are the probe's top picks
exactly the true objects? A probe takes seconds where training a captioner takes minutes, and the
two rank recipes alike, so it is the quick way to compare pretraining recipes.

    python benchmarks/standin_probe.py [--recipes default steps=1400,lr=2e-3 ...] [--files OLD.pth ...]

A recipe is "default" (pretrain_standin's defaults) or NAME=VALUE,... overriding them: steps,
low_share (the share of steps on small images), low_batch (how many times the batch those take),
lr, label_smoothing, bf16=1 (bfloat16 autocast), radius=LOW-HIGH, aspect=LOW-HIGH, shapes=NAME/NAME/... or shapes=tiny11
(the eleven shapes of the recipe before the thin ones were added).
"""
import argparse
import json
import os
import time

import torch
import torch.nn as nn
from PIL import Image
from standin_quality import SETS

from captioning.backbone import build_resnet
from captioning.data import eval_transform
from captioning.standin import pretrain_standin
from captioning.tinyset import make_tinyset

SIZE, CROP = 64, 56   # the tiny preset's


def load_split(root, split):
    """(images as the captioner's cache sees them at eval, multi-hot over colour-shape objects)."""
    with open(os.path.join(root, "annotations", f"captions_{split}2014.json")) as f:
        coco = json.load(f)
    objects = [(c, s) for s in coco["shapes"] for c in coco["colours"]]
    transform = eval_transform(SIZE, CROP)
    images, targets = [], []
    for image in coco["images"]:
        path = os.path.join(root, f"{split}2014", image["file_name"])
        images.append(transform(Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)))
        target = torch.zeros(len(objects))
        for o in image["objects"]:
            target[objects.index((o["colour"], o["shape"]))] = 1
        targets.append(target)
    return torch.stack(images), torch.stack(targets)


@torch.no_grad()
def features(resnet, images):
    return torch.cat([resnet(images[i:i + 256]) for i in range(0, len(images), 256)])


def probe(train, val, steps=500):
    """Fit the probe on train (features, targets); the share of val images whose objects it gets exactly."""
    (x, y), (xv, yv) = train, val
    mean, std = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(0)
    linear = nn.Linear(x.shape[1], y.shape[1])
    optimizer = torch.optim.Adam(linear.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(linear((x - mean) / std), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        scores = linear((xv - mean) / std)
    picks = torch.zeros_like(yv)
    for i, (row, count) in enumerate(zip(scores, yv.sum(1).long())):
        picks[i, row.topk(int(count)).indices] = 1
    return (picks == yv).all(1).float().mean().item()


ELEVEN = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "octagon", "star", "cross", "heart",
          "ring")


def parse_recipe(text):
    """'steps=1400,radius=0.15-0.23' -> pretrain_standin keyword arguments."""
    kwargs = {}
    for item in filter(None, text.split(",")) if text != "default" else ():
        name, value = item.split("=")
        if name in ("radius", "aspect"):
            kwargs[name] = tuple(float(v) for v in value.split("-"))
        elif name == "shapes":
            kwargs[name] = ELEVEN if value == "tiny11" else tuple(value.split("/"))
        elif name == "bf16":
            kwargs[name] = value.lower() in ("1", "true", "yes")
        else:
            kwargs[name] = int(value) if name in ("steps", "low_batch") else float(value)
    return kwargs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="*", default=["default"])
    parser.add_argument("--files", nargs="*", default=[], help="stand-in weights files to probe as they are")
    parser.add_argument("--out", default="runs/standin_probe")
    args = parser.parse_args()
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
        right = {name: probe((features(resnet, train[0]), train[1]), (features(resnet, val[0]), val[1]))
                 for name, (train, val) in splits.items()}
        rows.append((os.path.basename(item), seconds, heldout.get("heldout_single_shape_accuracy"), right))
        print(f"done: {item} ({seconds:.0f} s)", flush=True)
    print(f"\n{'recipe':<44}{'s':>6}{'lone shapes':>13}" + "".join(f"{name:>15}" for name in SETS))
    for item, seconds, single, right in rows:
        single = "" if single is None else f"{single:.1%}"
        print(f"{item[:43]:<44}{seconds:>6.0f}{single:>13}" + "".join(f"{v:>15.1%}" for v in right.values()))


if __name__ == "__main__":
    main()
