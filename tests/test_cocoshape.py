"""The COCO-shaped synthetic set (captioning.cocoshape): COCO 2014's counts, sizes, modes and caption
statistics at a fraction of its size, in a layout the project's own readers accept."""
import json
import os
from collections import Counter

import numpy as np
import pytest
from conftest import tree_digest
from PIL import Image

from captioning import cocoshape
from captioning.cocoshape import content_words, scaled_counts, word_list, words_used, write_coco_shaped
from captioning.config import get_config
from captioning.data import CocoCaptionDataset, eval_transform
from captioning.karpathy import karpathy_folder, karpathy_test_images
from captioning.vocabulary import SPECIAL_TOKENS, build_vocabulary, count_tokens, tokenize

SCALE = 0.0005           # 41 train + 20 val images


@pytest.fixture(scope="module")
def coco_shaped(tmp_path_factory):
    out = tmp_path_factory.mktemp("cocoshape") / "data"
    summary = write_coco_shaped(out, SCALE, seed=0, progress=False, workers=2)
    return out, summary


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_counts_scale_with_coco_2014():
    assert scaled_counts(1) == {"train": 82_783, "val": 40_504, "karpathy_val": 5_000, "karpathy_test": 5_000}
    assert scaled_counts(0.04) == {"train": 3311, "val": 1620, "karpathy_val": 200, "karpathy_test": 200}
    tiny = scaled_counts(1e-6)                  # at least a handful of each
    assert tiny["train"] == tiny["val"] == cocoshape.MIN_IMAGES and 1 <= tiny["karpathy_test"] <= tiny["val"] // 3
    for bad in (0, -1, float("nan"), "1", True):
        with pytest.raises(ValueError, match="scale"):
            scaled_counts(bad)


def test_layout_counts_sizes_and_modes(coco_shaped):
    out, summary = coco_shaped
    counts = scaled_counts(SCALE)
    assert (summary["train"], summary["val"]) == (counts["train"], counts["val"]) == (41, 20)
    modes = Counter()
    for split in ("train", "val"):
        coco = _load(out / "annotations" / f"captions_{split}2014.json")
        assert len(coco["images"]) == counts[split]
        assert sorted(os.listdir(out / f"{split}2014")) == sorted(im["file_name"] for im in coco["images"])
        for im in coco["images"]:
            assert im["file_name"] == f"COCO_{split}2014_{im['id']:012d}.jpg"
            with Image.open(out / f"{split}2014" / im["file_name"]) as picture:
                assert picture.format == "JPEG" and picture.size == (im["width"], im["height"])
                assert picture.size in ((640, 480), (480, 640))
                modes[picture.mode, picture.size] += 1
    assert set(m for m, _ in modes) <= {"RGB", "L"} and modes["RGB", (640, 480)] > modes["RGB", (480, 640)] > 0
    train_ids = {im["id"] for im in _load(out / "annotations" / "captions_train2014.json")["images"]}
    val_ids = {im["id"] for im in _load(out / "annotations" / "captions_val2014.json")["images"]}
    assert not train_ids & val_ids                # COCO's ids: one space, no image in both splits
    # the written set's greyscale images are the ones the plan chose
    plan = cocoshape._plan(counts, 0)
    assert sum(n for (mode, _), n in modes.items() if mode == "L") == sum(plan["train"]["grey"] + plan["val"]["grey"])


def test_the_mix_of_shapes_modes_and_caption_counts_is_cocos():
    """At a larger scale (planned only, no pixels drawn): ~10% portrait, ~1.5% greyscale, ~1% with 6 or 7
    captions, caption lengths 8..20 words with most of them 9..13."""
    plan = cocoshape._plan(scaled_counts(0.05), seed=3)
    portrait = np.mean(plan["train"]["portrait"] + plan["val"]["portrait"])
    grey = np.mean(plan["train"]["grey"] + plan["val"]["grey"])
    per_image = np.asarray(plan["train"]["per_image"] + plan["val"]["per_image"])
    lengths = np.concatenate([plan["train"]["lengths"], plan["val"]["lengths"]])
    assert 0.08 < portrait < 0.12 and 0.008 < grey < 0.025
    assert set(per_image.tolist()) == {5, 6, 7} and 0.005 < np.mean(per_image > 5) < 0.02
    assert lengths.min() == 8 and lengths.max() == 20 and 12.5 < lengths.mean() < 14


def test_captions_per_image_and_lengths_and_the_tokenizer(coco_shaped):
    out, summary = coco_shaped
    for split in ("train", "val"):
        coco = _load(out / "annotations" / f"captions_{split}2014.json")
        per_image = Counter(a["image_id"] for a in coco["annotations"])
        assert set(per_image) == {im["id"] for im in coco["images"]}
        assert all(5 <= n <= 7 for n in per_image.values())
        assert len(coco["annotations"]) == summary["captions"][split]
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
        for a in coco["annotations"]:
            words = tokenize(a["caption"])
            assert 8 <= len(words) <= 20, a["caption"]
            assert a["caption"].rstrip(".").lower().split() == words     # no word split or dropped


def test_karpathy_split(coco_shaped):
    out, _ = coco_shaped
    counts = scaled_counts(SCALE)
    karpathy = _load(out / "dataset_coco.json")
    assert karpathy["dataset"] == "coco"
    splits = Counter(im["split"] for im in karpathy["images"])
    assert splits == {"train": 41, "restval": 20 - 2 * counts["karpathy_test"], "val": counts["karpathy_val"],
                      "test": counts["karpathy_test"]}
    coco = {s: _load(out / "annotations" / f"captions_{s}2014.json") for s in ("train", "val")}
    captions = {a["image_id"]: [] for s in coco for a in coco[s]["annotations"]}
    for s in coco:
        for a in coco[s]["annotations"]:
            captions[a["image_id"]].append(a["caption"])
    sentids = set()
    for k, im in enumerate(karpathy["images"]):
        assert im["imgid"] == k and im["filepath"] == ("train2014" if im["split"] == "train" else "val2014")
        assert (out / im["filepath"] / im["filename"]).is_file()
        assert [s["raw"] for s in im["sentences"]] == captions[im["cocoid"]]
        assert all(s["tokens"] == tokenize(s["raw"]) and s["imgid"] == k for s in im["sentences"])
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        sentids.update(im["sentids"])
    assert len(sentids) == sum(len(c) for c in captions.values())
    # beside COCO's own annotations, the Karpathy file only chooses the test images (no conversion)
    assert karpathy_folder(out) is None
    assert karpathy_test_images(out) == {im["filename"] for im in karpathy["images"] if im["split"] == "test"}


def test_the_projects_vocabulary_and_dataset_accept_it(coco_shaped):
    out, summary = coco_shaped
    train_json = str(out / "annotations" / "captions_train2014.json")
    counter, lengths = count_tokens(train_json, progress=False)
    assert min(counter.values()) >= cocoshape.MIN_COUNT          # every word used, at least 4 times
    vocab = build_vocabulary(train_json, threshold=cocoshape.MIN_COUNT, progress=False)
    assert len(vocab) == summary["vocabulary"] + len(SPECIAL_TOKENS)
    assert set(vocab.words()[len(SPECIAL_TOKENS):]) == set(word_list(summary["words"]))
    ds = CocoCaptionDataset(str(out / "train2014"), train_json, vocab, eval_transform(72, 64), progress=False)
    assert len(ds) == summary["captions"]["train"] and len(ds.image_ids) == 41
    image, caption = ds[0]
    assert image.shape == (3, 64, 64) and caption[0] == vocab("<start>") and vocab("<unk>") not in caption.tolist()
    from captioning.evaluation import heldout_split  # evaluate scores the Karpathy test images

    folder, coco, ids = heldout_split(get_config("coco", data_dir=str(out)))
    assert folder.endswith("val2014") and {coco.imgs[i]["file_name"] for i in ids} == karpathy_test_images(out)


def test_the_vocabulary_is_the_same_at_every_scale_from_one_percent():
    """Every one of the 10,000 words at least 4 times in the train captions from scale 0.01 on; fewer
    content words below (the rule in the module's docstring), each still at least 4 times."""
    for scale in (0.01, 0.04):
        plan = cocoshape._plan(scaled_counts(scale), seed=0)
        assert plan["vocabulary"] == cocoshape.VOCABULARY
        assert np.bincount(plan["train"]["tokens"], minlength=plan["vocabulary"]).min() >= cocoshape.MIN_COUNT
    small = cocoshape._plan(scaled_counts(0.002), seed=0)
    content = int(np.sum(small["train"]["classes"] == cocoshape.CLASSES.index("content")))
    assert small["used"]["content"] == words_used(content, 10**6) < len(content_words())
    assert small["used"]["article"] == len(cocoshape.ARTICLES) and small["vocabulary"] < cocoshape.VOCABULARY
    assert np.bincount(small["train"]["tokens"]).min() >= cocoshape.MIN_COUNT
    # a Zipf-like distribution: "a" far ahead of the median word; function words between them
    counts = np.bincount(cocoshape._plan(scaled_counts(0.04), seed=0)["train"]["tokens"])
    assert counts[0] == counts.max() > 0.06 * counts.sum() and counts[0] > 100 * np.median(counts)
    words = word_list({"article": 6, "function": 20, "content": cocoshape.VOCABULARY - 26})
    assert len(set(words)) == len(words) == cocoshape.VOCABULARY and all(tokenize(w) == [w] for w in words)


def test_deterministic_whatever_the_workers(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    write_coco_shaped(one, SCALE, seed=0, progress=False, workers=1)
    write_coco_shaped(two, SCALE, seed=0, progress=False, workers=2)
    assert tree_digest(one) == tree_digest(two)
    other = write_coco_shaped(tmp_path / "other", SCALE, seed=1, progress=False)
    assert tree_digest(tmp_path / "other") != tree_digest(one) and other["vocabulary"] > 0


def test_refuses_a_folder_in_use_and_moves_it_aside_when_asked(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    with pytest.raises(FileExistsError, match=str(out)):
        write_coco_shaped(out, SCALE, progress=False, log=lambda *a: None)
    assert os.listdir(out) == ["mine.txt"]
    said = []
    write_coco_shaped(out, SCALE, progress=False, overwrite=True, log=said.append)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("data-previous-")]
    assert len(aside) == 1 and (aside[0] / "mine.txt").read_text() == "a user's file" and str(aside[0]) in said[0]
    assert (out / "dataset_coco.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    write_coco_shaped(empty, SCALE, progress=False)             # an empty folder is fine
    assert (empty / "annotations" / "captions_val2014.json").is_file()


def test_an_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cocoshape, "_write_karpathy", fail)
    with pytest.raises(KeyboardInterrupt):
        write_coco_shaped(tmp_path / "data", SCALE, progress=False)
    assert os.listdir(tmp_path) == []
