import json

import nbformat

from captioning.demo import notebooks, run_notebooks


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
                assert len(cell.source.splitlines()) <= 12, f"{path}: cell too long:\n{cell.source}"


def test_every_notebook_runs_in_order_on_the_tiny_preset(tmp_path):
    """The whole series, top to bottom, in a private data folder with small sizes (what `make demo` runs)."""
    params = {"PRESET": "tiny", "DATA_DIR": str(tmp_path / "data" / "tiny"), "MODELS_DIR": str(tmp_path / "models"),
              "TINY_TRAIN": 48, "TINY_VAL": 8, "EPOCHS": 12, "MAX_STEPS": 12, "N_IMAGES": 4, "BATCH_SIZE": 4,
              "STANDIN_STEPS": 3}
    out = tmp_path / "executed"
    run_notebooks(str(out), params, log=lambda *a: None)
    assert sorted(p.name for p in out.iterdir()) == [p.split("/")[-1] for p in notebooks()]
    report = json.load(open(tmp_path / "models" / "evaluation.json"))
    assert {"Bleu_4", "CIDEr", "ROUGE_L"} <= set(report["table"]["beam 3"])
    assert len(report["samples"]) == 5 and all(s["caption"] for s in report["samples"])
    executed = nbformat.read(out / "07_inference.ipynb", as_version=4)
    images = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the captioned images are shown inline
    executed = nbformat.read(out / "05_model.ipynb", as_version=4)
    images = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the pretraining scenes and the random-vs-stand-in feature map
    assert (tmp_path / "pretrained" / "standin-resnet18-64to56px-3steps-seed0.pth").exists()
    for path in out.iterdir():      # progress bars are saved at their last frame, not at 0%
        text = "".join(o.get("text", "") for c in nbformat.read(path, as_version=4).cells
                       if c.cell_type == "code" for o in c.outputs)
        assert "\r" not in text and " 0%|" not in text, path.name
