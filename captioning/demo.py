"""`make demo`: run notebooks 01..08 in order with papermill on the tiny preset, then print results.

Executed copies (with outputs) go to runs/notebooks/, with an HTML page of each and an
index.html to open in a browser; notebooks/ itself is never modified. `make further` runs the
notebooks that go beyond the chapter (09 onwards) the same way, into runs/further/.

    python -m captioning.demo [--further] [--out runs/notebooks] [-p NAME VALUE ...]
"""
import argparse
import glob
import html
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import nbformat
import papermill as pm
from nbconvert import HTMLExporter
from nbformat import NotebookNode
from traitlets.config import Config

from .config import assigned_names
from .diagnostics import format_diagnostics, format_intervals, format_signature
from .evaluation import format_table
from .progress import TEXT_PROGRESS
from .semantics import format_semantic_table

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


SERIES = {"chapter": range(1, 9), "further": range(9, 100)}   # 01..08: the chapter; 09 on: beyond it


def notebooks(folder: str = NOTEBOOK_DIR, series: str | None = None) -> list[str]:
    """The numbered notebooks, in order (01_..., 02_..., ...): all, or one of SERIES."""
    found = sorted(glob.glob(os.path.join(folder, "[0-9][0-9]_*.ipynb")))
    if series is None:
        return found
    return [p for p in found if int(os.path.basename(p)[:2]) in SERIES[series]]


def kernel_options() -> dict[str, Any]:
    """papermill keyword arguments for the kernels it starts: on Linux and macOS they talk over
    Unix sockets (IPC) instead of TCP ports on localhost, which nothing else can listen in on
    and which ipykernel does not warn about on every start. The sockets go in a private temporary
    folder (jupyter_client's default, `kernel-ipc-*` in the current folder, litters the project)."""
    if os.name != "posix":
        return {}
    return {"config": Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(_ipc_folder(), "kernel")}})}


_ipc: list[str] = []


def _ipc_folder() -> str:
    """This process's folder for kernel sockets (0700, in the system's temp folder), made once."""
    if not _ipc or not os.path.isdir(_ipc[0]):
        _ipc[:] = [tempfile.mkdtemp(prefix="captioning-kernels-")]
    return _ipc[0]


def _last_frames(text: str) -> str:
    """Terminal semantics for saved stream text: of each line, only what follows its last carriage return."""
    lines = []
    for line in text.split("\n"):
        frames = [f for f in line.split("\r") if f]
        lines.append(frames[-1] if frames else "")
    return "\n".join(lines)


# a tqdm frame: "description:  42%|####...", or, with no total, "description: 17img [00:01, ...]"
_BAR = re.compile(r"^(?:(.*?): *)? *(?:\d+%\||\d+(?:\.\d+)?[a-zA-Z/]* \[\d+:\d\d)")


def _bar_name(line: str) -> str | None:
    """The progress bar a line is a frame of (its description), or None for any other line."""
    match = _BAR.match(line)
    return None if match is None else (match.group(1) or "")


def _merge_streams(outputs: list[NotebookNode]) -> list[NotebookNode]:
    """Consecutive stream outputs of the same name joined into one."""
    merged: list[NotebookNode] = []
    for output in outputs:
        if output.output_type == "stream" and merged and merged[-1].output_type == "stream" \
                and merged[-1].name == output.name:
            merged[-1].text += output.text
        else:
            merged.append(output)
    return merged


def _bars_to_stdout(output: NotebookNode) -> list[NotebookNode]:
    """A stderr stream output split into runs of lines: a progress bar's frames become stdout (a
    finished bar is not an error, and a reader should not see it in the error colour), anything
    else (a warning) stays stderr. Blank lines between frames are dropped."""
    runs: list[tuple[str, list[str]]] = []
    for line in output.text.split("\n"):
        if not line.strip():
            continue
        name = "stdout" if _bar_name(line) is not None else "stderr"
        if runs and runs[-1][0] == name:
            runs[-1][1].append(line)
        else:
            runs.append((name, [line]))
    return [nbformat.v4.new_output("stream", name=name, text="\n".join(lines) + "\n") for name, lines in runs]


def tidy_streams(nb: NotebookNode) -> NotebookNode:
    """Merge each cell's consecutive stream outputs and keep each progress bar's final frame only,
    as stdout: the executed notebooks carry no stderr output but real warnings.

    A bar interrupted by printed lines (an epoch's validation loss) leaves a frame before each
    of them; only its last frame is kept, where it finished.
    """
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = _merge_streams(cell.outputs)
        last: dict[str | None, tuple[int, int]] = {}    # bar description -> (output, line) of its last frame
        for k, output in enumerate(merged):
            if output.output_type == "stream":
                output.text = _last_frames(output.text)
                for n, line in enumerate(output.text.split("\n")):
                    if _bar_name(line) is not None:
                        last[_bar_name(line)] = (k, n)
        for k, output in enumerate(merged):
            if output.output_type == "stream":
                lines = output.text.split("\n")
                output.text = "\n".join(line for n, line in enumerate(lines)
                                        if _bar_name(line) is None or last[_bar_name(line)] == (k, n))
        split: list[NotebookNode] = []
        for output in merged:
            is_stderr = output.output_type == "stream" and output.name == "stderr"
            split += _bars_to_stdout(output) if is_stderr else [output]
        for output in split:                             # a bar's last frame may end without its newline
            if output.output_type == "stream" and output.text.strip() and not output.text.endswith("\n"):
                output.text += "\n"
        cell.outputs = [o for o in _merge_streams(split) if o.output_type != "stream" or o.text.strip()]
    return nb


def declared_parameters(path: str) -> list[str]:
    """The names a notebook's parameters cell (its first code cell, tagged `parameters`) assigns."""
    cell = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    return assigned_names(cell.source)


def parameters_for(parameters: Mapping[str, Any], series: str | None = "chapter") -> dict[str, dict[str, Any]]:
    """{notebook path: the parameters it declares}, for the notebooks of `series`; a name that none of
    them declares is a ValueError naming it, raised before any notebook runs."""
    declared = {path: declared_parameters(path) for path in notebooks(series=series)}
    known = {name for names in declared.values() for name in names}
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise ValueError(f"unknown notebook parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
                         f"the notebooks' parameters are {', '.join(sorted(known))}")
    return {path: {k: v for k, v in parameters.items() if k in names} for path, names in declared.items()}


def merge_injected_parameters(nb: NotebookNode) -> NotebookNode:
    """Show one parameters cell in an executed copy: papermill's injected values written into the
    notebook's own parameters cell (each line keeps its comment), and the injected cell dropped."""
    injected = next((c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])), None)
    params = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
    if injected is None or params is None:
        return nb
    values: dict[str, str] = {}
    for line in injected.source.splitlines():
        name, sep, value = line.partition(" = ")
        if sep and name in assigned_names(line):
            values[name] = value
    lines = []
    for line in params.source.splitlines():
        match = re.match(r"^([A-Z_][A-Z0-9_]*) *= *(.*?)(\s+#.*)?$", line)
        if match and match.group(1) in values:
            code, comment = f"{match.group(1)} = {values[match.group(1)]}", (match.group(3) or "").strip()
            column = len(line) - len(comment)                 # the comment stays where it was
            line = code + (" " * max(2, column - len(code)) + comment if comment else "")
        lines.append(line)
    params.source = "\n".join(lines)
    nb.cells = [c for c in nb.cells if c is not injected]
    return nb


def run_notebooks(out_dir: str, parameters: Mapping[str, Any] | None = None, cwd: str | None = None,
                  log: Callable[[str], object] = print, series: str = "chapter") -> None:
    """Execute the notebooks of `series` in order (SERIES: "chapter", 01..08, `make demo`; "further", 09 on,
    `make further`); stops at the first failure (papermill raises, naming the cell).

    Each notebook gets the parameters it declares (a name none declares is refused first). The
    kernels get text progress bars (captioning.progress), tidied to their final frame.
    """
    given = parameters_for(parameters or {}, series)
    os.makedirs(out_dir, exist_ok=True)
    cwd = cwd or os.path.dirname(NOTEBOOK_DIR)
    before = os.environ.get(TEXT_PROGRESS)
    os.environ[TEXT_PROGRESS] = "1"                      # inherited by the kernels papermill starts
    try:
        for path in notebooks(series=series):
            out = os.path.join(out_dir, os.path.basename(path))
            t = time.time()
            log(f"running {os.path.basename(path)} ...")
            try:
                pm.execute_notebook(path, out, parameters=given[path], cwd=cwd, kernel_name="python3",
                                    progress_bar=False, log_output=False, **kernel_options())
            finally:                                     # a failed notebook is saved too: tidy it as well
                if os.path.exists(out):
                    executed = tidy_streams(nbformat.read(out, as_version=4))
                    nbformat.write(merge_injected_parameters(executed), out)
            log(f"  done in {time.time() - t:.0f}s -> {out}")
    finally:
        if before is None:
            os.environ.pop(TEXT_PROGRESS, None)
        else:
            os.environ[TEXT_PROGRESS] = before


def report_text(report: Mapping[str, Any]) -> str:
    """The demo's closing summary (sample captions, metrics, semantic accuracy) from evaluation.json."""
    lines = ["sample captions (tiny val split, beam 3):"]
    lines += [f"  {os.path.basename(s['image'])}: {s['caption']}" for s in report["samples"]]
    lines += ["", format_table(report["table"])]
    if report.get("intervals"):
        beam = next(iter(report["table"].values()))
        lines += [format_intervals(beam, report["intervals"]), format_signature(report["signature"]),
                  format_diagnostics(report["diagnostics"])]
    if report.get("semantic"):
        lines += ["", "semantic accuracy (captions parsed against what the generator drew):",
                  format_semantic_table(report["semantic"])]
    return "\n".join(lines)


def write_html(out_dir: str, report: Mapping[str, Any] | None = None) -> str:
    """Render every executed notebook in out_dir to HTML beside it, and an index.html that links
    them under the demo's summary: the results read in any browser, with no Jupyter running.
    Images are embedded in the pages. Returns the index's path."""
    exporter = HTMLExporter()
    items = []
    for path in notebooks(out_dir):
        nb = nbformat.read(path, as_version=4)
        body, _ = exporter.from_notebook_node(nb)
        target = path[: -len(".ipynb")] + ".html"
        with open(target, "w", encoding="utf-8") as f:
            f.write(body)
        heading = next((line.lstrip("# ").strip() for c in nb.cells if c.cell_type == "markdown"
                        for line in c.source.splitlines() if line.startswith("# ")), os.path.basename(path))
        items.append(f'<li><a href="{os.path.basename(target)}">{html.escape(heading)}</a></li>')
    summary = f"<pre>{html.escape(report_text(report))}</pre>" if report else "<p>No evaluation report yet.</p>"
    index = os.path.join(out_dir, "index.html")
    with open(index, "w", encoding="utf-8") as f:
        f.write(f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Image captioning: the executed notebooks</title>
<style>body {{font-family: sans-serif; max-width: 60em; margin: 2em auto; line-height: 1.5}}
pre {{background: #f6f8fa; padding: 1em; overflow-x: auto}}</style></head>
<body><h1>Image captioning with a CNN and an LSTM: the executed notebooks</h1>
{summary}
<ul>
{chr(10).join(items)}
</ul></body></html>
""")
    return index


def main(argv: Sequence[str] | None = None) -> str | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--further", action="store_true",
                        help="run the notebooks beyond the chapter (09 on) instead of 01..08")
    parser.add_argument("--out", help="where the executed copies go (runs/notebooks, or runs/further)")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="notebook parameter (JSON value), e.g. -p EPOCHS 1")
    args = parser.parse_args(argv)
    params: dict[str, Any] = {"PRESET": "tiny"}
    for name, value in args.p:
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    series = "further" if args.further else "chapter"
    out = args.out or ("runs/further" if args.further else "runs/notebooks")
    try:
        parameters_for(params, series)                   # a misspelt -p NAME: refused before any notebook runs
    except ValueError as e:
        return f"error: {e}"
    t = time.time()
    run_notebooks(out, params, series=series)
    if args.further:
        index = write_html(out)
        print(f"\nmake further finished in {time.time() - t:.0f}s; executed notebooks are in {out}/, "
              f"and {index} shows them in a browser")
        return None
    report_path = os.path.join(os.path.dirname(NOTEBOOK_DIR), "models_dir", "tiny", "evaluation.json")
    report = None
    if os.path.exists(report_path):
        with open(report_path) as f:
            report = json.load(f)
        print("\n" + report_text(report))
    index = write_html(out, report)
    print(f"\nmake demo finished in {time.time() - t:.0f}s; executed notebooks are in {out}/, "
          f"and {index} shows them in a browser")
    return None


if __name__ == "__main__":
    sys.exit(main())
