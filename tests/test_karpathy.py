"""Karpathy-format folders (Flickr8k/30k, COCO's Karpathy split), made from the tiny set."""
import json
import os
import random
import shutil

import papermill as pm
import pytest
from conftest import ROOT, SMALL

from captioning.__main__ import main
from captioning.config import get_config
from captioning.data import TrainTransform, get_loader
from captioning.evaluation import evaluate_checkpoint, heldout_split
from captioning.karpathy import ensure_coco_layout, karpathy_folder, karpathy_test_images
from captioning.training import train
from captioning.vocabulary import load_coco, load_vocabulary


def karpathy_from_tiny(tiny_data, out, layout="flickr"):
    """The tiny set (COCO layout) rewritten in Karpathy's format.

    flickr: every image in Images/, dataset_flickr8k.json with train/val/test, in a shuffled order.
    coco:   the images stay in train2014/ and val2014/ (`filepath`), dataset_coco.json with `cocoid`,
            and val2014 split into restval/val/test as Karpathy's COCO split is.
    Returns (folder, {split: [file names]}).
    """
    images, splits = [], {"train": [], "restval": [], "val": [], "test": []}
    for coco_split in ("train", "val"):
        coco = load_coco(str(tiny_data / "annotations" / f"captions_{coco_split}2014.json"))
        ids = sorted(coco.imgs)
        for k, i in enumerate(ids):
            if coco_split == "train":
                split = "train"
            elif layout == "coco" and k < 4:
                split = "restval"
            else:
                split = "val" if k < (len(ids) + (4 if layout == "coco" else 0)) // 2 else "test"
            name = coco.imgs[i]["file_name"]
            sentences = [{"raw": a["caption"], "tokens": a["caption"].lower().split()} for a in coco.imgToAnns[i]]
            entry = {"filename": name, "split": split, "sentences": sentences, "imgid": len(images)}
            if layout == "coco":
                entry.update(filepath=f"{coco_split}2014", cocoid=i)
            images.append(entry)
            splits[split].append(name)
            if layout == "flickr":
                (out / "Images").mkdir(parents=True, exist_ok=True)
                shutil.copy(tiny_data / f"{coco_split}2014" / name, out / "Images" / name)
    if layout == "coco":
        for coco_split in ("train", "val"):
            shutil.copytree(tiny_data / f"{coco_split}2014", out / f"{coco_split}2014")
    random.Random(0).shuffle(images)
    name = "dataset_flickr8k.json" if layout == "flickr" else "dataset_coco.json"
    (out / name).write_text(json.dumps({"images": images, "dataset": layout}))
    return out, splits


@pytest.fixture
def flickr(tiny_data, tmp_path):
    return karpathy_from_tiny(tiny_data, tmp_path / "flickr8k")


def read(folder, split):
    with open(folder / "annotations" / f"captions_{split}2014.json") as f:
        return json.load(f)


def test_a_flickr_folder_is_converted_once_with_its_splits(flickr):
    folder, splits = flickr
    logs = []
    assert ensure_coco_layout(str(folder), logs.append, progress=False) == str(folder / "dataset_flickr8k.json")
    assert len(logs) == 1 and "60 train + 0 restval" in logs[0] and "8 val + 8 test" in logs[0]
    train, val = read(folder, "train"), read(folder, "val")
    assert sorted(im["file_name"] for im in train["images"]) == sorted(splits["train"])
    assert sorted(im["file_name"] for im in val["images"]) == sorted(splits["val"] + splits["test"])
    split_of = {im["id"]: im["karpathy_split"] for im in val["images"]}
    assert max(i for i, s in split_of.items() if s == "val") < min(i for i, s in split_of.items() if s == "test")
    assert len(train["annotations"]) == 5 * 60 and {a["image_id"] for a in train["annotations"]} == \
        {im["id"] for im in train["images"]}
    # the image folders hold links to Images/, not copies
    link = folder / "train2014" / splits["train"][0]
    assert link.is_symlink() and os.path.samefile(link, folder / "Images" / splits["train"][0])
    assert sorted(os.listdir(folder / "val2014")) == sorted(splits["val"] + splits["test"])
    # evaluation scores the test images only
    assert karpathy_test_images(str(folder)) == set(splits["test"])
    _, coco, ids = heldout_split(get_config("tiny", data_dir=str(folder)))
    assert sorted(coco.imgs[i]["file_name"] for i in ids) == sorted(splits["test"])

    stamp = os.stat(folder / "annotations" / "captions_train2014.json").st_mtime_ns
    assert ensure_coco_layout(str(folder), logs.append, progress=False) and len(logs) == 1   # nothing to do
    assert os.stat(folder / "annotations" / "captions_train2014.json").st_mtime_ns == stamp

    # a new version of the split file: converted again; links of the old one go; a missing image is reported
    data = json.loads((folder / "dataset_flickr8k.json").read_text())
    moved = next(im for im in data["images"] if im["split"] == "train")
    moved["split"] = "test"
    gone = next(im for im in data["images"] if im["split"] == "train")
    os.remove(folder / "Images" / gone["filename"])
    (folder / "dataset_flickr8k.json").write_text(json.dumps(data))
    ensure_coco_layout(str(folder), logs.append, progress=False)
    assert len(logs) == 3 and logs[1].startswith("warning: 1 of 76 images") and gone["filename"] in logs[1]
    assert "58 train" in logs[2] and "9 test" in logs[2]
    assert not (folder / "train2014" / moved["filename"]).exists() and (folder / "val2014" / moved["filename"]).exists()
    assert not os.path.lexists(folder / "train2014" / gone["filename"])
    assert gone["filename"] not in {im["file_name"] for im in read(folder, "train")["images"]}


def test_cocos_karpathy_split_keeps_coco_ids_and_moves_restval_to_training(tiny_data, tmp_path):
    folder, splits = karpathy_from_tiny(tiny_data, tmp_path / "coco", layout="coco")
    ensure_coco_layout(str(folder), lambda *a: None, progress=False)
    train, val = read(folder, "train"), read(folder, "val")
    assert sorted(im["file_name"] for im in train["images"]) == sorted(splits["train"] + splits["restval"])
    assert sorted(im["file_name"] for im in val["images"]) == sorted(splits["val"] + splits["test"])
    assert all(im["id"] == int(im["file_name"][-16:-4]) for im in train["images"] + val["images"])   # COCO's ids
    for name in splits["restval"]:      # restval images live in val2014/: linked into train2014/
        assert (folder / "train2014" / name).is_symlink() and (folder / "val2014" / name).is_file()
    assert not any((folder / f"{s}2014" / n).is_symlink() for s, names in (("train", splits["train"]),
                   ("val", splits["val"] + splits["test"])) for n in names)   # already in place: left alone


def test_a_coco_folder_is_left_alone_and_bad_split_files_are_clear_errors(tiny_copy, flickr, tmp_path):
    # download_coco.sh's folder: COCO annotations, with dataset_coco.json only choosing the test images
    (tiny_copy / "dataset_coco.json").write_text(json.dumps({"images": []}))
    assert karpathy_folder(str(tiny_copy)) is None and ensure_coco_layout(str(tiny_copy)) is None
    assert not (tiny_copy / "annotations" / "karpathy_source.json").exists()

    folder, _ = flickr
    path = folder / "dataset_flickr8k.json"
    data = json.loads(path.read_text())
    data["images"][3]["split"] = "dev"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"dataset_flickr8k.json: image 3 .* has split 'dev'"):
        ensure_coco_layout(str(folder), progress=False)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="dataset_flickr8k.json is not valid JSON"):
        ensure_coco_layout(str(folder), progress=False)
    (folder / "dataset_flickr30k.json").write_text("{}")
    with pytest.raises(ValueError, match="several Karpathy split files"):
        ensure_coco_layout(str(folder), progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dataset_flickr8k.json").write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train",
                                                                       "sentences": [{"raw": "a dog"}]}]}))
    with pytest.raises(FileNotFoundError, match="none of the 1 images listed in .*dataset_flickr8k.json"):
        ensure_coco_layout(str(empty), progress=False)
    with pytest.raises(SystemExit) as e:     # the CLI's main(), in this process: one error line
        main(["vocab", "--captions", str(empty / "dataset_flickr8k.json"), "--out", str(tmp_path / "v.pkl")])
    assert str(e.value.code).startswith("error: none of the 1 images")


def test_vocabulary_notebooks_training_and_evaluation_run_on_a_karpathy_folder(flickr, tmp_path):
    folder, splits = flickr
    # the vocab command takes the split file itself
    main(["vocab", "--captions", str(folder / "dataset_flickr8k.json"), "--out", str(tmp_path / "v.pkl"),
          "--threshold", "1"])
    assert "circle" in load_vocabulary(str(tmp_path / "v.pkl")).w2i
    # the notebooks' DATA_DIR: notebook 01 finds the data there, and the calls of 02..04 read it
    out = tmp_path / "01.ipynb"
    pm.execute_notebook(os.path.join(ROOT, "notebooks", "01_download_data.ipynb"), str(out), cwd=ROOT,
                        parameters={"DATA_DIR": str(folder), "MODELS_DIR": str(tmp_path / "m")}, kernel_name="python3",
                        progress_bar=False)
    text = out.read_text()
    assert "Karpathy-format data, nothing to generate or download" in text and "60 training images" in text
    config = get_config("tiny", notebook=True, data_dir=str(folder), models_dir=str(tmp_path / "m"), **SMALL)
    assert config.captions_json("train") == str(folder / "annotations" / "captions_train2014.json")
    # training builds the vocabulary and resized images from it; evaluation scores Karpathy's test images
    summary = train(get_config("tiny", data_dir=str(folder), models_dir=str(tmp_path / "m"), max_steps=3,
                               weights=None, **SMALL))
    assert summary["step"] == 3 and len(os.listdir(folder / "resized_images" / "train2014")) >= 60
    vocab = load_vocabulary(config.vocabulary_path)
    loader = get_loader(config.resized_images("train"), config.captions_json("train"), vocab,
                        TrainTransform(config.crop_size, config.hflip), batch_size=4, shuffle=True, num_workers=0)
    images, captions, lengths = next(iter(loader))                     # notebook 04's batch
    assert images.shape == (4, 3, 32, 32) and captions.shape[0] == 4
    result = evaluate_checkpoint(summary["best"], beam_size=1, progress=False)
    assert sorted(os.path.basename(p) for p in result["paths"].values()) == sorted(splits["test"])
    assert len(result["predictions"]) == 8 and "Bleu_4" in result["metrics"]


def test_entries_that_point_outside_the_folder_are_skipped_and_nothing_outside_is_touched(flickr, tmp_path):
    """A split file with ../ names: outside the folder no link appears and the user's own links
    keep their targets; inside, a link this conversion did not make is never replaced."""
    folder, splits = flickr
    data = json.loads((folder / "dataset_flickr8k.json").read_text())
    victim_dir = tmp_path                                  # two levels above flickr8k/train2014/ is tmp_path
    (victim_dir / "mine.txt").write_text("mine")
    os.symlink("mine.txt", victim_dir / "victim.jpg")       # the user's own link, pointing elsewhere
    first = data["images"][0]
    data["images"] += [dict(first, filename="../../victim.jpg"),
                       dict(first, filename="ok.jpg", filepath="../.."),
                       dict(first, filename="abs.jpg", filepath=str(victim_dir)),
                       dict(first, filename="..")]
    (folder / "dataset_flickr8k.json").write_text(json.dumps(data))
    outside_before = sorted(os.listdir(victim_dir))
    logs = []
    ensure_coco_layout(str(folder), log=logs.append, progress=False)
    said = "\n".join(logs)
    assert "skipping 4 entries of" in said and "'../../victim.jpg' is not a plain file name" in said, said
    assert sorted(os.listdir(victim_dir)) == outside_before
    assert os.readlink(victim_dir / "victim.jpg") == "mine.txt"
    names = {im["file_name"] for split in ("train", "val") for im in read(folder, split)["images"]}
    assert names == {n for s in splits.values() for n in s}              # the safe entries, all converted

    # the CLI path the issue names: vocab --captions on the (changed) split file, converted again
    (folder / "dataset_flickr8k.json").write_text(json.dumps(data | {"dataset": "flickr8k, again"}))
    assert main(["vocab", "--captions", str(folder / "dataset_flickr8k.json"), "--out",
                 str(tmp_path / "vocabulary.pkl"), "--threshold", "1"]) in (None, 0)
    assert sorted(os.listdir(victim_dir)) == outside_before + ["vocabulary.pkl"]
    assert os.readlink(victim_dir / "victim.jpg") == "mine.txt"

    # a user's own link in train2014/ where an image's link belongs: an error naming it, the link kept
    name = splits["train"][0]
    link = folder / "train2014" / name
    os.remove(link)
    os.symlink(os.path.relpath(victim_dir / "mine.txt", link.parent), link)
    (folder / "dataset_flickr8k.json").write_text(json.dumps(data | {"dataset": "flickr8k, v2"}))
    with pytest.raises(ValueError, match=f"{name} is a link to .*mine.txt that this conversion did not make"):
        ensure_coco_layout(str(folder), log=logs.append, progress=False)
    assert os.path.samefile(link, victim_dir / "mine.txt")
