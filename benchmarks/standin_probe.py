"""How well do a stand-in's frozen features name the objects of a set it never saw? Recipes side by side.

Pretrains the stand-in once per recipe, then fits a linear probe (a logistic regression from the
pooled feature vector, the one the captioner's encoder reads, to which colour-shape objects an
image shows) on the "own shapes" set of standin_quality.py, and scores it on that set's held-out
images: with the number of objects given, are the probe's top picks exactly the true objects?
A probe takes seconds where training a captioner takes a minute, and the two agree within a few
points, so it is the quick way to compare pretraining recipes.

    python benchmarks/standin_probe.py [--recipes 1000:0.6:1 1400:0.43:2] [--out runs/standin_probe]

A recipe is STEPS:LOW_SHARE:LOW_BATCH: the steps, the share of them on small images, and how many
times the batch of 64 those small-image steps take.
"""
import argparse
import json
import os
import time

import torch
import torch.nn as nn
from PIL import Image
from standin_quality import OWN

from captioning.backbone import build_resnet, pretrain_standin
from captioning.data import eval_transform
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["1000:0.6:1", "1400:0.43:2"])
    parser.add_argument("--out", default="runs/standin_probe")
    args = parser.parse_args()
    data = os.path.join(args.out, "own_shapes")
    if not os.path.exists(os.path.join(data, "annotations", "captions_val2014.json")):
        make_tinyset(data, **OWN)
    train, val = load_split(data, "train"), load_split(data, "val")
    rows = []
    for recipe in args.recipes:
        steps, low_share, low_batch = recipe.split(":")
        t = time.perf_counter()
        state, report = pretrain_standin("resnet18", SIZE, CROP, int(steps), low_share=float(low_share),
                                         low_batch=int(low_batch), progress=False)
        seconds = time.perf_counter() - t
        path = os.path.join(args.out, f"standin-{recipe.replace(':', '-')}.pth")
        torch.save(state, path)
        resnet = build_resnet("resnet18", path)
        resnet.fc = nn.Identity()
        resnet.eval()
        right = probe((features(resnet, train[0]), train[1]), (features(resnet, val[0]), val[1]))
        rows.append((recipe, report["schedule"], seconds, report["heldout_shape_accuracy"], right))
        print(f"done: {recipe} ({seconds:.0f} s)", flush=True)
    print(f"\n{'recipe':<14}{'schedule (steps, resize, crop, batch)':<44}{'s':>6}{'held-out shapes':>17}"
          f"{'probe: objects':>16}")
    for recipe, schedule, seconds, heldout, right in rows:
        print(f"{recipe:<14}{str(schedule):<44}{seconds:>6.0f}{heldout:>17.1%}{right:>16.1%}")


if __name__ == "__main__":
    main()
