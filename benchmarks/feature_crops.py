"""How close is a crop taken in feature space to the same crop run through the network?

    python benchmarks/feature_crops.py [--images 64] [--crops 4] [--runs random152:128 standin18:56:64]

The map cache (features.py) runs the frozen backbone once on the whole resized image, keeps the
last convolutional map, and pools a random window of it for each caption. This script measures,
on tiny-set images, how well that stands in for the real thing: the pooled features of the same
crop of the image, through the network.

For each image it draws --crops random crops (the training transform's offsets) and compares,
after subtracting the mean feature over all crops (pooled ResNet features share a large common
part, which would make any two cosines look alike):
- area:     pool_window on the map (each cell is its patch; a cut cell counts by its cut share)
- bilinear: torchvision's roi_align, aligned, 4x4 bins of 2x2 samples, averaged
- centre:   the centre crop through the network (one fixed view, like a K=1 cache)
- full:     the whole image pooled (no crop at all)
as cosine similarity to the true crop's features (median over crops), and, for the first two,
how well they follow the difference between two crops of one image: the cosine of
(window A - window B) with (true A - true B).

Backbones: random152 is train_speed.py's stand-in for ImageNet weights (a random ResNet-152 with
BatchNorm statistics measured on the images); standin18 is the tiny preset's pretrained stand-in.
A run is backbone:crop[:resize]; images are resized to crop + crop/8 unless given (the tiny
preset resizes to 64 and crops 56).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from torchvision.ops import roi_align

from captioning.config import get_config
from captioning.data import eval_transform, seeded_generator
from captioning.device import pick_device
from captioning.features import pool_window
from captioning.images import load_image, resize_images
from captioning.model import CNNModel
from captioning.tinyset import make_tinyset


def crop_offsets(resize, crop, images, crops, seed=0):
    """The training transform's random (top, left) for each (image, crop)."""
    offsets = []
    for i in range(images):
        for k in range(crops):
            g = seeded_generator(seed, i, k)
            top = int(torch.randint(0, resize - crop + 1, (1,), generator=g))
            left = int(torch.randint(0, resize - crop + 1, (1,), generator=g))
            offsets.append((top, left))
    return offsets


def centred_cosine(a, b, mean):
    return torch.nn.functional.cosine_similarity(a - mean, b - mean, dim=1)


@torch.no_grad()
def measure(encoder, paths, resize, crop, crops, device, batch=32):
    full_tf = eval_transform(resize, resize)
    images = torch.stack([full_tf(load_image(p)) for p in paths])             # (N, 3, R, R)
    maps, full = [], []
    for j in range(0, len(images), batch):
        m = encoder.extract_map(images[j:j + batch].to(device)).float()
        maps.append(m.cpu())
        full.append(m.mean((2, 3)).cpu())
    maps, full = torch.cat(maps), torch.cat(full)
    cells = maps.size(2)
    scale = cells / resize                                                    # cells per pixel
    offsets = crop_offsets(resize, crop, len(paths), crops)
    owner = torch.arange(len(paths)).repeat_interleave(crops)
    tops = torch.tensor([t for t, _ in offsets], dtype=torch.float32)
    lefts = torch.tensor([left for _, left in offsets], dtype=torch.float32)
    true = []
    for j in range(0, len(offsets), batch):
        views = torch.stack([images[owner[n], :, t:t + crop, left:left + crop]
                             for n, (t, left) in zip(range(j, j + batch), offsets[j:j + batch])])
        true.append(encoder.extract(views.to(device)).float().cpu())
    true = torch.cat(true)
    c0 = (resize - crop) // 2
    centre = encoder.extract(images[:, :, c0:c0 + crop, c0:c0 + crop].to(device)).float().cpu()[owner]
    size = torch.full_like(tops, crop * scale)
    area = pool_window(maps[owner], tops * scale, lefts * scale, size)
    boxes = torch.stack([torch.arange(len(offsets), dtype=torch.float32), lefts * scale, tops * scale,
                         (lefts + crop) * scale, (tops + crop) * scale], 1)
    bilinear = roi_align(maps[owner], boxes, output_size=(4, 4), spatial_scale=1.0, sampling_ratio=2,
                         aligned=True).mean((2, 3))
    mean = true.mean(0)
    out = {name: statistics.median(centred_cosine(x, true, mean).tolist())
           for name, x in (("area", area), ("bilinear", bilinear), ("centre", centre), ("full", full[owner]))}
    # differences between two crops of one image: does the window move the features the way a crop does?
    a, b = torch.arange(0, len(offsets), crops), torch.arange(1, len(offsets), crops)
    moved = (true[a] - true[b]).norm(dim=1) > 1e-6
    for name, x in (("area", area), ("bilinear", bilinear)):
        cos = torch.nn.functional.cosine_similarity(x[a] - x[b], true[a] - true[b], dim=1)[moved]
        out[f"{name} Δ"] = statistics.median(cos.tolist())
    out["cells"] = f"{cells}x{maps.size(3)}"
    return out


def random152(paths, resize, crop, device):
    from captioning.model import calibrate_batchnorm

    torch.manual_seed(0)
    encoder = CNNModel(8, "resnet152", weights=None).to(device)
    tf = eval_transform(resize, crop)
    batches = [torch.stack([tf(load_image(p)) for p in paths[j:j + 64]]).to(device) for j in range(0, len(paths), 64)]
    calibrate_batchnorm(encoder.resnet_module, iter(batches))
    return encoder.eval()


def standin18(paths, resize, crop, device):
    from captioning.standin import ensure_standin

    config = get_config("tiny", progress=True)
    return CNNModel(8, "resnet18", weights=ensure_standin(config, log=print)).to(device).eval()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--crops", type=int, default=4)
    parser.add_argument("--runs", nargs="+", default=["random152:128", "standin18:56:64"],
                        help="backbone:crop size[:resize] (random152 or standin18)")
    args = parser.parse_args()
    device = pick_device()
    torch.set_grad_enabled(False)
    work = tempfile.mkdtemp(prefix="feature-crops-")
    make_tinyset(os.path.join(work, "tiny"), train=args.images, val=1, seed=3)
    builders = {"random152": random152, "standin18": standin18}
    rows = []
    for run in args.runs:
        name, size, *resize = run.split(":")
        size = int(size)
        resize = int(resize[0]) if resize else size + size // 8
        dst = os.path.join(work, f"r{resize}")
        resize_images(os.path.join(work, "tiny", "train2014"), dst, resize, progress=False)
        paths = sorted(os.path.join(dst, n) for n in os.listdir(dst) if n.endswith(".jpg"))[:args.images]
        t = time.perf_counter()
        encoder = builders[name](paths, resize, size, device)
        result = measure(encoder, paths, resize, size, args.crops, device)
        rows.append((name, f"{size} of {resize}", result))
        print(f"{name} {size}/{resize}: {result}  ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"\n{args.images} tiny-set images x {args.crops} random crops, {where}; median centred cosine "
          f"to the true crop's features (Δ: to the difference between two crops)\n")
    print("| backbone | crop of image | map | area | bilinear | centre crop | whole image | area Δ | bilinear Δ |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name, sizes, r in rows:
        print(f"| {name} | {sizes} | {r['cells']} | {r['area']:.3f} | {r['bilinear']:.3f} | {r['centre']:.3f} | "
              f"{r['full']:.3f} | {r['area Δ']:.3f} | {r['bilinear Δ']:.3f} |")


if __name__ == "__main__":
    main()
