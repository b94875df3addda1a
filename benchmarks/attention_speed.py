"""The attention decoder's training step beside the chapter's LSTM, on cached features, in one run.

    python benchmarks/attention_speed.py --sizes tiny --grid-layers 3 2   # the tiny preset's sizes (a CPU),
                                                                          # its 4x4 and 7x7 grids
    python benchmarks/attention_speed.py --sizes coco --train    # COCO's sizes (a GPU), then train() on the
                                                                 # coco code path with decoder=attention

One step = the encoder's head on cached backbone output (a pooled vector, or a grid), the decoder's
teacher-forced forward, the loss (plus the attention decoder's doubly stochastic term), backward and
Adam, for a batch of captions of realistic lengths. The two decoders take turns, step by step, so a
machine that slows down slows both; the table gives each one's median and the ratio.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from captioning.attention import grid_cells
from captioning.checkpoint import build_models
from captioning.config import get_config
from captioning.device import amp_dtype_for
from captioning.training import caption_loss, decoder_penalty, make_optimizer

SIZES = {   # (preset, vocabulary, caption tokens)
    "tiny": ("tiny", 40, 22),
    "coco": ("coco", 10000, 14),
}


def make_step(config, vocab, tokens, batch, device, dtype):
    """A function running one training step of config's decoder on random cached features."""
    cells = grid_cells(config.crop_size, config.resolved_grid_layer)
    torch.manual_seed(0)
    encoder, decoder = build_models(config, vocab, weights=None)
    encoder, decoder = encoder.to(device), decoder.to(device).train()
    shape = (batch, encoder.feature_size, cells, cells) if config.decoder == "attention" else \
        (batch, encoder.feature_size)
    features = torch.randn(shape, device=device).half()               # the cache stores fp16
    lengths = sorted(torch.randint(tokens // 2, tokens + 1, (batch,)).tolist(), reverse=True)
    captions = torch.randint(4, vocab, (batch, tokens), device=device)
    optimizer = make_optimizer(config, encoder, decoder)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def step():
        with autocast:
            logits = decoder(encoder.head(features), captions, lengths)
            loss = caption_loss(logits, captions, lengths) + decoder_penalty(decoder)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def train_check(device):
    """train() on the coco code path with decoder=attention (random ResNet-152, a generated set)."""
    from captioning.tinyset import make_tinyset
    from captioning.training import train

    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "tiny")
        make_tinyset(data, train=256, val=32)
        for decoder in ("lstm", "attention"):
            t = time.perf_counter()
            summary = train(get_config("coco", data_dir=data, models_dir=os.path.join(work, decoder), weights=None,
                                       decoder=decoder, max_steps=6, batch_size=32, vocab_threshold=1,
                                       resize_size=256, crop_size=224, progress=False, num_workers=4,
                                       device=str(device)))
            print(f"train() coco preset, decoder={decoder}: {summary['step']} steps in "
                  f"{time.perf_counter() - t:.1f} s (setup and the grid cache included), loss {summary['loss']:.3f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grid-layers", type=int, nargs="+", default=[0],
                        help="the attention decoder's ResNet stages to time (0: the preset's rule)")
    parser.add_argument("--train", action="store_true", help="also run train() on the coco path with attention")
    args = parser.parse_args()
    device = torch.device(args.device)
    preset, vocab, tokens = SIZES[args.sizes]
    dtype = amp_dtype_for(device) if device.type == "cuda" else None
    configs = {"lstm": get_config(preset, weights=None)}
    for layer in args.grid_layers:
        config = get_config(preset, decoder="attention", grid_layer=layer, weights=None)
        cells = grid_cells(config.crop_size, config.resolved_grid_layer)
        configs[f"attention, layer{config.resolved_grid_layer} {cells}x{cells}"] = config
    steps = {name: make_step(config, vocab, tokens, args.batch, device, dtype) for name, config in configs.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for k in range(args.steps + 2):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            if k >= 2:                                         # two warm-up steps each
                times[name].append(time.perf_counter() - t)
    print(f"\n{args.sizes} sizes on {device} ({torch.get_num_threads()} CPU threads), batch {args.batch}, "
          f"{tokens}-token captions, amp={dtype}, {args.steps} steps each\n")
    print("| decoder | ms per step (median) | captions/s | vs the chapter's LSTM |")
    print("|---|---:|---:|---:|")
    lstm = statistics.median(times["lstm"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1000 * median:.1f} | {args.batch / median:.0f} | {median / lstm:.2f}x |")
    if args.train:
        train_check(device)


if __name__ == "__main__":
    sys.exit(main())
