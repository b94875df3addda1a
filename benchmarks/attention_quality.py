"""Pooled (the chapter's) against attention, same preset, same budget: semantic accuracy with intervals.

Trains the tiny preset's captioner with each decoder on each set, side by side, and scores every
held-out caption against what the generator drew (captioning.semantics), with 95% bootstrap
intervals over images:

- "relations": the relations world of notebook 09 (3000 train / 250 val; three shapes, two relations
  per caption), where a pooled vector loses where each shape is;
- "own shapes": other colours, shapes and background on landscape and portrait images, one or two
  objects (benchmarks/standin_quality.py's set, 1500 train / 200 val): a user's own data, where
  attention must not do worse than the pooled model.

    python benchmarks/attention_quality.py [--sets relations "own shapes"] [--out runs/attention_quality]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from standin_quality import OWN  # noqa: E402  (the same set, not a copy)

from captioning.config import get_config  # noqa: E402
from captioning.evaluation import evaluate_checkpoint  # noqa: E402
from captioning.relworld import make_relations_world  # noqa: E402
from captioning.tinyset import make_tinyset  # noqa: E402
from captioning.training import train  # noqa: E402

SETS = {"relations": (make_relations_world, dict(train=3000, val=250, seed=0)),
        "own shapes": (make_tinyset, OWN)}
DECODERS = ("lstm", "attention")


def run(data_dir, models_dir, decoder):
    config = get_config("tiny", data_dir=data_dir, models_dir=models_dir, decoder=decoder, progress=False)
    t = time.time()
    summary = train(config, overwrite="delete")          # a rerun replaces its own previous run
    seconds = time.time() - t
    result = evaluate_checkpoint(summary["best"], beam_size=3, progress=False, data_dir=data_dir)
    return result, seconds


def cell(semantic, key):
    value, interval = semantic[key], semantic["intervals"].get(key)
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/attention_quality")
    parser.add_argument("--sets", nargs="+", choices=sorted(SETS), default=list(SETS))
    args = parser.parse_args()
    rows = []
    for name in args.sets:
        make, options = SETS[name]
        data_dir = os.path.join(args.out, "data", name.replace(" ", "-"))
        if not os.path.exists(os.path.join(data_dir, "annotations", "captions_val2014.json")):
            make(data_dir, **options)
        for decoder in DECODERS:
            print(f"== {name}: {decoder}", flush=True)
            result, seconds = run(data_dir, os.path.join(args.out, "models", f"{name.replace(' ', '-')}-{decoder}"),
                                  decoder)
            rows.append((name, decoder, result, seconds))
    print("\n| set | decoder | objects | relation | all | BLEU-4 | CIDEr | training s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, decoder, result, seconds in rows:
        s, m = result["semantic"], result["metrics"]
        print(f"| {name} | {decoder} | {cell(s, 'objects')} | {cell(s, 'relation')} | {cell(s, 'all')} | "
              f"{m['Bleu_4']:.3f} | {m['CIDEr']:.3f} | {seconds:.0f} |")
    for name in args.sets:
        pooled, attention = (next(r for r in rows if r[:2] == (name, d)) for d in DECODERS)
        print(f"{name}: attention trains in {attention[3] / pooled[3]:.2f}x the pooled model's time; "
              f"'all' {100 * pooled[2]['semantic']['all']:.1f}% -> {100 * attention[2]['semantic']['all']:.1f}%")


if __name__ == "__main__":
    main()
