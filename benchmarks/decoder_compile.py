"""The decoder's training step on cached features: eager vs torch.compile vs CUDA graphs.

    python benchmarks/decoder_compile.py [--batch 128] [--vocab 10000] [--steps 50]
    python benchmarks/decoder_compile.py --device cpu --batch 8 --vocab 100 --steps 3   # dry run

On a GPU the step (head, LSTM over 20 tokens, output layer, cross-entropy, backward, Adam) is a
few milliseconds of many small kernels: launch-bound. Compiling it fuses the elementwise work,
and CUDA graphs (mode="reduce-overhead") replay the whole step with one launch. Both want fixed
shapes, and a packed sequence has a data-dependent size, so the compiled ways run the padded
equivalent: the LSTM over all positions, the loss masked to the real tokens. The LSTM is
unidirectional, so the outputs at real positions, and the loss, are the same as the packed
step's (the script checks it). Ways, side by side on the same batches:
  eager packed   what train() does (pack_padded_sequence, cuDNN)
  eager padded   the padded, masked step
  compiled       torch.compile of the padded step's forward+loss (default mode)
  CUDA graphs    torch.compile(mode="reduce-overhead"); GPU only
Steps/s: median over 5 rounds of --steps steps each, after warm-up (compilation not timed, but
reported).
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn

from captioning.model import LSTMModel
from captioning.training import caption_loss


def padded_loss(head, decoder, features, captions, lengths_t):
    """The packed step's loss, computed on padded tensors with a mask (fixed shapes)."""
    embeddings = decoder.embedding_layer(captions)                                        # (B, T, E)
    lstm_input = torch.cat((head(features).unsqueeze(1), embeddings[:, :-1]), 1)          # (B, T, E)
    hidden, _ = decoder.lstm_layer(lstm_input)
    logits = decoder.linear_layer(hidden).float()                                         # (B, T, V)
    mask = torch.arange(captions.size(1), device=captions.device)[None] < lengths_t[:, None]
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), captions, reduction="none")
    return (losses * mask).sum() / mask.sum()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    feature_size = 2048                                      # ResNet-152's pooled features
    head = nn.Sequential(nn.Linear(feature_size, 256), nn.BatchNorm1d(256, momentum=0.01)).to(device)  # CNNModel.head
    decoder = LSTMModel(256, 512, args.vocab, 1).to(device)
    params = list(head.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.Adam(params, 1e-3, capturable=device.type == "cuda")
    T = 20
    batches = []
    for b in range(4):
        g = torch.Generator().manual_seed(b)
        lengths = sorted(torch.randint(8, T + 1, (args.batch,), generator=g).tolist(), reverse=True)
        captions = torch.randint(4, args.vocab, (args.batch, T), generator=g)
        for i, n in enumerate(lengths):
            captions[i, n:] = 0
        batches.append((torch.randn(args.batch, feature_size, generator=g).to(device), captions.to(device),
                        lengths, torch.tensor(lengths, device=device)))

    def packed(features, captions, lengths, lengths_t):
        return caption_loss(decoder(head(features), captions, lengths), captions, lengths)

    def padded(features, captions, lengths, lengths_t):
        return padded_loss(head, decoder, features, captions, lengths_t)

    with torch.no_grad():
        f, c, lengths, lt = batches[0]
        same = abs(packed(f, c, lengths, lt).item() - padded(f, c, lengths, lt).item())
    print(f"packed vs padded loss on one batch: |difference| = {same:.2e}")

    ways = {"eager packed": packed, "eager padded": padded}
    compile_s = {}
    for name, mode in (("compiled", "default"), ("CUDA graphs", "reduce-overhead")):
        if mode == "reduce-overhead" and device.type != "cuda":
            continue
        try:
            fn = torch.compile(padded, mode=mode, dynamic=False)
            t = time.perf_counter()
            for _ in range(3):                                  # compile, then the graphs' warm-up runs
                loss = fn(*batches[0])
                optimizer.zero_grad(set_to_none=False)
                loss.backward()
            sync()
            compile_s[name] = time.perf_counter() - t
            ways[name] = fn
        except Exception as e:  # a backend missing on this machine: report it, go on with the others
            print(f"{name}: not available here ({type(e).__name__}: {str(e).splitlines()[0][:120]})")

    def run(fn, steps):
        for s in range(steps):
            loss = fn(*batches[s % len(batches)])
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            optimizer.step()
        sync()

    times = {name: [] for name in ways}
    for name, fn in ways.items():
        run(fn, 3)                                               # warm-up
    for _ in range(5):                                           # rounds, the ways taking turns
        for name, fn in ways.items():
            t = time.perf_counter()
            run(fn, args.steps)
            times[name].append(args.steps / (time.perf_counter() - t))
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\ndecoder training step, batch {args.batch}, vocabulary {args.vocab}, captions 8-{T} tokens, "
          f"features {feature_size}, {where}, torch {torch.__version__}; median of 5 rounds\n")
    print("| way | steps/s | vs eager packed | compile s |")
    print("|---|---:|---:|---:|")
    base = statistics.median(times["eager packed"])
    for name in ways:
        rate = statistics.median(times[name])
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {compile_s.get(name, 0):.1f} |")


if __name__ == "__main__":
    main()
