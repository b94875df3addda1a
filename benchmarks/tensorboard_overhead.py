"""What TensorBoard logging costs a training step: steps after a write and without, interleaved in one run.

    python benchmarks/tensorboard_overhead.py [--images 1000] [--steps 800] [--block 5] [--batch-size 64]

Two writers: ours (tblog.EventFile: the record appended in the training thread) and torch's
SummaryWriter (each event handed to a background thread that writes it), each logging the
same three scalars. The tiny preset's model (embedding 128, hidden 256) on cached features
of a frozen random ResNet-18: the step whose cost a writer could show in most, the decoder's
alone, tens of milliseconds on a CPU. log_every=1, so a writer is called at every step (the
worst case; the presets log every 10 steps).

Whole runs with and without a writer cannot be compared on a shared machine: its load comes
in phases of seconds that slow every step several-fold. So one run does all of it: blocks of
--block steps take turns (ours, idle A, SummaryWriter, idle B), and each step is timed from
one call site to the next. The time a call takes, and what a background thread does after
it, fall in the step that follows it. The two idle kinds run the same code: their ratio is
the noise floor a writer has to stand out of. Intervals holding an epoch end (validation)
are left out, as are the first 10 steps.

The same run also times the calls themselves, and at each epoch end our validation() (two
scalars and greedy captions of 4 val images) against the validation loss it follows.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.tensorboard import SummaryWriter

import captioning.tblog as tblog
import captioning.training as training
from captioning.config import get_config
from captioning.tinyset import make_tinyset
from captioning.vocabulary import load_vocabulary

KINDS = ("ours", "idle A", "SummaryWriter", "idle B")   # what the blocks of steps do, in turn


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="tb_overhead_")
    make_tinyset(os.path.join(root, "tiny"), train=args.images, val=50, seed=0)
    config = get_config("tiny", data_dir=os.path.join(root, "tiny"), models_dir=os.path.join(root, "m"), weights=None,
                        batch_size=args.batch_size, max_steps=args.steps, epochs=1000, save_every=0, log_every=1,
                        progress=False, num_workers=0)

    stamps, kinds, epoch_ends = [], [], []
    spent = {"ours": [], "SummaryWriter": [], "validation": [], "val_loss": []}
    real_training = tblog.TrainingBoard.training
    theirs = SummaryWriter(os.path.join(root, "summary_writer"))

    def summary_writer(step, loss, optimizer):
        theirs.add_scalar("train/loss", loss, step)
        theirs.add_scalar("train/perplexity", 2.0, step)
        theirs.add_scalar("lr/head", optimizer.param_groups[0]["lr"], step)

    def gated(self, step, loss, optimizer):            # called once per step (log_every=1)
        stamps.append(time.perf_counter())
        kinds.append(KINDS[(step // args.block) % len(KINDS)])
        write = {"ours": lambda: real_training(self, step, loss, optimizer),
                 "SummaryWriter": lambda: summary_writer(step, loss, optimizer)}.get(kinds[-1])
        if write:
            t = time.perf_counter()
            write()
            spent[kinds[-1]].append(time.perf_counter() - t)

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            spent[name].append(time.perf_counter() - t)
            if name == "val_loss":
                epoch_ends.append((t, time.perf_counter()))
            return out
        return wrapper

    tblog.TrainingBoard.training = gated
    tblog.TrainingBoard.validation = timed("validation", tblog.TrainingBoard.validation)
    training.evaluate_loss = timed("val_loss", training.evaluate_loss)
    stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
    try:
        training.train(config)
    finally:
        sys.stdout = stdout

    steps = {kind: [] for kind in KINDS}
    for i in range(11, len(stamps)):
        start, end = stamps[i - 1], stamps[i]
        if not any(start < t1 and t0 < end for t0, t1 in epoch_ends):
            steps[kinds[i - 1]].append(end - start)
    median = {kind: statistics.median(times) for kind, times in steps.items()}
    idle = statistics.median(steps["idle A"] + steps["idle B"])

    # the calls with no training around them: what they cost when nothing competes for the CPU
    board = tblog.TrainingBoard(config, load_vocabulary(config.vocabulary_path), "cpu", log=lambda *a: None)
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    alone = {"ours": [], "SummaryWriter": []}
    for step in range(2000):
        for kind, call in (("ours", lambda: real_training(board, step, 2.5, optimizer)),
                           ("SummaryWriter", lambda: summary_writer(step, 2.5, optimizer))):
            t = time.perf_counter()
            call()
            alone[kind].append(time.perf_counter() - t)
    board.close()
    theirs.close()

    print(f"{args.images} images, batch {args.batch_size}, log_every=1, {len(stamps)} steps in blocks of {args.block} "
          f"that take turns: {', '.join(KINDS)}; {len(epoch_ends)} epoch ends left out\n")
    print("| steps | n | median ms/step | vs idle | a call in the loop, median µs | a call alone, median µs |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, label in (("ours", "after a write, ours"), ("SummaryWriter", "after a write, SummaryWriter"),
                        ("idle A", "idle A"), ("idle B", "idle B")):
        calls = (f"{statistics.median(spent[kind]) * 1e6:.0f} | {statistics.median(alone[kind]) * 1e6:.0f}"
                 if kind in alone else " | ")
        print(f"| {label} | {len(steps[kind])} | {median[kind] * 1e3:.1f} | {median[kind] / idle:.3f} | {calls} |")
    print(f"\nnoise floor, idle A / idle B: {median['idle A'] / median['idle B']:.3f}")
    print(f"validation(): {statistics.mean(spent['validation']) * 1e3:.0f} ms per epoch end (4 sample captions), after "
          f"{statistics.mean(spent['val_loss']) * 1e3:.0f} ms of validation loss on {config.val_max_captions} captions")


if __name__ == "__main__":
    main()
