"""A COCO-scale rehearsal: every stage of the pipeline on a COCO-shaped synthetic set (captioning.cocoshape)
at a fraction F of COCO 2014's size, each stage timed, its memory and its disk measured.

    python benchmarks/coco_scale.py --scale 0.01 [--json A.json] [--workdir DIR] [--keep] [--seed 0]
    python benchmarks/coco_scale.py --compare A.json B.json      # growth between two scales, and F=1 extrapolated

Stages, each in its own child process (the CLI, or a few lines of Python where the CLI has no command):

    generate      python -m captioning.cocoshape --out DATA --scale F
    vocabulary    python -m captioning vocab --captions DATA/annotations/captions_train2014.json --threshold 4
    resize        python -m captioning resize ... --size 72   (train2014, then val2014: two processes)
    features      training's own setup (captioning.training.setup_run): BatchNorm statistics of the random
                  backbone, the datasets, and the feature cache (K=2 views of every train image, the val
                  images validation reads). The CLI has no command that only extracts (train builds the
                  cache itself, `features` lists and prunes), so this calls what train calls, and stops
                  before the first step. train_epoch then finds the cache built.
    train_epoch   python -m captioning train --preset coco ... --epochs 1   (one epoch of train2014, TensorBoard on)
    caption_test  python -m captioning caption TEST_IMAGES --checkpoint best.ckpt --beam 3 --json
                  (the Karpathy test images, full size, as a user captions photos)
    evaluate      python -m captioning evaluate --checkpoint best.ckpt --beam 3 --out ...
                  (captions the test images again, from resized_images/; Java metrics, bootstrap
                  intervals and caption diagnostics)
    prune         python -m captioning features --preset coco --data-dir DATA --prune --keep 0
                  (--keep 0: nothing uses the caches any more, so the stage deletes them all)

--gpu runs the coco preset's own sizes (256-px resize, 224-px crops) and ResNet-152, random weights,
on CUDA (benchmarks/gpu_check.sh). Otherwise the coco preset's code paths with the overrides a 2-core
CPU needs: --resize-size 72 --crop-size 64, --backbone resnet18 --weights none (random, frozen; its
BatchNorm statistics estimated from the images), the preset's vocab_threshold 4, batch 128, feature
cache of K=2 views, --device cpu.

Measured per stage: wall seconds; peak RSS, the largest resident set of any process of the stage
(the stage's process, or a worker or Java process it waited for: os.wait4's rusage, which is the
maximum over the child and its reaped descendants; concurrent workers are not added up), and apart
(a wrapper in the stage's process reads getrusage): the stage's main process ("main") and its largest
helper (a DataLoader or pool worker, a Java scorer: "helper"); disk, the
size of the files under the work folder that the stage created or changed (logs excluded), and what
it freed; and the machine's 1-minute load average as the stage ended (over the CPU count: another
process was competing for the cores, and the seconds are inflated). A stage that fails stops the run,
naming the stage and showing the end of its stderr; the work folder is then kept.

--compare A.json B.json prints each stage's growth from A's scale to B's: the time, memory and disk
ratios against the data ratio, flagging a time (or memory) ratio over 1.5 x the data ratio; then each
stage extrapolated to F=1 on the straight line through the two points (a fixed cost plus a cost per
image), flagging a peak RSS over 8 GB.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("generate", "vocabulary", "resize", "features", "train_epoch", "caption_test", "evaluate", "prune")
# stages whose work grows with the data: clearly worse than linear is flagged (prune deletes a few files)
LINEAR = STAGES[:-1]
WORSE_THAN_LINEAR = 1.5
MEMORY_LIMIT_MB = 8 * 1024
RESIZE, CROP = 72, 64
CONFIG = {"resize_size": RESIZE, "crop_size": CROP, "backbone": "resnet18", "weights": "none", "epochs": 1,
          "device": "cpu", "tensorboard": "true"}
# --gpu: the coco preset's own sizes and backbone (random weights: a GPU box may have no internet, and
# they time the same as ImageNet's) on CUDA; the CPU stages (generate, vocabulary, resize) are the same code
GPU_CONFIG = {**CONFIG, "resize_size": 256, "crop_size": 224, "backbone": "resnet152", "device": "cuda"}

# the features stage: what train() does before its first step, for the coco preset with these overrides
FEATURES = """
import json, sys
from captioning.config import get_config
from captioning.device import pick_device
from captioning.training import setup_run
config = get_config("coco", **json.loads(sys.argv[1]))
run = setup_run(config, False, 0, 1, pick_device(config.device), True, print)
print(f"feature cache ready: {len(run.train_ds)} training items")
"""


# Each Python stage runs under this wrapper, in the same process: it runs the command (`-m module args` or
# `-c code args`) as python would, then writes its own peak RSS and that of its largest waited-for child
# (a DataLoader or pool worker, a Java scorer) to the file named first: the stage's own process and its
# helpers apart, where os.wait4 gives only the largest of them.
WRAPPER = """
import json, resource, runpy, sys
report, how, what, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
def write():
    with open(report, "w") as f:
        json.dump({"self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, f)
try:
    if how == "-m":
        sys.argv = [what] + args
        runpy.run_module(what, run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c"] + args
        exec(compile(what, "<stage>", "exec"), {"__name__": "__main__"})
finally:
    write()
"""


def wrapped(cmd, report):
    """`python -m X args` / `python -c CODE args` -> the same under WRAPPER, which writes `report`."""
    assert cmd[0] == sys.executable and cmd[1] in ("-m", "-c"), cmd
    return [sys.executable, "-c", WRAPPER, report] + cmd[1:]


def snapshot(folder, skip):
    """{path: (size, mtime_ns)} of the files under `folder`, leaving out the folder `skip`."""
    files = {}
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    if e.path != skip:
                        stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    files[e.path] = (st.st_size, st.st_mtime_ns)
    return files


def disk_change(before, after):
    """(MB of files created or changed, MB of files removed or shrunk)."""
    written = sum(size for path, (size, mtime) in after.items() if before.get(path) != (size, mtime))
    freed = sum(size for path, (size, _) in before.items() if path not in after)
    return written / 2**20, freed / 2**20


def tail(path, lines=25):
    """The last lines of a log, each progress bar's last frame only (tqdm rewrites its line with \\r)."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    shown = [line.split("\r")[-1] for line in text.splitlines() if line.split("\r")[-1].strip()]
    return "\n".join(shown[-lines:])


def run_stage(name, commands, work, logs, env):
    """Run the stage's commands one after another; returns {"seconds", "peak_rss_mb", "disk_mb", "freed_mb"}.

    A command that fails ends the benchmark with the stage's name and the end of its stderr."""
    before = snapshot(work, logs)
    seconds, peak_kb, main_kb, helpers_kb = 0.0, 0, 0, 0
    for k, (cmd, stdout_path) in enumerate(commands):
        err_path = os.path.join(logs, f"{name}{'-' + str(k + 1) if len(commands) > 1 else ''}.err")
        out_path = stdout_path or err_path[:-4] + ".out"
        report = err_path[:-4] + ".rss.json"
        with open(out_path, "w") as out, open(err_path, "w") as err:
            start = time.monotonic()
            proc = subprocess.Popen(wrapped(cmd, report), stdout=out, stderr=err, cwd=ROOT, env=env)
            _, status, usage = os.wait4(proc.pid, 0)      # the child's rusage: max RSS over it and its descendants
            seconds += time.monotonic() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        peak_kb = max(peak_kb, usage.ru_maxrss)          # KiB on Linux
        try:
            with open(report) as f:
                split = json.load(f)
            main_kb, helpers_kb = max(main_kb, split["self_kb"]), max(helpers_kb, split["children_kb"])
        except (OSError, ValueError, KeyError):
            pass
        if code != 0:
            shown = " ".join(cmd if len(" ".join(cmd)) < 600 else cmd[:6] + ["..."])
            sys.exit(f"stage {name} failed (exit {code}): {shown}\n--- end of its stderr ({err_path}) ---\n"
                     f"{tail(err_path)}\n--- the work folder is kept: {work}")
    written, freed = disk_change(before, snapshot(work, logs))
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_kb / 1024, 1),
            "main_rss_mb": round(main_kb / 1024, 1), "helper_rss_mb": round(helpers_kb / 1024, 1),
            "disk_mb": round(written, 1), "freed_mb": round(freed, 1), "load": round(os.getloadavg()[0], 2)}


def stage_commands(work, scale, seed):
    """{stage: [(argv, stdout file or None)]}."""
    py = sys.executable
    data, models = os.path.join(work, "data"), os.path.join(work, "models")
    cli = [py, "-m", "captioning"]
    overrides = [f"--{k.replace('_', '-')}={v}" for k, v in CONFIG.items()]
    train_json = os.path.join(data, "annotations", "captions_train2014.json")
    checkpoint = os.path.join(models, "best.ckpt")
    features_config = json.dumps({**CONFIG, "weights": None, "tensorboard": False, "data_dir": data,
                                  "models_dir": os.path.join(work, "features-run")})
    return {
        "generate": [([py, "-m", "captioning.cocoshape", "--out", data, "--scale", str(scale), "--seed", str(seed)],
                      None)],
        "vocabulary": [(cli + ["vocab", "--captions", train_json, "--out", os.path.join(data, "vocabulary.pkl"),
                               "--threshold", "4"], None)],
        "resize": [(cli + ["resize", "--src", os.path.join(data, f"{s}2014"),
                           "--dst", os.path.join(data, "resized_images", f"{s}2014"),
                           "--size", str(CONFIG["resize_size"])], None)
                   for s in ("train", "val")],
        "features": [([py, "-c", FEATURES, features_config], None)],
        "train_epoch": [(cli + ["train", "--preset", "coco", "--data-dir", data, "--models-dir", models] + overrides,
                         None)],
        "caption_test": [(cli + ["caption", os.path.join(work, "test-images"), "--checkpoint", checkpoint,
                                 "--beam", "3", "--json", "--device", CONFIG["device"]],
                          os.path.join(work, "captions_test.json"))],
        "evaluate": [(cli + ["evaluate", "--checkpoint", checkpoint, "--beam", "3", "--device", CONFIG["device"],
                             "--out", os.path.join(work, "evaluation.json")], None)],
        "prune": [(cli + ["features", "--preset", "coco", "--data-dir", data, "--prune", "--keep", "0"], None)],
    }


def link_test_images(work):
    """work/test-images/: links to the Karpathy test images (val2014, full size), what caption_test captions."""
    data = os.path.join(work, "data")
    with open(os.path.join(data, "dataset_coco.json")) as f:
        images = json.load(f)["images"]
    folder = os.path.join(work, "test-images")
    os.makedirs(folder)
    for im in images:
        if im["split"] == "test":
            os.symlink(os.path.join(data, im["filepath"], im["filename"]), os.path.join(folder, im["filename"]))


def run_notes(work):
    """What the run did, beside its figures: training steps, vocabulary, the captions decoded (their mean length
    says how much work decoding and scoring did: a model that stops at once makes both cheap)."""
    notes = {}
    try:
        with open(os.path.join(work, "models", "train_log.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        notes["train_steps"] = max(r["step"] for r in rows)
        notes["train_seconds_logged"] = max(r.get("elapsed_s", 0) for r in rows)
        with open(os.path.join(work, "evaluation.json")) as f:
            evaluation = json.load(f)
        notes["test_images"] = evaluation["images"]
        notes["caption_words"] = round(evaluation["diagnostics"]["mean_length"], 1)
        notes["reference_words"] = round(evaluation["diagnostics"]["reference_mean_length"], 1)
        notes["CIDEr"] = evaluation["metrics"].get("CIDEr")
        notes["METEOR"] = evaluation["metrics"].get("METEOR")
    except (OSError, ValueError, KeyError) as e:
        notes["error"] = f"{type(e).__name__}: {e}"
    return notes


def format_table(scale, stages):
    lines = [f"scale {scale:g}", f"{'stage':<14}{'seconds':>10}{'peak RSS MB':>13}{'(main':>8}{'helper)':>9}"
                                 f"{'disk MB':>10}{'freed MB':>10}{'load':>7}"]
    for name, r in stages.items():
        lines.append(f"{name:<14}{r['seconds']:>10.1f}{r['peak_rss_mb']:>13.0f}{r.get('main_rss_mb', 0):>8.0f}"
                     f"{r.get('helper_rss_mb', 0):>9.0f}{r['disk_mb']:>10.1f}{r.get('freed_mb', 0):>10.1f}"
                     f"{r.get('load', float('nan')):>7.1f}")
    total = sum(r["seconds"] for r in stages.values())
    lines.append(f"{'total':<14}{total:>10.1f}{max(r['peak_rss_mb'] for r in stages.values()):>13.0f}"
                 f"{sum(r['disk_mb'] for r in stages.values()):>10.1f}")
    return "\n".join(lines)


def bench(args):
    from captioning.cocoshape import scaled_counts

    counts = scaled_counts(args.scale)          # a bad scale fails here, before any work
    made = args.workdir is None or not os.path.exists(args.workdir)
    work = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix=f"coco_scale-{args.scale:g}-")
    os.makedirs(work, exist_ok=True)
    if os.listdir(work):
        sys.exit(f"error: --workdir {work} is not empty: give a new or empty folder")
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    env = {**os.environ, "CAPTIONING_TEXT_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    commands = stage_commands(work, args.scale, args.seed)
    print(f"scale {args.scale:g}: {counts['train']} train + {counts['val']} val images, "
          f"{counts['karpathy_test']} test; work folder {work}", flush=True)
    stages = {}
    for name in STAGES:
        if name == "caption_test":
            link_test_images(work)
        stages[name] = run_stage(name, commands[name], work, logs, env)
        r = stages[name]
        print(f"  {name:<13} {r['seconds']:8.1f} s  {r['peak_rss_mb']:7.0f} MB peak  {r['disk_mb']:8.1f} MB written",
              flush=True)
    print(format_table(args.scale, stages))
    notes = run_notes(work)
    print("  ".join(f"{k}: {v}" for k, v in notes.items()))
    if args.json:
        record = {"scale": args.scale, "stages": stages, "counts": counts, "cpus": os.cpu_count(),
                  "config": CONFIG, "notes": notes, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")
    if args.keep:
        print(f"kept {work}")
    elif made:
        shutil.rmtree(work)
    else:                                       # a folder the user gave: only what this run put there
        for entry in os.listdir(work):
            path = os.path.join(work, entry)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def extrapolate(xa, ya, xb, yb, x=1.0):
    """y at x on the straight line through (xa, ya) and (xb, yb)."""
    return yb + (x - xb) * (yb - ya) / (xb - xa)


def compare(path_a, path_b):
    records = []
    for path in (path_a, path_b):
        with open(path) as f:
            records.append(json.load(f))
    a, b = sorted(records, key=lambda r: r["scale"])
    if a["scale"] == b["scale"]:
        sys.exit("error: the two files are of the same scale: compare two scales")
    data = b["scale"] / a["scale"]
    for r in (a, b):
        busy = [n for n, st in r["stages"].items() if st.get("load", 0) > 1.25 * (r.get("cpus") or 1)]
        if busy:
            print(f"warning: at scale {r['scale']:g} the machine was busy (1-minute load over the CPU count) during "
                  f"{', '.join(busy)}: those seconds are inflated")
    print(f"scale {a['scale']:g} -> {b['scale']:g}: data x{data:.2f}; flagged (!) where a ratio passes "
          f"{WORSE_THAN_LINEAR} x the data ratio ({WORSE_THAN_LINEAR * data:.1f})")
    print(f"{'stage':<14}{'time A s':>10}{'time B s':>10}{'time x':>8}{'RSS A MB':>10}{'RSS B MB':>10}{'RSS x':>7}"
          f"{'disk x':>8}")
    flagged = []
    for name in STAGES:
        ra, rb = a["stages"].get(name), b["stages"].get(name)
        if not ra or not rb:
            continue
        t = rb["seconds"] / max(ra["seconds"], 1e-9)
        m = rb["peak_rss_mb"] / max(ra["peak_rss_mb"], 1e-9)
        d = rb["disk_mb"] / ra["disk_mb"] if ra["disk_mb"] > 0.05 else float("nan")
        marks = ""
        if name in LINEAR and t > WORSE_THAN_LINEAR * data:
            marks += " ! time worse than linear"
            flagged.append(name)
        if name in LINEAR and m > WORSE_THAN_LINEAR * data:
            marks += " ! memory worse than linear"
            flagged.append(name)
        print(f"{name:<14}{ra['seconds']:>10.1f}{rb['seconds']:>10.1f}{t:>8.2f}{ra['peak_rss_mb']:>10.0f}"
              f"{rb['peak_rss_mb']:>10.0f}{m:>7.2f}{d:>8.2f}{marks}")
    print(f"\nat F=1, on the straight line through the two points (fixed cost + cost per image); "
          f"'x F' is scale {b['scale']:g}'s figure / {b['scale']:g}")
    print(f"{'stage':<14}{'seconds':>10}{'(x F)':>10}{'peak RSS MB':>13}{'disk MB':>10}")
    total = total_proportional = disk = 0.0
    for name in STAGES:
        ra, rb = a["stages"].get(name), b["stages"].get(name)
        if not ra or not rb:
            continue
        seconds = max(0.0, extrapolate(a["scale"], ra["seconds"], b["scale"], rb["seconds"]))
        rss = max(0.0, extrapolate(a["scale"], ra["peak_rss_mb"], b["scale"], rb["peak_rss_mb"]))
        written = max(0.0, extrapolate(a["scale"], ra["disk_mb"], b["scale"], rb["disk_mb"]))
        total, total_proportional, disk = total + seconds, total_proportional + rb["seconds"] / b["scale"], \
            disk + written
        mark = "  ! over 8 GB" if rss > MEMORY_LIMIT_MB else ""
        print(f"{name:<14}{seconds:>10.0f}{rb['seconds'] / b['scale']:>10.0f}{rss:>13.0f}{written:>10.0f}{mark}")
    print(f"{'total':<14}{total:>10.0f}{total_proportional:>10.0f}{'':>13}{disk:>10.0f}   "
          f"= {total / 3600:.1f} h ({total_proportional / 3600:.1f} h proportional)")
    if flagged:
        print(f"\nworse than linear: {', '.join(sorted(set(flagged)))}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, help="fraction of COCO 2014 (1 = 82,783 + 40,504 images)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--workdir", help="where to write (a new or empty folder; default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"))
    parser.add_argument("--gpu", action="store_true",
                        help="the coco preset's sizes (256/224 px) and ResNet-152 (random weights) on CUDA")
    args = parser.parse_args()
    if args.gpu:
        CONFIG.update(GPU_CONFIG)
    if args.compare:
        compare(*args.compare)
    elif args.scale is None:
        parser.error("give --scale F (or --compare A.json B.json)")
    else:
        bench(args)


if __name__ == "__main__":
    main()
