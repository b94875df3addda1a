"""`make demo`: run notebooks 01..08 in order with papermill on the tiny preset, then print results.

Executed copies (with outputs) go to runs/notebooks/; notebooks/ itself is never modified.

    python -m captioning.demo [--out runs/notebooks] [-p NAME VALUE ...]
"""
import argparse
import glob
import json
import os
import sys
import time

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def notebooks(folder=NOTEBOOK_DIR):
    """The numbered notebooks, in order (01_..., 02_..., ...)."""
    return sorted(glob.glob(os.path.join(folder, "[0-9][0-9]_*.ipynb")))


def run_notebooks(out_dir, parameters=None, cwd=None, log=print):
    """Execute every notebook in order; stops at the first failure (papermill raises, naming the cell)."""
    import papermill as pm

    os.makedirs(out_dir, exist_ok=True)
    cwd = cwd or os.path.dirname(NOTEBOOK_DIR)
    for path in notebooks():
        out = os.path.join(out_dir, os.path.basename(path))
        t = time.time()
        log(f"running {os.path.basename(path)} ...")
        pm.execute_notebook(path, out, parameters=parameters or {}, cwd=cwd, kernel_name="python3",
                            progress_bar=False, log_output=False)
        log(f"  done in {time.time() - t:.0f}s -> {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/notebooks")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="notebook parameter (JSON value), e.g. -p EPOCHS 1")
    args = parser.parse_args(argv)
    params = {"PRESET": "tiny"}
    for name, value in args.p:
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    t = time.time()
    run_notebooks(args.out, params)
    report = os.path.join(os.path.dirname(NOTEBOOK_DIR), "models_dir", "tiny", "evaluation.json")
    if os.path.exists(report):
        from .evaluation import format_table

        with open(report) as f:
            r = json.load(f)
        print("\nsample captions (tiny val split, beam 3):")
        for s in r["samples"]:
            print(f"  {os.path.basename(s['image'])}: {s['caption']}")
        print("\n" + format_table(r["table"]))
    print(f"\nmake demo finished in {time.time() - t:.0f}s; executed notebooks are in {args.out}/")


if __name__ == "__main__":
    sys.exit(main())
