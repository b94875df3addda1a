import os
import shutil

import pytest
from conftest import SMALL

from captioning.config import get_config
from captioning.modelcard import (
    MARKER,
    card_text,
    complete_card,
    evaluation_info,
    read_card_info,
    supersedes,
    training_info,
    write_card,
)

SECTIONS = ("## Model description", "## Intended use and limitations", "## Training data", "## Training procedure",
            "## Evaluation", "## How to use")
SHAPES_ONLY = "only knows coloured shapes"


def front_matter(text):
    """The YAML between the card's two '---' lines, parsed (with PyYAML where installed, else its top-level
    `key: value` lines and `- item` lists)."""
    assert text.startswith("---\n")
    block = text[4:text.index("\n---\n", 4)]
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        return yaml.safe_load(block)
    parsed, key = {}, None
    for line in block.splitlines():
        if line.startswith("- ") and key:
            parsed.setdefault(key, []).append(line[2:])
        elif not line.startswith(" ") and ":" in line:
            key, value = (part.strip() for part in line.split(":", 1))
            if value:
                parsed[key] = value
    return parsed


def tiny_training(**kw):
    config = get_config("tiny", data_dir="data_dir/tiny", models_dir="models_dir/tiny", **kw)
    return training_info(config, 43, step=322, epoch=14, device="cpu", wall_seconds=183.2, train_images=3000,
                         val_images=250)


class _Config:
    data_dir = "data_dir/tiny"


def fake_result(cider=1.5123, images=600, semantic=True):
    """What evaluate_checkpoint returns, as far as evaluation_info reads it."""
    result = {"config": _Config(), "predictions": dict.fromkeys(range(images), "a red circle"),
              "metrics": {"Bleu_1": 0.91, "Bleu_4": 0.6123, "ROUGE_L": 0.78, "CIDEr": cider},
              "intervals": {"Bleu_4": (0.6, 0.63), "CIDEr": (1.45, 1.57)},
              "signature": {"scorer": "pycocoevalcap 1.2", "tokenizer": "python", "refs": "5",
                            "split": f"val ({images} images)", "beam": 3, "length_penalty": 0.7, "scale": "0-1"},
              "skipped_metrics": {"METEOR": "Java not found"}, "semantic": None,
              "per_image": {i: {"CIDEr": 1.0} for i in range(images)}}
    if semantic:
        result["semantic"] = {"objects": 0.93, "colours": 0.95, "shapes": 0.96, "relation": 0.8, "all": 0.75,
                              "intervals": {"objects": (0.91, 0.95), "relation": (0.76, 0.84), "all": (0.71, 0.79)},
                              "counts": {"images": images}, "per_image": {i: {} for i in range(images)}}
    return result


def test_a_tiny_card_before_and_after_evaluation():
    info = {"training": tiny_training()}
    text = card_text(info)
    meta = front_matter(text)
    assert meta["pipeline_tag"] == "image-to-text" and meta["library_name"] == "pytorch"
    assert meta["license"] == "mit" and meta["datasets"] == ["tiny"]
    assert meta["tags"] == ["image-captioning", "show-and-tell"]
    assert {"bleu", "meteor", "rouge", "cider"} <= set(meta["metrics"]) and "model-index" not in meta
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert SHAPES_ONLY in text and "it will caption any photograph as shapes" in text
    assert "not evaluated yet" in text.lower() and "python -m captioning evaluate --checkpoint" in text
    assert "3,000 training images, 250 validation images" in text and "Vocabulary: 43 words" in text
    assert "ResNet-18" in text and "stand-in" in text and "LSTM decoder (hidden size 256)" in text
    assert "| lr | 0.005 |" in text and "14 of 14 epochs done, 322 steps, on cpu" in text and "3 min 3 s" in text
    assert "attention_size" not in text.split(MARKER)[0]         # the attention decoder's: not this run's
    assert 'load_captioner("best.ckpt")' in text and "python -m captioning caption IMAGE --checkpoint best.ckpt" in text
    assert read_card_info_of(text) == info                        # the card embeds what it was rendered from

    info["evaluation"] = evaluation_info(fake_result(), "models_dir/tiny/best.ckpt", "val", 3)
    text = card_text(info)
    meta = front_matter(text)
    assert "not evaluated yet" not in text.lower()
    assert "| CIDEr | 1.512 | [1.450, 1.570] |" in text and "| BLEU-4 | 0.612 | [0.600, 0.630] |" in text
    assert "signature: pycocoevalcap 1.2 | tok:python | refs:5 | split:val (600 images) | beam:3" in text
    assert "objects 93.0% [91.0, 95.0], relation 80.0% [76.0, 84.0], all 75.0% [71.0, 79.0]" in text
    assert "METEOR skipped: Java not found" in text
    [result] = meta["model-index"][0]["results"]
    assert result["task"]["type"] == "image-to-text" and result["dataset"]["split"] == "val"
    scores = {m["name"]: m for m in result["metrics"]}
    assert scores["CIDEr"]["value"] == pytest.approx(1.5123) and scores["CIDEr"]["type"] == "cider"
    assert scores["BLEU-4"]["args"] == {"beam": 3, "images": 600}
    assert "METEOR" not in scores                                  # skipped: no number is made up
    assert len(text.encode()) < 5500, len(text.encode())           # stays readable
    assert read_card_info_of(text) == info


def read_card_info_of(text, tmp=None):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "README.md")
        with open(path, "w") as f:
            f.write(text)
        return read_card_info(path)


def test_a_coco_card_speaks_of_photographs_and_an_scst_attention_card_of_its_start():
    config = get_config("coco", models_dir="models_dir/coco")
    text = card_text({"training": training_info(config, 9956, step=16000, epoch=5, device="NVIDIA H100",
                                                wall_seconds=7300, train_images=82783, val_images=1000)})
    meta = front_matter(text)
    assert meta["datasets"] == ["coco"] and meta["pipeline_tag"] == "image-to-text"
    assert SHAPES_ONLY not in text and "synthetic" not in text.split(MARKER)[0]
    assert "everyday scenes" in text and "biases" in text and "no safety filtering" in text
    assert "ImageNet (DEFAULT)" in text and "ResNet-152" in text and "on NVIDIA H100" in text and "2 h 01 min" in text

    config = get_config("tiny", decoder="attention", objective="scst", models_dir="models_dir/tiny-scst")
    info = training_info(config, 43, step=40, epoch=4, device="cpu", wall_seconds=12, train_images=None,
                         val_images=None, init_from={"path": "/home/someone/models_dir/tiny/best.ckpt", "step": 300,
                                                     "objective": "xe"})
    text = card_text({"training": info})
    meta = front_matter(text)
    assert meta["tags"] == ["image-captioning", "show-attend-and-tell", "self-critical"]
    assert "Show, Attend and Tell" in text and "ResNet layer 2" in text and "7 x 7 grid" in text
    assert "a fixed code of its place" in text
    assert "self-critical sequence training on CIDEr-D" in text and "`tiny/best.ckpt` (xe, step 300)" in text
    assert "unknown training images" in text and "/home/someone" not in text     # no machine's paths on a card


def test_complete_card_adds_the_evaluation_and_never_touches_a_readme_of_someone_else(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(), theirs.mkdir()
    evaluation = evaluation_info(fake_result(), "best.ckpt", "val", 3)
    assert complete_card(str(ours), evaluation) is None and not (ours / "README.md").exists()   # no card there
    path = write_card(str(ours), {"training": tiny_training()})
    before = open(path).read()
    training_part = before[before.index("## Model description"):before.index("## Evaluation")]
    assert complete_card(str(ours), evaluation) == path
    after = open(path).read()
    assert training_part in after and "| CIDEr | 1.512 | [1.450, 1.570] |" in after
    assert read_card_info(path)["evaluation"] == evaluation
    assert [f for f in os.listdir(ours)] == ["README.md"]              # atomic: no temporary file left
    # a README.md that is not a card of ours, or one whose embedded JSON is damaged, is left byte for byte
    for name, content in (("plain", b"# My model\n\nHand-written, with notes.\n"),
                          ("damaged", before.replace('"step":322', '"step":322,,').encode()),
                          ("lookalike", b"# x\n" + MARKER.encode() + b"[1, 2] -->\n")):
        (theirs / "README.md").write_bytes(content)
        assert read_card_info(str(theirs / "README.md")) is None, name
        assert complete_card(str(theirs), evaluation) is None, name
        assert (theirs / "README.md").read_bytes() == content, name


def test_the_embedded_json_survives_names_that_would_end_the_comment(tmp_path):
    info = {"training": tiny_training()}
    info["training"]["run"] = "odd --> <!-- name: with # and 'quotes'"
    path = write_card(str(tmp_path), info)
    text = open(path).read()
    assert text.count("-->") == text.count("<!--") == 2               # the note's and the marker's, no others
    assert read_card_info(path) == info
    assert front_matter(text)["pipeline_tag"] == "image-to-text"


def test_a_lesser_evaluation_does_not_replace_the_cards_numbers():
    full = evaluation_info(fake_result(), "best.ckpt", "val", 3)
    assert supersedes(full, None) and supersedes(full, full)
    assert supersedes(evaluation_info(fake_result(), "best.ckpt", "val", 5), full)      # another beam search
    assert not supersedes(evaluation_info(fake_result(), "best.ckpt", "val", 1), full)  # notebook 08's greedy
    assert not supersedes(evaluation_info(fake_result(images=4), "best.ckpt", "val", 3), full)   # --max-images
    assert not supersedes(evaluation_info(fake_result(images=900), "best.ckpt", "train", 3), full)
    assert supersedes(full, evaluation_info(fake_result(images=4), "best.ckpt", "val", 1))


def test_a_card_that_cannot_be_written_is_a_warning_for_training_and_evaluation(tmp_path, monkeypatch, capsys):
    import errno
    import time
    import types

    import torch

    from captioning import modelcard
    from captioning.evaluation import _complete_model_card
    from captioning.training import _write_model_card

    write_card(str(tmp_path), {"training": tiny_training()})
    before = (tmp_path / "README.md").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modelcard, "atomic_write", full)
    logged = []
    run = types.SimpleNamespace(config=get_config("tiny", models_dir=str(tmp_path)), vocab=[None] * 43, step=3,
                                epoch=0, epochs=14, device=torch.device("cpu"), init_from=None, train_ds=None,
                                val_loader=None, log=logged.append, path=lambda name: str(tmp_path / name))
    _write_model_card(run, time.time())
    assert len(logged) == 1 and logged[0].startswith("warning: the model card ") and "No space left" in logged[0]
    assert _complete_model_card(str(tmp_path / "best.ckpt"), fake_result(), "val", 3) is None
    assert "warning: the model card in" in capsys.readouterr().out
    assert (tmp_path / "README.md").read_bytes() == before
    # a README.md of someone else's in the run folder: training leaves it, and says so
    monkeypatch.undo()
    (tmp_path / "README.md").write_bytes(b"# notes on this run\n")
    with pytest.raises(FileExistsError, match="is not a model card written by captioning"):
        write_card(str(tmp_path), {"training": tiny_training()})
    _write_model_card(run, time.time())
    assert len(logged) == 2 and "is not a model card written by captioning" in logged[1]
    assert (tmp_path / "README.md").read_bytes() == b"# notes on this run\n"


def test_training_writes_the_card_and_evaluating_best_ckpt_completes_it(tiny_copy, tmp_path, monkeypatch):
    from captioning import java
    from captioning.evaluation import evaluate_checkpoint
    from captioning.training import train

    monkeypatch.setattr(java, "java_available", lambda: False)   # Python's tokenizer: no JVM start per evaluation

    models = tmp_path / "m"
    summary = train(get_config("tiny", data_dir=str(tiny_copy), models_dir=str(models),
                               **{**SMALL, "weights": None, "epochs": 1, "cache_views": 2}))
    card = models / "README.md"
    text = card.read_text()
    info = read_card_info(str(card))
    assert info["training"]["step"] == summary["step"] and info["training"]["device"] == "cpu"
    assert info["training"]["train_images"] == 60 and info["training"]["val_images"] == 4   # val_max_captions=20
    assert info["training"]["synthetic"] and "evaluation" not in info
    assert SHAPES_ONLY in text and "not evaluated yet" in text.lower() and "random initialisation" in text
    assert "60 training images, 4 validation images" in text and "## Training procedure" in text

    # early.ckpt and last.ckpt never change the card's numbers
    r = evaluate_checkpoint(summary["last"], beam_size=1, progress=False)
    assert r["model_card"] is None and card.read_text() == text
    r = evaluate_checkpoint(summary["best"], beam_size=2, progress=False)
    assert r["model_card"] == str(card)
    done = card.read_text()
    assert text[text.index("## Model description"):text.index("## Evaluation")] in done
    cider, span = r["metrics"]["CIDEr"], r["intervals"]["CIDEr"]
    assert f"| CIDEr | {cider:.3f} | [{span[0]:.3f}, {span[1]:.3f}] |" in done
    assert "not evaluated yet" not in done.lower() and "objects " in done      # the tiny set's semantic accuracy
    meta = front_matter(done)
    scores = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert scores["CIDEr"] == pytest.approx(cider, abs=1e-4)
    r = evaluate_checkpoint(summary["last"], beam_size=3, progress=False)      # would supersede, were it best.ckpt
    assert r["model_card"] is None and card.read_text() == done
    # a copy named best.ckpt in a folder without a card writes none
    other = tmp_path / "copy"
    other.mkdir()
    shutil.copy(summary["best"], other / "best.ckpt")
    assert evaluate_checkpoint(str(other / "best.ckpt"), beam_size=1, progress=False)["model_card"] is None
    assert not (other / "README.md").exists()
