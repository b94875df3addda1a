import hashlib
import json
import os

import pytest
from PIL import Image
from pycocotools.coco import COCO

from captioning.tinyset import COLOURS, SHAPES, make_tinyset
from conftest import run_cli


def _digest(folder):
    h = hashlib.sha1()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def test_layout_and_format_load_with_pycocotools(tiny_data):
    for split, n in (("train", 60), ("val", 16)):
        raw = json.load(open(tiny_data / "annotations" / f"captions_{split}2014.json"))
        assert set(raw) >= {"info", "licenses", "images", "annotations"}
        coco = COCO(str(tiny_data / "annotations" / f"captions_{split}2014.json"))
        assert len(coco.imgs) == n
        for img in coco.imgs.values():
            assert set(img) >= {"id", "file_name", "width", "height"}
            assert img["file_name"].startswith(f"COCO_{split}2014_")
            with Image.open(tiny_data / f"{split}2014" / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) and im.format == "JPEG"
            assert len(coco.imgToAnns[img["id"]]) == 5
    train_ids = set(COCO(str(tiny_data / "annotations" / "captions_train2014.json")).imgs)
    val_ids = set(COCO(str(tiny_data / "annotations" / "captions_val2014.json")).imgs)
    assert not train_ids & val_ids


def test_captions_vary_like_human_ones(tiny_data):
    caps = [a["caption"] for a in json.load(open(tiny_data / "annotations" / "captions_train2014.json"))["annotations"]]
    assert any(c.endswith(".") for c in caps) and any(not c.endswith(".") for c in caps)
    assert any(c[0].isupper() for c in caps) and any(c[0].islower() for c in caps)
    text = " ".join(caps).lower()
    assert sum(c in text for c in COLOURS) >= 5 and all(s in text for s in SHAPES)
    assert "to the left of" in text or "to the right of" in text
    per_image = {}
    for a in json.load(open(tiny_data / "annotations" / "captions_train2014.json"))["annotations"]:
        per_image.setdefault(a["image_id"], set()).add(a["caption"].lower().rstrip("."))
    assert all(len(v) == 5 for v in per_image.values())  # five different phrasings per image
    sizes = {Image.open(p).size for p in (tiny_data / "train2014").iterdir()}
    assert len(sizes) > 1 and any(w != h for w, h in sizes)


def test_deterministic_per_seed(tmp_path):
    make_tinyset(str(tmp_path / "a"), train=8, val=3, seed=5)
    make_tinyset(str(tmp_path / "b"), train=8, val=3, seed=5)
    make_tinyset(str(tmp_path / "c"), train=8, val=3, seed=6)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_bad_sizes_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="at least one image"):
        make_tinyset(str(tmp_path / "x"), train=0, val=1)


def test_cli(tmp_path):
    run_cli("tinyset", "--out", tmp_path / "t", "--train", 4, "--val", 2, "--seed", 3)
    assert len(os.listdir(tmp_path / "t" / "train2014")) == 4
    assert len(os.listdir(tmp_path / "t" / "val2014")) == 2
