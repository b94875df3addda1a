"""Feature extraction: the frozen backbone as built (`CNNModel.extract`) vs with its BatchNorms
folded into the convolutions (`CNNModel.frozen_extractor`, what the feature cache runs).

    python benchmarks/extract_speed.py [--backbone resnet152] [--size 128] [--batch 128] [--repeats 5]

Both run the same random backbone in eval mode with no_grad, channels_last (as training runs a
frozen backbone), under autocast on CUDA as the cache does, on the same batch, taking turns; a
warm-up call each comes first. Prints the
median time per batch, the ratio, and the lowest cosine similarity between the two's features
(1.0 = the same features).
"""
import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from captioning.device import amp_dtype_for, pick_device
from captioning.model import CNNModel


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="resnet152")
    parser.add_argument("--size", type=int, default=128, help="crop size in pixels")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = pick_device()
    encoder = CNNModel(256, args.backbone, weights=None).eval().to(device, memory_format=torch.channels_last)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(
        memory_format=torch.channels_last)
    ways = {"as built (extract)": encoder.extract,
            "BatchNorm folded": encoder.frozen_extractor().to(memory_format=torch.channels_last)}
    times = {name: [] for name in ways}
    amp_dtype = amp_dtype_for(device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with torch.no_grad(), autocast:
        outputs = {name: way(images) for name, way in ways.items()}     # warm-up, and the features compared
        for _ in range(args.repeats):
            for name, way in ways.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                way(images)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
    where = f"{torch.cuda.get_device_name()}, autocast {amp_dtype}" if device.type == "cuda" \
        else f"{torch.get_num_threads()} CPU threads"
    print(f"{args.backbone} (frozen, random), batch {args.batch} at {args.size}px, {where}, "
          f"median of {args.repeats}\n")
    base = statistics.median(times["as built (extract)"])
    for name in ways:
        median = statistics.median(times[name])
        print(f"{name:<22}{median * 1000:>9.1f} ms/batch{base / median:>8.2f}x")
    cosine = torch.nn.functional.cosine_similarity(*(o.float() for o in outputs.values())).min().item()
    print(f"\nlowest cosine similarity between the two's features: {cosine:.7f}")


if __name__ == "__main__":
    main()
