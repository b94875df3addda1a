"""Serving a captioner on a CPU: eager PyTorch fp32 against the exported model on ONNX Runtime, fp32 and int8.

    python benchmarks/serve.py                      # the tiny model and ResNet-152 at 224 px, batch 1 and 32
    python benchmarks/serve.py --quality            # and the int8 encoder's cost in CIDEr and semantic accuracy

Each row captions a batch of preprocessed tiny-set val images (encoder, then greedy decoding driven by the
library's search, which stops once every caption has ended) and reports images/s and the time per batch,
median of --repeats (the runtimes taking turns), side by side with eager fp32; also the encoder's share
and the mean caption length, since a runtime whose captions run longer decodes longer.
The tiny model is models_dir/tiny/best.ckpt (make demo); ResNet-152 is the coco preset's model with random
weights, which time the same as trained ones. The int8 encoders are calibrated on 100 tiny-set training
images (export --int8). --quality scores the tiny val set with each runtime (beam 3): CIDEr and the
semantic check with 95% intervals, and the paired CIDEr difference against fp32.
"""
import argparse
import os
import statistics
import tempfile
import time

import torch

from captioning.checkpoint import atomic_save, build_models, checkpoint_state
from captioning.config import get_config
from captioning.export import export_model, load_exported
from captioning.inference import generate
from captioning.vocabulary import Vocab

TINY = "models_dir/tiny/best.ckpt"
CALIBRATION = "data_dir/tiny/resized_images/train2014"


def resnet152_checkpoint(folder):
    """A coco-preset checkpoint with random weights (the backbone carried in it), 9,487 words."""
    config = get_config("coco", weights=None, models_dir=folder)
    vocab = Vocab.from_words(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(9483)])
    torch.manual_seed(0)
    encoder, decoder = build_models(config, len(vocab), weights=None)
    path = os.path.join(folder, "best.ckpt")
    atomic_save(checkpoint_state(config, vocab, encoder.eval(), decoder), path)
    return path


def val_images(config, count):
    """The first `count` tiny-set val images through `config`'s eval_transform: real pictures, so that each
    runtime's captions end where the model says (greedy search stops once every caption has ended)."""
    from captioning.data import eval_transform
    from captioning.images import list_images, load_image

    folder = os.path.join(get_config("tiny").data_dir, "resized_images", "val2014")
    names = list_images(folder)[:count]
    transform = eval_transform(config.resize_size, config.crop_size)
    return torch.stack([transform(load_image(os.path.join(folder, n))) for n in names])


def time_runtimes(runtimes, images, repeats):
    """{label: (median seconds of the encoder alone, of encoder + greedy search, mean caption length)} over
    `images`, for each model = (encoder, decoder, vocab, config) of `runtimes`. The runtimes take turns
    within each repeat, so that a slow spell of a shared machine falls on all of them alike."""
    times = {label: ([], []) for label in runtimes}
    words = {}
    for k in range(repeats + 1):
        for label, (encoder, decoder, _, _) in runtimes.items():
            with torch.no_grad():
                t = time.perf_counter()
                encoder(images)
                t1 = time.perf_counter()
                ids = generate(encoder, decoder, images, beam_size=1)
                t2 = time.perf_counter()
            if k:                                              # the first round warms up
                times[label][0].append(t1 - t)
                times[label][1].append(t2 - t1)
            words[label] = statistics.mean(len(i) for i in ids)
    return {label: (statistics.median(e), statistics.median(w), words[label]) for label, (e, w) in times.items()}


def quality(folder, checkpoint):
    from captioning.diagnostics import compare_results
    from captioning.evaluation import evaluate_checkpoint, result_record

    data_dir = get_config("tiny").data_dir
    rows, records = {}, {}
    for label, kwargs in (("eager fp32", {"checkpoint": checkpoint}),
                          ("ONNX fp32", {"checkpoint": None, "model": folder, "runtime": "onnx"}),
                          ("ONNX int8", {"checkpoint": None, "model": folder, "runtime": "onnx-int8"})):
        result = evaluate_checkpoint(beam_size=3, data_dir=data_dir, progress=False, **kwargs)
        rows[label] = result
        records[label] = result_record(result, kwargs.get("checkpoint") or folder, "val", 3)
    print("\ntiny val set, beam 3: quality of each runtime")
    print(f"{'runtime':<12}{'CIDEr':>8}  {'95% interval':<16}{'objects':>9}{'all right':>11}  paired CIDEr vs eager")
    for label, result in rows.items():
        low, high = result["intervals"]["CIDEr"]
        semantic = result["semantic"]
        paired = ""
        if label != "eager fp32":
            c = compare_results(records["eager fp32"], records[label])["CIDEr"]
            paired = f"{c['difference']:+.3f} [{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}]"
        print(f"{label:<12}{result['metrics']['CIDEr']:>8.3f}  [{low:.3f}, {high:.3f}]  {semantic['objects']:>8.1%}"
              f"{semantic['all']:>11.1%}  {paired}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,resnet152")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quality", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            checkpoint = TINY if name == "tiny" else resnet152_checkpoint(tmp)
            folder = os.path.join(tmp, f"{name}-export")
            t = time.perf_counter()
            export_model(checkpoint, folder, int8=CALIBRATION, log=lambda *a: None)
            print(f"{name}: exported, int8 encoder calibrated, in {time.perf_counter() - t:.0f} s")
            runtimes = {"eager fp32": load_exported(folder, "torch"), "ONNX fp32": load_exported(folder, "onnx"),
                        "ONNX int8": load_exported(folder, "onnx-int8")}
            for batch in map(int, args.batches.split(",")):
                images = val_images(runtimes["eager fp32"][3], batch)
                timed = time_runtimes(runtimes, images, args.repeats if batch > 1 else 3 * args.repeats)
                base = timed["eager fp32"][1]
                for label, (encoding, seconds, words) in timed.items():
                    rows.append((name, label, batch, batch / seconds, seconds * 1000, encoding * 1000, words,
                                 base / seconds))
            if name == "tiny" and args.quality:
                quality(folder, checkpoint)
    print(f"\ncaptioning on {torch.get_num_threads()} threads, greedy, median of {args.repeats} batches "
          f"(3x as many at batch 1)")
    print(f"{'model':<11}{'runtime':<12}{'batch':>6}{'images/s':>10}{'ms/batch':>10}{'encoder ms':>11}"
          f"{'words':>7}{'vs eager':>10}")
    for name, label, batch, rate, ms, encoding, words, speedup in rows:
        print(f"{name:<11}{label:<12}{batch:>6}{rate:>10.1f}{ms:>10.1f}{encoding:>11.1f}{words:>7.1f}{speedup:>9.2f}x")


if __name__ == "__main__":
    main()
