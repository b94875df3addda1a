"""Saliency maps that point at the right object: occlusion vs Grad-CAM, side by side on one model.

    python benchmarks/saliency_pointing.py [--checkpoint models_dir/tiny/best.ckpt] [--images 40]

The pointing game on the tiny set's two-object val images whose objects differ in colour: for
the first mention of each colour word in the model's greedy caption, is the word's map denser
inside the box of the object of that colour than inside the other object's box? The generator
recorded the boxes. Run `make demo` first for the checkpoint. Also prints the seconds per image.
"""
import argparse
import json
import os
import statistics
import time

from captioning.checkpoint import load_captioner
from captioning.config import get_config
from captioning.saliency import METHODS, explain_image, points_at_objects


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default="models_dir/tiny/best.ckpt")
    parser.add_argument("--images", type=int, default=40)
    args = parser.parse_args()
    if not os.path.exists(args.checkpoint):
        raise SystemExit(f"{args.checkpoint} not found: run `make demo` first, or pass --checkpoint")
    encoder, decoder, vocab, config = load_captioner(args.checkpoint, "cpu")
    data = get_config("tiny").data_dir if not os.path.isdir(config.data_dir) else config.data_dir
    meta = json.load(open(os.path.join(data, "annotations", "captions_val2014.json")))
    pairs = [im for im in meta["images"] if len(im["objects"]) == 2
             and im["objects"][0]["colour"] != im["objects"][1]["colour"]][:args.images]
    judged = {m: [] for m in METHODS}
    seconds = {m: [] for m in METHODS}
    for im in pairs:
        for method in METHODS:                                      # the two take turns, image by image
            t = time.perf_counter()
            _, words, maps, note = explain_image(os.path.join(data, "val2014", im["file_name"]), encoder, decoder,
                                                 vocab, config, method=method)
            seconds[method].append(time.perf_counter() - t)
            judged[method] += points_at_objects(words, maps, im["objects"], (im["width"], im["height"]),
                                                config.resize_size, config.crop_size)
    print(f"\n{len(pairs)} two-object tiny val images, {args.checkpoint}; colour words' first mentions\n")
    print("| method | points at its object | words judged | s per image (median) |")
    print("|---|---:|---:|---:|")
    for method in METHODS:
        hits = sum(ok for _, ok in judged[method])
        print(f"| {method} | {hits / len(judged[method]):.0%} | {len(judged[method])} | "
              f"{statistics.median(seconds[method]):.2f} |")
    ratio = statistics.median(seconds["occlusion"]) / statistics.median(seconds["gradcam"])
    print(f"\nocclusion takes {ratio:.1f}x Grad-CAM's time per image")


if __name__ == "__main__":
    main()
