"""One prepared check of the CUDA paths, for a GPU machine: AMP, channels_last, extraction and decoder speed.

    python benchmarks/cuda_check.py [--backbone resnet152] [--batch 128]
    python benchmarks/cuda_check.py --device cpu --batch 4 --repeats 1   # dry run of the script itself

Reports, on the card it finds:
  1. the autocast dtype that training uses there;
  2. ResNet feature extraction, images/s, fp32 vs AMP x contiguous vs channels_last, each with the
     largest difference from the fp32 features (relative to their largest magnitude);
  3. decoder training steps/s (vocabulary 10k, captions up to 20 tokens) with and without AMP;
  4. train() on a generated tiny set with the coco preset, from the feature cache and with
     --no-cache (the chapter's loop), a few steps each;
  5. `torchrun --nproc_per_node=1` (DDP over NCCL on a GPU, gloo on a CPU);
  6. the checkpoint step 5 wrote, captioning an image in a process that sees no GPU.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from captioning.config import get_config
from captioning.device import amp_dtype_for
from captioning.model import CNNModel, LSTMModel
from captioning.tinyset import make_tinyset
from captioning.training import caption_loss, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rate(fn, items, device, repeats):
    """Items per second over `repeats` calls, after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return items * repeats / (time.perf_counter() - t)


def extraction(device, dtype, backbone, batch, repeats):
    encoder = CNNModel(256, backbone, weights=None).to(device).eval()
    images = torch.randn(batch, 3, 224, 224, device=device)
    with torch.no_grad():
        ref = encoder.extract(images).float()
        for cl in (False, True):
            encoder.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            x = images.contiguous(memory_format=torch.channels_last) if cl else images
            for amp in (False, True):
                def run():
                    with torch.autocast(device.type, dtype=dtype, enabled=amp and dtype is not None):
                        return encoder.extract(x)
                diff = ((run().float() - ref).abs().max() / ref.abs().max()).item()
                print(f"  extract {backbone} channels_last={cl!s:<5} amp={amp!s:<5} "
                      f"{rate(run, batch, device, repeats):8.0f} img/s   max diff vs fp32 {diff:.2e} (relative)")


def decoder_steps(device, dtype, batch, repeats):
    torch.manual_seed(0)
    decoder = LSTMModel(256, 512, 10000, 1).to(device)
    opt = torch.optim.Adam(decoder.parameters(), 1e-3)
    feats = torch.randn(batch, 256, device=device)
    caps = torch.randint(4, 10000, (batch, 20), device=device)
    lengths = sorted(torch.randint(8, 21, (batch,)).tolist(), reverse=True)
    for amp in (False, True):
        scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=amp and dtype is not None):
                loss = caption_loss(decoder(feats, caps, lengths), caps, lengths)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        print(f"  decoder train steps/s amp={amp!s:<5} {rate(step, 1, device, repeats * 5):8.1f}  "
              f"(batch {batch}, vocab 10k, lengths 8-20)")


def run(cmd, env=None):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    print("  $ " + " ".join(cmd[2:] if cmd[0] == sys.executable else cmd))
    print("\n".join("    " + line for line in lines[-6:]))
    print(f"  exit code {proc.returncode}")
    return proc.returncode


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="resnet152")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: nothing to check here (--device cpu runs the script itself as a dry run)")
    device = torch.device(args.device)
    dtype = amp_dtype_for(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"1. device: {name}, torch {torch.__version__}, autocast dtype in training: {dtype}")
    print("2. feature extraction")
    extraction(device, dtype, args.backbone, args.batch, args.repeats)
    print("3. decoder")
    decoder_steps(device, dtype, args.batch, args.repeats)
    failures = 0
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "tiny")
        make_tinyset(data, train=256, val=32)
        print("4. train() with the coco preset (random ResNet, BatchNorm calibrated) on a tiny set")
        for cache in (True, False):
            t = time.perf_counter()
            summary = train(get_config("coco", data_dir=data, models_dir=os.path.join(work, f"m{cache}"),
                                       backbone=args.backbone, weights=None, max_steps=4, batch_size=32,
                                       vocab_threshold=1, resize_size=144, crop_size=128, progress=False,
                                       num_workers=4, device=args.device, cache=cache))
            print(f"  cache={cache}: {summary['step']} steps in {time.perf_counter() - t:.1f} s "
                  f"(setup included), loss {summary['loss']:.3f}")
        print("5. torchrun, one process")
        models = os.path.join(work, "ddp")
        failures += run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                         "-m", "captioning", "train", "--preset", "tiny", "--data-dir", data,
                         "--models-dir", models, "--max-steps", "4", "--set", "progress=false"]) != 0
        print("6. that checkpoint, loaded where no GPU is visible")
        image = os.path.join(data, "val2014", sorted(os.listdir(os.path.join(data, "val2014")))[0])
        failures += run([sys.executable, "-m", "captioning", "caption", image, "--checkpoint",
                         os.path.join(models, "last.ckpt"), "--device", "cpu"],
                        env=dict(os.environ, CUDA_VISIBLE_DEVICES="")) != 0
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
