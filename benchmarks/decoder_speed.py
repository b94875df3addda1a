"""Decoder training step on a CPU: nn.LSTM on packed captions vs captioning/lstm.py's LSTM.

    python benchmarks/decoder_speed.py [--steps 10] [--profile]

One training step of LSTMModel as train() runs it on cached features: forward on a packed
batch, cross-entropy, backward, Adam. Same weights, same batches; the two ways alternate
step by step so that machine noise hits both alike; median step time of each.
Shapes: the coco preset (batch 128, embedding 256, hidden 512) with a 10,000-word vocabulary,
about COCO's at threshold 4, and with the tiny set's 33 words as benchmarks/train_speed.py
trains it; and the tiny preset (batch 128, embedding 128, hidden 256, 33 words).
Caption lengths are drawn from 9..20 tokens (<start> ... <end>; COCO averages about 13).
--profile then prints torch.profiler's busiest operations in 3 nn.LSTM steps at the coco shapes
with 33 words: the aten::fill_ and aten::add_ on (N, 4H) tensors are what lstm.py avoids.
"""
import argparse
import statistics
import time

import torch

from captioning.config import get_config
from captioning.lstm import use_packed_cpu_lstm
from captioning.model import LSTMModel
from captioning.training import caption_loss


def make_batches(n, batch, embedding, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        lengths = sorted(torch.randint(9, 21, (batch,), generator=gen).tolist(), reverse=True)
        captions = torch.randint(3, vocab, (batch, lengths[0]), generator=gen)
        batches.append((torch.randn(batch, embedding, generator=gen), captions, lengths))
    return batches


def step_time(decoder, optimizer, batch):
    features, captions, lengths = batch
    t = time.perf_counter()
    loss = caption_loss(decoder(features, captions, lengths), captions, lengths)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10, help="timed steps per way (after 2 warm-up steps)")
    parser.add_argument("--profile", action="store_true", help="then profile nn.LSTM's steps (coco shapes, 33 words)")
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads, median of {args.steps} steps each, the two ways alternating\n")
    print(f"{'shapes':<34}{'nn.LSTM ms':>12}{'lstm.py ms':>12}{'speed-up':>10}")
    for preset, vocab in (("coco", 10_000), ("coco", 33), ("tiny", 33)):
        config = get_config(preset)
        torch.manual_seed(0)
        ways = {}
        for fast in (False, True):
            decoder = LSTMModel(config.embedding_size, config.hidden_layer_size, vocab, config.num_layers)
            use_packed_cpu_lstm(decoder, fast)
            ways[fast] = (decoder, torch.optim.Adam(decoder.parameters(), config.lr), [])
        ways[True][0].load_state_dict(ways[False][0].state_dict())
        batches = make_batches(args.steps + 2, config.batch_size, config.embedding_size, vocab)
        for i, batch in enumerate(batches):
            for decoder, optimizer, times in ways.values():
                elapsed = step_time(decoder, optimizer, batch)
                if i >= 2:
                    times.append(elapsed)
        slow, fast = (statistics.median(ways[k][2]) for k in (False, True))
        shapes = f"{preset}: B{config.batch_size} E{config.embedding_size} H{config.hidden_layer_size} V{vocab}"
        print(f"{shapes:<34}{slow * 1e3:>12.0f}{fast * 1e3:>12.0f}{slow / fast:>9.2f}x")
        if args.profile and preset == "coco" and vocab == 33:
            profiled = (ways[False][0], ways[False][1], batches[:3])
    if args.profile:
        from torch.profiler import profile

        decoder, optimizer, steps = profiled
        decoder_batch = steps[0][1].size(0)          # per-step slices are at most this many rows
        with profile(record_shapes=True) as prof:
            for batch in steps:
                step_time(decoder, optimizer, batch)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=30))
        four_h = 4 * decoder.lstm_layer.hidden_size
        wasted = sum(e.self_cpu_time_total for e in prof.key_averages(group_by_input_shape=True)
                     if e.key in ("aten::fill_", "aten::add_") and e.input_shapes and len(e.input_shapes[0]) == 2
                     and e.input_shapes[0][1] == four_h and e.input_shapes[0][0] > decoder_batch)
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        print(f"fill_ and add_ on (all tokens, 4H) gradients: {wasted / total:.0%} of the profiled CPU time")


if __name__ == "__main__":
    main()
