"""Training speed: the chapter's loop (frozen encoder run at every step) vs training on cached features.

    python benchmarks/train_speed.py [--images 300] [--heldout 250] [--epochs 5] [--size 64]
                                     [--methods chapter views:2 maps] [--seeds 0] [--workers 0] [--profile]

Methods: `chapter` is the chapter's loop (--no-cache); `views:K` a cache of K pooled crops per
image, one drawn per caption; `views:K+J` the same cache with `cache_jitter` J (the views' mean
plus J times another image's crop deviation); `maps` a cache of feature maps (the whole image
and its mirror) that crops are pooled from.

Both use the coco preset's frozen-backbone configuration (ResNet-152, embedding 256, hidden
512, Adam 1e-3, batch 128). No ImageNet weights can be downloaded here, so the benchmark
writes a stand-in weights file first: a randomly initialised ResNet-152 whose BatchNorm
statistics are estimated from the training images. Every run loads it like a pretrained file
(`weights=path`), exactly the coco path. Same data, same model; each method runs once per
seed (the seed sets the decoder's initialisation, the data order and the augmentation), the
methods taking turns, each run in a fresh process.
- Timed: train() from start to end, feature extraction included for the cache, with its
  per-epoch validation on the captions of max(20, images/6) held-out images.
- Not timed: the held-out loss of each final model (last.ckpt), scored the same way for all
  of them, through the encoder on the images (eval transform), over every caption of the
  --heldout images.
On a GPU machine it runs on CUDA like `train()` does (AMP, channels_last); give it data-loader
workers there.
--profile runs the cached runs under cProfile and prints where their time went (extraction,
the LSTM, setup); their wall times then include the profiler's overhead.
"""
import argparse
import concurrent.futures
import cProfile
import multiprocessing
import os
import pstats
import shutil
import statistics
import tempfile
import time

import torch
import torchvision

from captioning.checkpoint import load_captioner
from captioning.config import get_config
from captioning.data import CocoCaptionDataset, collate_function, eval_transform
from captioning.device import pick_device
from captioning.model import calibrate_batchnorm
from captioning.prepare import ensure_prerequisites
from captioning.tinyset import make_tinyset
from captioning.training import EncoderDecoder, evaluate_loss, train
from captioning.vocabulary import load_vocabulary


def heldout_loss(checkpoint):
    """Per-token cross-entropy of a trained model on every held-out caption, images through the encoder."""
    device = pick_device()
    encoder, decoder, vocab, config = load_captioner(checkpoint, device)
    ds = CocoCaptionDataset(config.resized_images("val"), config.captions_json("val"), vocab,
                            eval_transform(config.resize_size, config.crop_size), config.max_seq_len,
                            group_by_image=True, progress=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, collate_fn=collate_function)
    return evaluate_loss(EncoderDecoder(encoder, decoder), loader, device)


def stand_in_weights(config, path):
    """A ResNet-152 state_dict with random weights and BatchNorm statistics measured on the training images."""
    torch.manual_seed(0)
    device = pick_device()
    resnet = torchvision.models.resnet152(weights=None).to(device)
    ds = CocoCaptionDataset(config.resized_images("train"), config.captions_json("train"),
                            load_vocabulary(config.vocabulary_path),
                            eval_transform(config.resize_size, config.crop_size),
                            group_by_image=True, progress=False)
    calibrate_batchnorm(resnet, (torch.stack([ds.load(i) for i in range(j, min(j + 64, len(ds)))]).to(device)
                                 for j in range(0, len(ds), 64)))
    torch.save(resnet.cpu().state_dict(), path)
    return path


def one_run(config, profile, start_method):
    """train(config) timed, then the final model's held-out loss (not timed); run in a fresh process.

    A spawned process makes spawn the default for the processes it starts in turn, so its
    data-loader workers would re-import torch and this script every epoch; `start_method`
    (the parent's default) makes them start as they would in a normal run.
    """
    multiprocessing.set_start_method(start_method, force=True)
    profiler = cProfile.Profile() if profile else None
    t = time.perf_counter()
    summary = profiler.runcall(train, config) if profiler else train(config)
    seconds = time.perf_counter() - t
    if profiler:
        print("cProfile, by cumulative time")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(
            r"features.py.*build_feature_cache|lstm.py.*(forward|backward)|(checkpoint.py.*build_models|training.py.*evaluate_loss)")
    return seconds, heldout_loss(summary["last"])


def method(text):
    """--methods entry -> (name, config overrides)."""
    if text == "chapter":
        return "chapter loop (--no-cache)", dict(cache=False)
    if text == "maps":
        return "cached maps, pooled crops", dict(cache=True, cache_kind="maps")
    views, _, jitter = text[6:].partition("+")
    if text.startswith("views:") and views.isdigit():
        try:
            jitter = float(jitter or 0)
        except ValueError:
            jitter = -1
        if jitter >= 0:
            name = f"cached views, K={views}" + (f", jitter {jitter:g}" if jitter else "")
            return name, dict(cache=True, cache_kind="views", cache_views=int(views), cache_jitter=jitter)
    raise SystemExit(f"unknown method {text!r}: chapter, views:K, views:K+JITTER or maps")


def paired(losses, base):
    """Mean paired difference from the base method over seeds, with its t statistic and sign count."""
    diffs = [a - b for a, b in zip(losses, base)]
    mean = statistics.mean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    t = mean / (sd / len(diffs) ** 0.5) if sd > 0 else float("nan")
    return f"{mean:+.3f} (t = {t:.1f}, worse for {sum(d > 0 for d in diffs)} of {len(diffs)})"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--heldout", type=int, default=250, help="held-out images the final models are scored on")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="crop size (images are resized to size + size/8)")
    parser.add_argument("--methods", nargs="+", default=["chapter", "views:2", "maps"],
                        help="chapter, views:K (a cache of K pooled crops), views:K+J (with cache_jitter J), "
                             "maps (a cache of feature maps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per method per seed")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers (0 on a 2-core CPU)")
    parser.add_argument("--profile", action="store_true", help="cProfile the cached runs")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="train-bench-")
    try:
        data = os.path.join(work, "data")
        val_images = max(20, args.images // 6)  # validated on during training (timed)
        heldout = max(args.heldout, val_images)
        make_tinyset(data, train=args.images, val=heldout, seed=0)
        common = dict(data_dir=data, resize_size=args.size + args.size // 8, crop_size=args.size,
                      epochs=args.epochs, num_workers=args.workers, progress=False, vocab_threshold=1,
                      save_every=10 ** 9, log_every=10 ** 9, val_max_captions=5 * val_images)
        config = get_config("coco", **common)
        ensure_prerequisites(config, log=lambda *a: None)
        common["weights"] = stand_in_weights(config, os.path.join(work, "resnet152.pth"))
        methods = [method(m) for m in args.methods]
        times = {name: [] for name, _ in methods}
        losses = {name: [] for name, _ in methods}
        for seed in args.seeds:
            for name, extra in methods:
                config = get_config("coco", models_dir=os.path.join(work, "models"), seed=seed, **common, **extra)
                shutil.rmtree(config.features_dir, ignore_errors=True)  # extraction is part of the cost
                shutil.rmtree(config.models_dir, ignore_errors=True)
                # A fresh process per run, so no run inherits another's allocator or thread-pool state.
                with concurrent.futures.ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as pool:
                    seconds, loss = pool.submit(one_run, config, args.profile and config.use_cache,
                                                  multiprocessing.get_start_method()).result()
                times[name].append(seconds)
                losses[name].append(loss)
                print(f"seed {seed}  {name:<28}{times[name][-1]:>8.1f} s   held-out loss {losses[name][-1]:.3f}",
                      flush=True)
        base = statistics.median(times[methods[0][0]])
        where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPUs"
        print(f"\nResNet-152 (frozen, stand-in weights) at {args.size}px, {args.images} images x 5 captions, "
              f"{args.epochs} epochs, batch {config.batch_size}, {where}, {args.workers} workers; "
              f"seeds {' '.join(map(str, args.seeds))}; held-out loss of the final model on {heldout} images\n")
        spread = len(args.seeds) > 1
        print(f"{'method':<30}{'wall s':>9}{'speed-up':>10}{'held-out loss':>15}" + ("   per seed" if spread else ""))
        for name, _ in methods:
            mean = statistics.mean(losses[name])
            per_seed = "   " + " ".join(f"{x:.3f}" for x in losses[name]) if spread else ""
            print(f"{name:<30}{statistics.median(times[name]):>9.1f}{base / statistics.median(times[name]):>9.1f}x"
                  f"{mean:>15.3f}{per_seed}")
        if spread:
            print("\nwall s: median over seeds; held-out loss: mean over seeds")
            print(f"held-out loss minus the {methods[0][0]}'s, paired by seed:")
            for name, _ in methods[1:]:
                print(f"  {name:<30}{paired(losses[name], losses[methods[0][0]])}")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
