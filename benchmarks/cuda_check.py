"""One prepared check of the CUDA paths, for a GPU machine: AMP, channels_last, extraction and decoder speed.

    python benchmarks/cuda_check.py [--backbone resnet152] [--batch 128]

Reports, on the card it finds: the autocast dtype training would use, that channels_last and
autocast give the same features as fp32 (max abs difference), ResNet feature-extraction images/s
in fp32 vs AMP and contiguous vs channels_last, decoder training steps/s with and without AMP,
and a 2-step training run through `train()` on a generated tiny set. Exits early without CUDA.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from captioning.config import get_config  # noqa: E402
from captioning.model import CNNModel, LSTMModel  # noqa: E402
from captioning.training import amp_dtype_for, caption_loss, train  # noqa: E402


def rate(fn, items, repeats=10):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return items * repeats / (time.perf_counter() - t)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="resnet152")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: nothing to check here")
    device = torch.device("cuda")
    dtype = amp_dtype_for(device)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, autocast dtype: {dtype}")
    encoder = CNNModel(256, args.backbone, weights=None).to(device).eval()
    images = torch.randn(args.batch, 3, 224, 224, device=device)
    with torch.no_grad():
        ref = encoder.extract(images).float()
        results = {}
        for cl in (False, True):
            enc = encoder.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            x = images.contiguous(memory_format=torch.channels_last) if cl else images
            for amp in (False, True):
                def run():
                    with torch.autocast("cuda", dtype=dtype, enabled=amp):
                        return enc.extract(x)
                diff = (run().float() - ref).abs().max().item()
                results[(cl, amp)] = rate(run, args.batch)
                print(f"extract {args.backbone} channels_last={cl!s:<5} amp={amp!s:<5} "
                      f"{results[(cl, amp)]:8.0f} img/s   max |diff| vs fp32 {diff:.3g}")
    decoder = LSTMModel(256, 512, 10000, 1).to(device)
    opt = torch.optim.Adam(decoder.parameters(), 1e-3)
    feats = torch.randn(args.batch, 256, device=device)
    caps = torch.randint(4, 10000, (args.batch, 20), device=device)
    lengths = list(range(20, 20 - args.batch // 8, -1)) * 8
    lengths = sorted((lengths + [12] * args.batch)[: args.batch], reverse=True)
    for amp in (False, True):
        def step():
            with torch.autocast("cuda", dtype=dtype, enabled=amp):
                loss = caption_loss(decoder(feats, caps, lengths), caps, lengths)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"decoder train steps/s amp={amp!s:<5} {rate(step, 1):8.1f}  (batch {args.batch}, vocab 10k)")
    with tempfile.TemporaryDirectory() as work:
        from captioning.tinyset import make_tinyset

        make_tinyset(os.path.join(work, "tiny"), train=64, val=16)
        summary = train(get_config("coco", data_dir=os.path.join(work, "tiny"), models_dir=os.path.join(work, "m"),
                                   backbone=args.backbone, weights=None, max_steps=2, batch_size=32,
                                   vocab_threshold=1, progress=False, num_workers=2))
        print(f"train() on CUDA with the cache: {summary['step']} steps, loss {summary['loss']:.3f}")


if __name__ == "__main__":
    main()
