"""Self-critical training, one step: the model's time (sampling with the graph, REINFORCE backward, Adam)
against the reward's (CIDEr-D of every sampled caption), side by side, for both decoders.

    python benchmarks/scst_step.py                       # the tiny preset's sizes, CPU
    python benchmarks/scst_step.py --sizes coco --device cuda

The reward is computed on the CPU whatever the device, so on a GPU it is what could become the
bottleneck. It is timed on captions that share n-grams with their references as a trained model's do
(a reference with a few words replaced), with the document frequencies of 3,000 (tiny) or 10,000
(coco) images (benchmarks/cider_speed.py compares it with pycocoevalcap's scorer). Features are
random tensors of the encoder's output shape: the frozen backbone runs once per image in the
feature cache, not at every step. Prints the median of --repeats steps and the ratios.
"""
import argparse
import random
import statistics
import time

import numpy as np
import torch

from captioning.attention import grid_cells
from captioning.checkpoint import build_models
from captioning.config import get_config
from captioning.decoding import sample_captions
from captioning.scst import Rewards, mean_of_others, reinforce_loss

SIZES = {
    # (preset, vocabulary size, words per caption)
    "tiny": ("tiny", 60, 20),
    "coco": ("coco", 9487, 12),
}


def synthetic_references(images, vocabulary, words, seed=0):
    """5 references per image, Zipf-like words, sharing a theme per image as real captions do."""
    gen = np.random.default_rng(seed)
    p = 1 / np.arange(1, vocabulary + 1)
    p /= p.sum()
    themes = gen.choice(vocabulary, size=(images, words + 4), p=p)
    swaps = gen.choice(vocabulary, size=(images, 5, words + 4), p=p)
    keep = gen.random((images, 5, words + 4)) < 0.7
    lengths = gen.integers(words - 4, words + 5, size=(images, 5))
    tokens = np.where(keep, themes[:, None, :], swaps)
    return [[" ".join(f"w{w}" for w in tokens[i, r, :lengths[i, r]]) for r in range(5)] for i in range(images)]


def like_a_trained_model(refs, rng):
    """A sampled caption as a trained model makes it: one of the references with a few words replaced."""
    words = rng.choice(refs).split()
    for _ in range(3):
        words[rng.randrange(len(words))] = rng.choice(rng.choice(refs).split())
    return " ".join(words)


def median_ms(fn, repeats, sync):
    times = []
    for k in range(repeats + 1):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        if k:                                    # the first call warms up (and fills the reward's cache)
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", choices=SIZES, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--decoders", default="lstm,attention")
    args = parser.parse_args()
    preset, vocabulary, words = SIZES[args.sizes]
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = random.Random(0)
    images = 3000 if args.sizes == "tiny" else 10000
    refs = synthetic_references(images, vocabulary, words)
    rewards_fn = Rewards(refs)
    rows = []
    for kind in args.decoders.split(","):
        config = get_config(preset, objective="scst", decoder=kind, weights=None)
        torch.manual_seed(0)
        encoder, decoder = build_models(config, vocabulary, weights=None)
        encoder.to(device).train(), decoder.to(device).train()
        optimizer = torch.optim.Adam(list(decoder.parameters()) + list(encoder.linear_layer.parameters()) +
                                     list(encoder.batch_norm.parameters()), lr=config.lr)
        B, n = config.batch_size, config.scst_samples
        side = grid_cells(config.crop_size, config.resolved_grid_layer)
        shape = (B, encoder.feature_size, side, side) if kind == "attention" else (B, encoder.feature_size)
        features = torch.randn(shape, device=device)
        rows_of = [rng.randrange(images) for _ in range(B)]
        candidates = [like_a_trained_model(refs[r], rng) + " <end>" for r in rows_of for _ in range(n)]
        references = [rewards_fn.references[r] for r in rows_of for _ in range(n)]
        keys = [r for r in rows_of for _ in range(n)]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
            "cpu", enabled=False)

        def model_step():
            with autocast:
                drawn = sample_captions(decoder, encoder.head(features), n)
            reward = torch.rand(B * n, device=device)            # the reward's own time is measured below
            loss = reinforce_loss(drawn.log_probs, drawn.mask, reward, mean_of_others(reward, n))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def reward_step():
            rewards_fn.cider.score(candidates, references, keys=keys)

        model = median_ms(model_step, args.repeats, sync)
        reward = median_ms(reward_step, args.repeats, sync)
        rows.append((kind, B, n, model, reward))
    print(f"{args.sizes} sizes on {device}: one SCST step, median ms ({args.repeats} steps)")
    print(f"{'decoder':<10}{'images':>7}{'samples':>8}{'model':>10}{'reward':>10}{'reward/model':>14}")
    for kind, B, n, model, reward in rows:
        print(f"{kind:<10}{B:>7}{n:>8}{model:>10.1f}{reward:>10.1f}{reward / model:>14.2f}")


if __name__ == "__main__":
    main()
