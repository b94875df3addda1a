"""Out-of-range inputs of evaluation and inference are refused, named; too few images give n/a, not a
confident number (issue 37: --max-images 0/-1/-30, notebook parameters, one-image splits).

Nothing here needs a trained checkpoint: the checks run before any loading."""
import os

import nbformat
import numpy as np
import pytest
from conftest import ROOT

from captioning import diagnostics as dg
from captioning.evaluation import check_count, evaluate_checkpoint, format_table, score_captions


def test_check_count_refuses_zero_negatives_and_non_integers_naming_the_parameter():
    assert check_count("BEAM", 3) == 3 and check_count("N_IMAGES", np.int64(1)) == 1
    for bad in (0, -1, -30, 2.5, "3", None, True):
        with pytest.raises(ValueError, match=r"^BEAM must be a whole number >= 1, got "):
            check_count("BEAM", bad)


@pytest.mark.parametrize("flag,value", [("--max-images", "0"), ("--max-images", "-1"), ("--max-images", "-30"),
                                        ("--max-images", "x"), ("--beam", "0"), ("--batch-size", "0"),
                                        ("--resamples", "0")])
def test_evaluate_refuses_counts_below_one(flag, value, capsys):
    """--max-images 0 used to score every image, -1 all but one, -30 said "nothing to score"."""
    from captioning.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--checkpoint", "never-read.ckpt", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: " in err and (">= 1" in err), err


def test_caption_refuses_beam_zero(capsys):
    from captioning.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["caption", "some.jpg", "--checkpoint", "never-read.ckpt", "--beam", "0"])
    assert exit_.value.code == 2 and "argument --beam: must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,name", [({"max_images": 0}, "max_images"), ({"max_images": -1}, "max_images"),
                                         ({"beam_size": 0}, "beam_size"), ({"batch_size": 0}, "batch_size")])
def test_evaluate_checkpoint_refuses_counts_below_one_before_loading(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be a whole number >= 1"):
        evaluate_checkpoint(str(tmp_path / "missing.ckpt"), progress=False, **kwargs)


def _parameter_check_cell(notebook):
    """The source of the code cell right after the parameters cell (where the parameters are checked)."""
    nb = nbformat.read(os.path.join(ROOT, "notebooks", notebook), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    return code[0].source, code[1].source


@pytest.mark.parametrize("notebook,name", [("07_inference.ipynb", "N_IMAGES"), ("08_evaluate.ipynb", "BEAM")])
def test_notebooks_refuse_a_zero_parameter_right_after_the_parameters(notebook, name, tmp_path):
    """07 with N_IMAGES = 0 raised IndexError; 08 with BEAM = 0 decoded greedily under the label "beam 0"."""
    parameters, checked = _parameter_check_cell(notebook)
    assert f'check_count("{name}", {name})' in checked
    scope = {}
    exec(parameters, scope)
    scope.update({name: 0, "DATA_DIR": str(tmp_path / "none"), "CHECKPOINT": str(tmp_path / "none.ckpt")})
    with pytest.raises(ValueError, match=f"^{name} must be a whole number >= 1, got 0$"):
        exec(checked, scope)
    assert "config" not in scope                      # refused before any work


def test_one_image_has_no_cider_and_no_intervals(capsys):
    """On one image CIDEr's idf is 0 for every n-gram: CIDEr was 0.000 [0.000, 0.000] beside BLEU 1.0."""
    refs = {7: ["a red circle on white", "one red circle"]}
    said = []
    metrics, per_image = score_captions(refs, {7: "a red circle on white"}, use_java=False, log=said.append)
    assert metrics["CIDEr"] is None and per_image[7]["CIDEr"] is None and metrics["Bleu_1"] > 0.99
    assert any("CIDEr is n/a on 1 image" in line for line in said)
    table = format_table({"greedy": metrics})
    assert table.splitlines()[1].split()[-1] == "n/a" and "0.000" not in table
    intervals = dg.bootstrap_intervals([per_image[7]["bleu"]], [None])
    assert intervals == {"Bleu_4": None, "CIDEr": None}
    line = dg.format_intervals(metrics, intervals)
    assert "CIDEr n/a [n/a]" in line and "Bleu_4" in line and "[n/a]" in line and "0.000, 0.000" not in line
    assert "need at least 5 images" in line and "warning" in dg.too_few_images(1)


def test_cider_from_two_images_and_intervals_from_five():
    refs = {i: [f"a {c} circle", f"one {c} circle"] for i, c in enumerate(["red", "blue", "green", "pink", "navy"])}
    preds = {i: r[0] for i, r in refs.items()}
    two, _ = score_captions({i: refs[i] for i in (0, 1)}, {i: preds[i] for i in (0, 1)}, use_java=False,
                            log=lambda *a: None)
    assert two["CIDEr"] is not None and two["CIDEr"] > 0
    metrics, per_image = score_captions(refs, preds, use_java=False, log=lambda *a: None)
    ids = sorted(per_image)
    stats, cider = [per_image[i]["bleu"] for i in ids], [per_image[i]["CIDEr"] for i in ids]
    assert all(v is not None for v in dg.bootstrap_intervals(stats, cider).values())
    assert dg.bootstrap_intervals(stats[:4], cider[:4]) == {"Bleu_4": None, "CIDEr": None}
    assert dg.too_few_images(5) is None and "only 4 images" in dg.too_few_images(4)
