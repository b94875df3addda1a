import html
import json
import re
import shutil
import subprocess

import nbformat
import numpy as np
import pytest
import torch
from PIL import Image

from captioning.demo import kernel_options, notebooks, run_notebooks, write_html
from captioning.modelcard import read_card_info


def test_committed_notebooks_have_no_outputs():
    paths = notebooks()
    assert [p.split("/")[-1][:2] for p in paths] == [f"{i:02d}" for i in range(1, len(paths) + 1)]
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path} has outputs: strip them"
        assert "parameters" in code[0].metadata.get("tags", []), f"{path}: first code cell must be the parameters"


def test_notebook_cells_alternate_code_and_explanation():
    for path in notebooks():
        cells = nbformat.read(path, as_version=4).cells
        for cell, nxt in zip(cells, cells[1:] + [None]):
            if cell.cell_type == "code" and "parameters" not in cell.metadata.get("tags", []):
                assert nxt is not None and nxt.cell_type == "markdown", f"{path}: code cell without explanation"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The whole series, top to bottom, in a private data folder with small sizes (what `make demo` runs)."""
    root = tmp_path_factory.mktemp("demo")
    params = {"PRESET": "tiny", "DATA_DIR": str(root / "data" / "tiny"), "MODELS_DIR": str(root / "models"),
              "TINY_TRAIN": 48, "TINY_VAL": 8, "EPOCHS": 12, "MAX_STEPS": 12, "N_IMAGES": 4, "BATCH_SIZE": 4,
              "STANDIN_STEPS": 3, "CHAPTER_STEPS": 20, "EDITED_STEPS": 3}
    out = root / "executed"
    run_notebooks(str(out), params, log=lambda *a: None)
    return root, out


def test_every_notebook_runs_in_order_on_the_tiny_preset(executed):
    root, out = executed
    assert sorted(p.name for p in out.iterdir()) == [p.split("/")[-1] for p in notebooks(series="chapter")]
    for path in out.iterdir():                  # one parameters cell, showing the values it ran with
        cells = nbformat.read(path, as_version=4).cells
        assert not any("injected-parameters" in c.metadata.get("tags", []) for c in cells), path.name
    params_06 = next(c for c in nbformat.read(out / "06_training.ipynb", as_version=4).cells if c.cell_type == "code")
    assert "MAX_STEPS = 12" in params_06.source and "CHAPTER_STEPS = 20" in params_06.source
    report = json.load(open(root / "models" / "evaluation.json"))
    assert {"Bleu_4", "CIDEr", "ROUGE_L"} <= set(report["table"]["beam 3"])
    assert {"objects", "colours", "shapes", "relation"} <= set(report["semantic"]["beam 3"])
    assert len(report["samples"]) == 5 and all(s["caption"] for s in report["samples"])
    lo, hi = report["intervals"]["CIDEr"]
    assert lo <= report["table"]["beam 3"]["CIDEr"] <= hi and report["signature"]["beam"] == 3
    text_08 = _text(out / "08_evaluate.ipynb")
    assert "signature: pycocoevalcap" in text_08 and "B - A" in text_08
    card = read_card_info(str(root / "models" / "README.md"))     # 06 wrote the model card, 08 completed it
    assert card["training"]["step"] > 0 and card["evaluation"]["beam"] == 3
    assert card["evaluation"]["metrics"]["CIDEr"] == pytest.approx(report["table"]["beam 3"]["CIDEr"], abs=1e-4)
    assert "the model card beside the checkpoint now holds these scores" in text_08
    assert "caption collapse" in text_08                                 # the blind baseline's row warns
    executed_07 = nbformat.read(out / "07_inference.ipynb", as_version=4)
    assert len(_images(executed_07)) >= 3  # the captioned images are shown inline, and a saliency strip
    # the pretraining scenes and the random-vs-stand-in feature map
    assert len(_images(nbformat.read(out / "05_model.ipynb", as_version=4))) >= 2
    probes = re.findall(r"(random|stand-in) ResNet-18: a linear read of its features names every object of \d+% "
                        r"of the 8 val images", _text(out / "05_model.ipynb"))
    assert probes == ["random", "stand-in"]                    # the probe on the user's own images ran, both ways
    assert len(list((root / "pretrained").glob("standin-resnet18-64to56px-3steps-seed0-*.pth"))) == 1
    assert "stand-in backbone (3 steps), on 512 scenes it never saw" in _text(out / "05_model.ipynb")  # its report
    for path in out.iterdir():      # progress bars are saved at their last frame, not at 0%
        text = "".join(o.get("text", "") for c in nbformat.read(path, as_version=4).cells
                       if c.cell_type == "code" for o in c.outputs)
        assert "\r" not in text and " 0%|" not in text, path.name
        stderr = [o for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code" for o in c.outputs
                  if o.get("name") == "stderr"]
        assert not stderr, (path.name, stderr[:1])                # nothing pink in what a learner reads
        if path.name.startswith(("06", "08")):    # the library's COCO loads print nothing (01's own call does)
            assert "loading annotations into memory" not in text, path.name


def test_unknown_parameters_are_refused_before_any_work(tmp_path):
    """A misspelt parameter: make demo refuses it before the first notebook; papermill on one notebook
    stops at the cell after the parameters, naming it and the known ones."""
    import papermill as pm

    from captioning.demo import main, parameters_for

    with pytest.raises(ValueError, match="unknown notebook parameter HIDDEN_LAYR_SIZE: .*HIDDEN_LAYER_SIZE"):
        parameters_for({"HIDDEN_LAYR_SIZE": 64, "EPOCHS": 1})
    assert main(["--out", str(tmp_path / "out"), "-p", "EPOHCS", "1"]).startswith("error: unknown notebook")
    assert not (tmp_path / "out").exists()
    notebook = next(p for p in notebooks() if p.endswith("06_training.ipynb"))
    with pytest.raises(pm.PapermillExecutionError) as error:
        pm.execute_notebook(notebook, str(tmp_path / "06.ipynb"), kernel_name="python3", progress_bar=False,
                            parameters={"HIDDEN_LAYR_SIZE": 64, "MODELS_DIR": str(tmp_path / "m")},
                            **kernel_options())
    assert "unknown notebook parameter HIDDEN_LAYR_SIZE" in str(error.value.evalue)
    assert not (tmp_path / "m").exists()                                  # stopped before any work


def test_check_parameters_reads_what_papermill_injected():
    from captioning.config import check_parameters

    params = 'PRESET = "tiny"   # a comment\nEPOCHS = None\n'
    check_parameters({}, history=["", params, "x = 1"])                   # run by hand: nothing injected
    check_parameters({}, history=["", params, "# Parameters\nEPOCHS = 2\n"])
    with pytest.raises(ValueError, match="unknown notebook parameters EPOHCS, BEEM: this notebook's "
                                         "parameters are PRESET, EPOCHS"):
        check_parameters({}, history=["", params, '# Parameters\nEPOHCS = 2\nBEEM = 1\nPRESET = "coco"\n'])


def _text(path):
    """Everything a notebook's code cells printed or displayed as text or HTML."""
    nb = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") + "".join(o.get("data", {}).get(k, "") for k in ("text/plain", "text/html"))
                   for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_the_chapter_is_on_screen_and_runs(executed):
    """A reader with the book open finds its pieces by name, with their code, and the teaching cells run."""
    _, out = executed
    shown = {"02": ["class Vocab", "def build_vocabulary"], "03": ["def _resize_one"],
             "04": ["def __getitem__", "def collate_function"],
             "05": ["def forward(self, input_images)", "def forward(self, input_features, captions, lengths)",
                    "def sample"], "07": ["def occlusion_saliency"]}
    for prefix, names in shown.items():                   # as editable code, or as the library's source shown
        path = next(out.glob(f"{prefix}_*.ipynb"))
        text = _text(path) + "".join(c.source for c in nbformat.read(path, as_version=4).cells)
        assert all(name in text for name in names), (prefix, [n for n in names if n not in text])
    losses = [float(x) for x in re.findall(r"step \d+: loss ([\d.]+)", _text(out / "06_training.ipynb"))]
    assert len(losses) >= 3 and losses[-1] < losses[0]          # the chapter's loop learns
    variants = _text(out / "05_model.ipynb")
    assert all(name in variants for name in ("chapter LSTM", "2-layer LSTM", "GRU"))   # the decoder variants ran
    # the notebook's own LSTMModel, trained by train(decoder=...) and captioning four val images
    assert "saved" in variants and len(re.findall(r"COCO_val2014_\d+\.jpg: ", variants)) == 4
    steps = re.findall(r"step +\d+: ", _text(out / "07_inference.ipynb"))
    assert len(steps) >= 2 and "beam 3:" in _text(out / "07_inference.ipynb")          # greedy, step by step


def _images(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]


_PROBE = """<script>window.addEventListener("load", () => {
  const images = [...document.images];
  document.title = "PROBE" + JSON.stringify({images: images.length,
    broken: images.filter(i => !(i.naturalWidth > 0)).length,
    zero: document.body.innerText.includes(" 0%|"), links: document.links.length});
});</script>"""


def _probe(browser, page):
    """Load page in a headless browser with a script that reports what it rendered."""
    probe = page.with_name("probe-" + page.name)
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000"]
    dom = subprocess.run(args + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180).stdout
    found = re.search(r"<title>PROBE(.*?)</title>", dom, re.S)
    assert found, f"{page.name} did not load in {browser}"
    png = page.with_suffix(".png")
    subprocess.run(args + ["--window-size=1200,1600", f"--screenshot={png}", page.as_uri()], capture_output=True,
                   timeout=180)
    return json.loads(html.unescape(found.group(1))), Image.open(png).convert("RGB")


def test_demo_html_renders_in_a_browser(executed):
    root, out = executed
    index = write_html(str(out), json.load(open(root / "models" / "evaluation.json")))
    pages = sorted(p.name for p in out.glob("*.html"))
    chapter = [p.split("/")[-1].replace(".ipynb", ".html") for p in notebooks(series="chapter")]
    assert pages == sorted(["index.html"] + chapter)
    text = open(index, encoding="utf-8").read()
    assert "Bleu_4" in text and "objects" in text and text.count('<a href="0') == 8
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                   None)
    if browser is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium): the pages were written, "
                    "but not opened in a browser")
    facts, shot = _probe(browser, out / "index.html")
    assert facts["links"] == 8 and shot.getextrema() != ((255, 255),) * 3   # not a blank page
    facts, shot = _probe(browser, out / "07_inference.html")
    assert facts["images"] >= 2 and facts["broken"] == 0 and not facts["zero"]
    assert len(np.unique(np.asarray(shot.resize((60, 80))).reshape(-1, 3), axis=0)) > 20   # pictures, not text


# last in this file: it replaces the run the tests above look at
def test_training_notebook_runs_again_into_the_same_folder(executed):
    """Run All twice (make demo twice): the fresh run starts (OVERWRITE = True) instead of being
    refused, and the first run's checkpoints, log and report are moved aside, byte for byte."""
    import papermill as pm

    root, out = executed
    params = {"PRESET": "tiny", "DATA_DIR": str(root / "data" / "tiny"), "MODELS_DIR": str(root / "models"),
              "MAX_STEPS": 3, "STANDIN_STEPS": 3, "CHAPTER_STEPS": 1, "HIDDEN_LAYER_SIZE": 64}
    notebook = next(p for p in notebooks() if p.endswith("06_training.ipynb"))
    log = root / "models" / "train_log.jsonl"
    assert max(json.loads(line)["step"] for line in open(log)) == 12
    first = {n: (root / "models" / n).read_bytes() for n in ("last.ckpt", "best.ckpt", "train_log.jsonl",
                                                             "evaluation.json")}
    pm.execute_notebook(notebook, str(root / "again.ipynb"), parameters=params, kernel_name="python3",
                        progress_bar=False, **kernel_options())
    assert max(json.loads(line)["step"] for line in open(log)) == 3            # a new log, not appended
    assert not (root / "models" / "evaluation.json").exists()                # the old report is not this run's
    [aside] = [p for p in (root / "models").iterdir() if p.name.startswith("previous-")]
    assert {n: (aside / n).read_bytes() for n in first} == first              # nothing of the first run lost
    assert aside.name in _text(root / "again.ipynb")                          # and the reader is told where
    from captioning.checkpoint import load_checkpoint

    assert load_checkpoint(str(root / "models" / "last.ckpt"))["config"]["hidden_layer_size"] == 64  # as asked


def test_the_training_notebook_runs_on_its_own_into_any_models_dir(tiny_copy, tmp_path):
    """Without notebooks 02, 03 and 05 run first, and with a MODELS_DIR outside models_dir/: 06 builds
    the vocabulary, the resized images and the stand-in before its first use of them."""
    import papermill as pm

    notebook = next(p for p in notebooks() if p.endswith("06_training.ipynb"))
    models = tmp_path / "elsewhere" / "run"
    params = {"DATA_DIR": str(tiny_copy), "MODELS_DIR": str(models), "MAX_STEPS": 2, "STANDIN_STEPS": 2,
              "CHAPTER_STEPS": 1, "RESIZE_SIZE": 40, "CROP_SIZE": 32, "BATCH_SIZE": 16}
    pm.execute_notebook(notebook, str(tmp_path / "06.ipynb"), parameters=params, kernel_name="python3",
                        progress_bar=False, **kernel_options())
    assert (models / "last.ckpt").exists() and (tiny_copy / "vocabulary.pkl").exists()
    assert list((tmp_path / "elsewhere" / "pretrained").glob("standin-*-40to32px-2steps-*.pth"))
    # change a parameter, set RESUME = True, run again: the run's own sizes are kept, a new lr and lr_decay taken ...
    from captioning.checkpoint import load_checkpoint

    again = {"DATA_DIR": str(tiny_copy), "MODELS_DIR": str(models), "RESUME": True, "MAX_STEPS": 4,
             "LEARNING_RATE": 0.002, "LR_DECAY": 0.5, "CHAPTER_STEPS": 1}
    pm.execute_notebook(notebook, str(tmp_path / "06b.ipynb"), parameters=again, kernel_name="python3",
                        progress_bar=False, **kernel_options())
    ckpt = load_checkpoint(str(models / "last.ckpt"))
    assert ckpt["step"] == 4 and ckpt["config"]["crop_size"] == 32 and ckpt["config"]["lr"] == 0.002
    assert ckpt["config"]["lr_decay"] == 0.5
    # ... and one that would change the run stops before any work, naming it with both values
    with pytest.raises(pm.PapermillExecutionError, match="crop_size 32 -> 28"):
        pm.execute_notebook(notebook, str(tmp_path / "06c.ipynb"), parameters={**again, "CROP_SIZE": 28},
                            kernel_name="python3", progress_bar=False, **kernel_options())
    assert load_checkpoint(str(models / "last.ckpt"))["step"] == 4


def test_make_demo_runs_the_chapter_and_make_further_what_follows():
    chapter, further = notebooks(series="chapter"), notebooks(series="further")
    assert [p.split("/")[-1][:2] for p in chapter] == [f"{k:02d}" for k in range(1, 9)]
    assert further and all(int(p.split("/")[-1][:2]) >= 9 for p in further)
    assert sorted(chapter + further) == notebooks()


def test_the_further_notebooks_run_on_a_small_relations_world(tmp_path):
    """Notebooks 09 and 10 with reduced settings: 09 makes the world, trains both models, compares them, draws
    maps; 10 fine-tunes 09's attention model with self-critical training and compares it with where it began."""
    params = {"PRESET": "tiny", "DATA_DIR": str(tmp_path / "data" / "relations"),
              "POOLED_DIR": str(tmp_path / "models" / "pooled"), "ATTENTION_DIR": str(tmp_path / "models" / "att"),
              "TRAIN_IMAGES": 48, "VAL_IMAGES": 10, "EPOCHS": 2, "MAX_STEPS": 6, "STANDIN_STEPS": 3, "N_IMAGES": 2,
              "SCST_EPOCHS": 1}
    out = tmp_path / "executed"
    run_notebooks(str(out), params, log=lambda *a: None, series="further")
    text = _text(out / "09_attention.ipynb")
    assert "made the relations world" in text
    assert "grid from ResNet layer2 (7 x 7, each cell with its place), alpha_c 0.0" in text
    assert re.search(r"pooled \(chapter\) +BLEU-4", text) and re.search(r"attention +BLEU-4", text)
    assert "semantic accuracy (10 images" in text and "all " in text
    executed = nbformat.read(out / "09_attention.ipynb", as_version=4)
    assert len(_images(executed)) >= 2 + 2                     # the world, and a map strip per image at least
    for name in ("best.ckpt", "train_log.jsonl"):
        assert (tmp_path / "models" / "pooled" / name).exists() and (tmp_path / "models" / "att" / name).exists()
    assert torch.load(tmp_path / "models" / "att" / "best.ckpt", weights_only=True)["config"]["decoder"] == "attention"

    text = _text(out / "10_scst.ipynb")
    assert "teacher forcing: after the reference's own words" in text and "semantic accuracy (10 images" in text
    assert re.search(r"reward +baseline +advantage", text) and text.count("greedy: ") == 1
    assert re.search(r"CIDEr +[\d.]+ +[\d.]+ +[+-][\d.]+ +\[", text)          # the paired comparison, XE -> SCST
    assert "end mid-phrase" in text and "words used: XE" in text
    executed = nbformat.read(out / "10_scst.ipynb", as_version=4)
    assert len(_images(executed)) >= 2                          # the reward curve, captions before and after
    scst = torch.load(tmp_path / "models" / "att-scst" / "last.ckpt", weights_only=True)
    assert scst["config"]["objective"] == "scst" and scst["config"]["decoder"] == "attention"
    assert scst["step"] == 2 and scst["epoch"] == 1                  # 48 images in batches of 32, one epoch
    assert scst["init_from"]["path"] == str(tmp_path / "models" / "att" / "best.ckpt")
