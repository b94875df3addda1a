"""Where the stand-in's pretraining spends its time, and what drawing the scenes in a worker saves.

1. Per step, at each phase of the default schedule: drawing the scenes (PIL), turning them into
   tensors and targets, the forward pass, the backward pass and the optimizer step (medians).
2. The same short pretraining three ways, side by side and alternating: the default (scenes drawn
   in the loop, fp32), scenes drawn in one worker process (`workers=1`), and the ResNet under
   bfloat16 autocast (`bf16=True`); median wall time and the ratio to the default.
3. With --compile: one training step (forward, backward, AdamW) of each phase, eager against
   torch.compile, taking turns step by step on the same batch; the compiling's own time apart.

    python benchmarks/standin_profile.py [--steps 40] [--repeats 3] [--compile]
"""
import argparse
import random
import statistics
import time

import torch
import torch.nn as nn
import torchvision.models as models

from captioning.data import _to_normalized_tensor
from captioning.standin import (
    PRETRAINING_SHAPES,
    StandinHead,
    pretrain_standin,
    resolution_schedule,
    scene_targets,
    standin_loss,
    synthetic_scene,
)

PARTS = ("draw", "tensors", "forward", "backward", "optimizer")


def profile_phase(resize_size, crop_size, batch_size, steps):
    torch.manual_seed(0)
    rng = random.Random(0)
    resnet = models.resnet18(weights=None)
    resnet.fc = nn.Identity()
    resnet.to(memory_format=torch.channels_last)
    head = StandinHead(512, len(PRETRAINING_SHAPES))
    optimizer = torch.optim.AdamW([*resnet.parameters(), *head.parameters()], 1e-3)
    times = {part: [] for part in PARTS}
    for step in range(steps + 2):
        t = [time.perf_counter()]
        scenes = [synthetic_scene(rng, PRETRAINING_SHAPES, resize_size, crop_size) for _ in range(batch_size)]
        t.append(time.perf_counter())
        images = torch.stack([_to_normalized_tensor(image) for image, _ in scenes])
        targets = [torch.stack(t) for t in zip(*(scene_targets(o, len(PRETRAINING_SHAPES)) for _, o in scenes))]
        t.append(time.perf_counter())
        loss = standin_loss(head(resnet(images.contiguous(memory_format=torch.channels_last))), *targets)
        t.append(time.perf_counter())
        optimizer.zero_grad()
        loss.backward()
        t.append(time.perf_counter())
        optimizer.step()
        t.append(time.perf_counter())
        if step >= 2:                                     # the first steps warm up the allocator
            for part, a, b in zip(PARTS, t, t[1:]):
                times[part].append(b - a)
    return {part: statistics.median(v) for part, v in times.items()}


def compile_check(resize_size, crop_size, batch_size, steps):
    """(seconds to compile and take two steps, eager ms per step, compiled ms per step) for one phase."""
    rng = random.Random(0)
    scenes = [synthetic_scene(rng, PRETRAINING_SHAPES, resize_size, crop_size) for _ in range(batch_size)]
    images = torch.stack([_to_normalized_tensor(image) for image, _ in scenes])
    images = images.contiguous(memory_format=torch.channels_last)
    targets = [torch.stack(t) for t in zip(*(scene_targets(o, len(PRETRAINING_SHAPES)) for _, o in scenes))]

    def build():
        torch.manual_seed(0)
        resnet = models.resnet18(weights=None)
        resnet.fc = nn.Identity()
        resnet.to(memory_format=torch.channels_last)
        model = nn.Sequential(resnet, StandinHead(512, len(PRETRAINING_SHAPES)))
        return model, torch.optim.AdamW(model.parameters(), 1e-3)

    def step(model, optimizer):
        loss = standin_loss(model(images), *targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    (eager, eager_opt), (plain, compiled_opt) = build(), build()
    compiled = torch.compile(plain)
    start = time.perf_counter()
    for _ in range(2):
        step(compiled, compiled_opt)
    compiling = time.perf_counter() - start
    for _ in range(2):
        step(eager, eager_opt)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(steps):
        for name, model, optimizer in (("eager", eager, eager_opt), ("compiled", compiled, compiled_opt)):
            start = time.perf_counter()
            step(model, optimizer)
            times[name].append(time.perf_counter() - start)
    return compiling, 1000 * statistics.median(times["eager"]), 1000 * statistics.median(times["compiled"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per profiled phase and per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="only torch.compile against eager, per phase")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    if args.compile:
        print(f"\n{'phase (crop px, batch)':<24}{'compile s':>10}{'eager ms':>10}{'compiled ms':>12}{'speed-up':>10}")
        for _, resize_size, crop_size, batch_size in resolution_schedule(1400, 64, 56, 64):
            compiling, eager, compiled = compile_check(resize_size, crop_size, batch_size, args.steps // 2)
            print(f"{f'{crop_size} px, {batch_size}':<24}{compiling:>10.1f}{eager:>10.0f}{compiled:>12.0f}"
                  f"{eager / compiled:>9.2f}x", flush=True)
        return
    print(f"\n{'phase (crop px, batch)':<24}" + "".join(f"{p:>11}" for p in PARTS) + f"{'step ms':>9}")
    for _, resize_size, crop_size, batch_size in resolution_schedule(1400, 64, 56, 64):
        times = profile_phase(resize_size, crop_size, batch_size, args.steps // 2)
        total = sum(times.values())
        print(f"{f'{crop_size} px, {batch_size}':<24}" + "".join(f"{v / total:>11.0%}" for v in times.values())
              + f"{total * 1000:>9.0f}", flush=True)
    ways = {"default (fp32, scenes drawn in the loop)": {}, "scenes drawn in a worker": {"workers": 1},
            "bfloat16 autocast": {"bf16": True}}
    walls = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, kwargs in ways.items():
            t = time.perf_counter()
            pretrain_standin(steps=args.steps, progress=False, **kwargs)
            walls[name].append(time.perf_counter() - t)
    base = statistics.median(walls[next(iter(ways))])
    print(f"\n{args.steps} steps of the default schedule, median of {args.repeats}:")
    for name, times in walls.items():
        print(f"  {name:<42}{statistics.median(times):6.1f} s   speed-up {base / statistics.median(times):.2f}x")


if __name__ == "__main__":
    main()
