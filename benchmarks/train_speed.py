"""Training speed: the chapter's loop (frozen encoder run at every step) vs training on cached features.

    python benchmarks/train_speed.py [--images 300] [--epochs 5] [--size 64] [--views 2 1 5] [--workers 0] [--profile]

Both use the coco preset's frozen-backbone configuration (ResNet-152, embedding 256, hidden
512, Adam 1e-3, batch 128). No ImageNet weights can be downloaded here, so the benchmark
writes a stand-in weights file first: a randomly initialised ResNet-152 whose BatchNorm
statistics are estimated from the training images. Both runs load it like a pretrained file
(`weights=path`), exactly the coco path. Same data, same model, one run each: wall time
(feature extraction included for the cache) and the held-out loss. On a GPU machine it runs
on CUDA like `train()` does (AMP, channels_last); give it data-loader workers there.
--profile runs the cached runs under cProfile and prints where their time went (extraction,
the LSTM, setup); their wall times then include the profiler's overhead.
"""
import argparse
import cProfile
import json
import os
import pstats
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torchvision  # noqa: E402

from captioning.config import get_config  # noqa: E402
from captioning.data import CocoCaptionDataset, eval_transform  # noqa: E402
from captioning.model import calibrate_batchnorm  # noqa: E402
from captioning.vocabulary import load_vocabulary  # noqa: E402
from captioning.tinyset import make_tinyset  # noqa: E402
from captioning.training import ensure_prerequisites, pick_device, train  # noqa: E402


def val_losses(log):
    """(after the last epoch, best epoch) held-out loss; best.ckpt keeps the best."""
    with open(log) as f:
        losses = [json.loads(line)["val_loss"] for line in f if "val_loss" in line]
    return losses[-1], min(losses)


def stand_in_weights(config, path):
    """A ResNet-152 state_dict with random weights and BatchNorm statistics measured on the training images."""
    torch.manual_seed(0)
    device = pick_device()
    resnet = torchvision.models.resnet152(weights=None).to(device)
    ds = CocoCaptionDataset(config.resized_images("train"), config.captions_json("train"),
                            load_vocabulary(config.vocabulary_path), eval_transform(config.resize_size, config.crop_size),
                            group_by_image=True, progress=False)
    calibrate_batchnorm(resnet, (torch.stack([ds.load(i) for i in range(j, min(j + 64, len(ds)))]).to(device)
                                 for j in range(0, len(ds), 64)))
    torch.save(resnet.cpu().state_dict(), path)
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="crop size (images are resized to size + size/8)")
    parser.add_argument("--views", type=int, nargs="+", default=[2, 1, 5], help="K values for the cache (2 is the default)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers (0 on a 2-core CPU)")
    parser.add_argument("--profile", action="store_true", help="cProfile the cached runs")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="train-bench-")
    try:
        data = os.path.join(work, "data")
        make_tinyset(data, train=args.images, val=max(20, args.images // 6), seed=0)
        common = dict(data_dir=data, resize_size=args.size + args.size // 8, crop_size=args.size,
                      epochs=args.epochs, num_workers=args.workers, progress=False, vocab_threshold=1,
                      save_every=10 ** 9, log_every=10 ** 9)
        config = get_config("coco", **common)
        ensure_prerequisites(config, log=lambda *a: None)
        common["weights"] = stand_in_weights(config, os.path.join(work, "resnet152.pth"))
        runs = [("chapter loop (--no-cache)", dict(cache=False))]
        runs += [(f"cached features, K={k}", dict(cache=True, cache_views=k)) for k in args.views]
        results = []
        for name, extra in runs:
            config = get_config("coco", models_dir=os.path.join(work, f"m{len(results)}"), **common, **extra)
            shutil.rmtree(config.features_dir, ignore_errors=True)  # extraction is part of the cost
            profiler = cProfile.Profile() if args.profile and config.use_cache else None
            t = time.perf_counter()
            summary = profiler.runcall(train, config) if profiler else train(config)
            if profiler:
                print(f"\n{name}: cProfile, by cumulative time")
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(
                    r"features.py.*build_feature_cache|lstm.py.*(forward|backward)|training.py.*(build_models|evaluate_loss)")
            results.append((name, time.perf_counter() - t, *val_losses(summary["log"])))
        base = results[0][1]
        where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPUs"
        print(f"\nResNet-152 (frozen, stand-in weights) at {args.size}px, {args.images} images x 5 captions, "
              f"{args.epochs} epochs, batch {config.batch_size}, {where}, {args.workers} workers\n")
        print(f"{'method':<30}{'wall s':>9}{'speed-up':>10}{'held-out loss: last':>21}{'best':>7}")
        for name, secs, last, best in results:
            print(f"{name:<30}{secs:>9.1f}{base / secs:>9.1f}x{last:>21.3f}{best:>7.3f}")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
