"""Does a word's map point at the object it names? Attention maps against occlusion, on both decoders.

    python benchmarks/attention_pointing.py [--attention CKPT] [--pooled CKPT] [--images N]

Three ways to a map per word, judged by one rule (captioning.saliency.pointing_game) on the same
val images: the attention model's own attention (the weights of the decode that produced its
caption), occlusion of that same model, and occlusion of the chapter's pooled model. For each
object a caption names rightly (a colour word and a shape word that fit exactly one true object,
first mention), the peak of the two words' maps summed must fall inside the object's box, which
the generator recorded. Each model is judged on its own greedy captions, so "objects judged"
can differ between the models; the two rows of the attention model judge the same objects.

The defaults are the relations world's two models (three objects per image); any pair of
checkpoints trained on a set with boxes will do. The three take turns image by image, so that a
busy machine slows them alike; the time is explain_image's per image, captioning included.
"""
import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from captioning.checkpoint import load_captioner
from captioning.saliency import explain_image, pointing_game

Row = tuple[str, Callable[[str], tuple[list[str], Any]]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attention", default="models_dir/relations-attention/best.ckpt")
    parser.add_argument("--pooled", default="models_dir/relations-pooled/best.ckpt")
    parser.add_argument("--images", type=int, default=100, help="the first N val images")
    return parser.parse_args()


def load(path: str, what: str) -> tuple[Any, ...]:
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: train the {what} model first, or pass its checkpoint")
    return load_captioner(path, "cpu")


def explainer(model: tuple[Any, ...], method: str) -> Callable[[str], tuple[list[str], Any]]:
    """path -> (words, maps) of one model and method, greedy."""
    encoder, decoder, vocab, config = model

    def explain(path: str) -> tuple[list[str], Any]:
        _, words, maps, _ = explain_image(path, encoder, decoder, vocab, config, method=method)
        return words, maps
    return explain


def run(rows: list[Row], images: list[dict[str, Any]], meta: dict[str, Any], folder: str,
        sizes: tuple[int, int]) -> tuple[dict[str, list[bool]], dict[str, list[float]]]:
    """Each row on each image, in turns: ({row: hits}, {row: seconds per image})."""
    hits: dict[str, list[bool]] = {name: [] for name, _ in rows}
    seconds: dict[str, list[float]] = {name: [] for name, _ in rows}
    for im in images:
        for name, explain in rows:
            start = time.perf_counter()
            words, maps = explain(os.path.join(folder, im["file_name"]))
            seconds[name].append(time.perf_counter() - start)
            judged = pointing_game(words, maps, im["objects"], meta["colours"], meta["shapes"],
                                   (im["width"], im["height"]), *sizes)
            hits[name] += [hit for _, hit in judged]
    return hits, seconds


def table(rows: list[Row], hits: dict[str, list[bool]], seconds: dict[str, list[float]]) -> str:
    reference = statistics.median(seconds[rows[0][0]])
    lines = ["| maps | hits | objects judged | s per image (median) | time vs attention maps |",
             "|---|---:|---:|---:|---:|"]
    for name, _ in rows:
        judged, median = hits[name], statistics.median(seconds[name])
        share = f"{sum(judged) / len(judged):.0%}" if judged else "n/a"
        lines.append(f"| {name} | {share} | {len(judged)} | {median:.3f} | {median / reference:.1f}x |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    attention, pooled = load(args.attention, "attention"), load(args.pooled, "pooled")
    config = attention[3]
    if (config.resize_size, config.crop_size) != (pooled[3].resize_size, pooled[3].crop_size):
        raise SystemExit("the two checkpoints see images at different sizes: the boxes would not match both")
    data = config.data_dir
    meta = json.load(open(os.path.join(data, "annotations", "captions_val2014.json")))
    images = [im for im in meta["images"] if im.get("objects")][:args.images]
    rows: list[Row] = [("attention model: its attention", explainer(attention, "attention")),
                       ("attention model: occlusion", explainer(attention, "occlusion")),
                       ("pooled model: occlusion", explainer(pooled, "occlusion"))]
    hits, seconds = run(rows, images, meta, os.path.join(data, "val2014"), (config.resize_size, config.crop_size))
    print(f"\n{len(images)} val images of {data}; attention: {args.attention}, pooled: {args.pooled}\n")
    print(table(rows, hits, seconds))
    if os.path.abspath(pooled[3].data_dir) != os.path.abspath(data):
        print(f"\nnote: the pooled model was trained on {pooled[3].data_dir}, judged here on {data}")


if __name__ == "__main__":
    main()
