"""Decoding benchmark: the chapter's one-image-at-a-time captioning vs batched greedy and batched beam-3.

    python benchmarks/decode.py [--images 256] [--batch 64] [--repeats 3]

Same model, same images, one run. Two settings:
  decoder  - pre-computed image embeddings: the decoding itself (what batching changes);
  end-to-end - the tiny preset's encoder (ResNet-18 at 56 px) + decoder, from image tensors.
The chapter's pattern: for each image, encoder(image[None]), decoder.sample(feature), then a
Python loop over the ids to build the sentence.
"""
import argparse
import statistics
import time

import torch

from captioning.checkpoint import build_models
from captioning.config import get_config
from captioning.inference import generate
from captioning.model import decode
from captioning.vocabulary import Vocab


def chapter_caption(encoder, decoder, image, vocab):
    sampled = decoder.sample(encoder(image.unsqueeze(0)))[0].cpu().numpy()
    words = []
    for token_index in sampled:
        word = vocab.i2w[int(token_index)]
        words.append(word)
        if word == "<end>":
            break
    return " ".join(words)


def batched(encoder, decoder, inputs, vocab, batch, beam):
    return [decode(ids, vocab) for i in range(0, len(inputs), batch)
            for ids in generate(encoder, decoder, inputs[i:i + batch], beam)]


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = get_config("tiny")
    words = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(60)]
    vocab = Vocab.from_words(words)
    encoder, decoder = build_models(config, len(vocab))
    encoder.eval(), decoder.eval()
    images = torch.randn(args.images, 3, config.crop_size, config.crop_size)
    with torch.no_grad():
        features = torch.cat([encoder(images[i:i + 64]) for i in range(0, args.images, 64)])
    print(f"{args.images} images, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats}; "
          f"decoder: embedding {config.embedding_size}, hidden {config.hidden_layer_size}, "
          f"max_seq_len {config.max_seq_len}\n")
    print(f"{'setting':<12}{'method':<34}{'images/s':>10}{'vs chapter':>12}")
    with torch.no_grad():
        for setting, enc, inputs in (("decoder", torch.nn.Identity(), features), ("end-to-end", encoder, images)):
            base = median_time(lambda: [chapter_caption(enc, decoder, x, vocab) for x in inputs], args.repeats)
            rows = [("chapter: one image at a time", base)]
            for beam in (1, 3):
                t = median_time(lambda: batched(enc, decoder, inputs, vocab, args.batch, beam), args.repeats)
                rows.append((f"batched {'greedy' if beam == 1 else 'beam-3'}", t))
            for name, t in rows:
                print(f"{setting:<12}{name:<34}{args.images / t:>10.0f}{base / t:>11.1f}x")


if __name__ == "__main__":
    main()
