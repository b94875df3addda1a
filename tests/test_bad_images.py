"""One bad image among many is skipped, counted and named; a run stops only when more than 1% are bad.

Training meets unreadable images in two places: the feature-cache extraction (cache=True) and the
DataLoader of the chapter's loop (cache=False), whose workers are other processes.
"""
import json
import os

import pytest
import torch
import torch.utils.data as data
from conftest import SMALL

import captioning.training as training
from captioning.config import get_config
from captioning.data import (
    CocoCaptionDataset,
    CountingLoader,
    Unreadable,
    collate_function,
    skipped_images,
    too_many_unreadable,
)
from captioning.images import resize_images
from captioning.tinyset import make_tinyset
from captioning.vocabulary import build_vocabulary


def _cut_short(path):
    """A file cut in half that still ends as a whole JPEG does: it passes resize's checks, then does not decode."""
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2] + b"\xff\xd9")


@pytest.fixture(scope="module")
def big_set(tmp_path_factory):
    """210 train images (2 are 0.95%), resized; two resized train images truncated."""
    data_dir = tmp_path_factory.mktemp("bad") / "tiny"
    make_tinyset(str(data_dir), train=210, val=16, seed=3)
    for split in ("train", "val"):
        resize_images(str(data_dir / f"{split}2014"), str(data_dir / "resized_images" / f"{split}2014"), 36,
                      progress=False)
    folder = data_dir / "resized_images" / "train2014"
    bad = sorted(n for n in os.listdir(folder) if n.endswith(".jpg"))[100:102]
    for name in bad:
        _cut_short(folder / name)
    return data_dir, bad


@pytest.mark.parametrize("cache", [True, False])
def test_two_truncated_resized_images_are_skipped_counted_and_named(big_set, tmp_path, monkeypatch, capsys, cache):
    data_dir, bad = big_set
    runs = []
    fit = training._fit
    monkeypatch.setattr(training, "_fit", lambda run: runs.append(run) or fit(run))
    config = get_config("tiny", data_dir=str(data_dir), models_dir=str(tmp_path / "m"), epochs=2, cache=cache,
                        **{**SMALL, "batch_size": 32, "num_workers": 0 if cache else 1})
    summary = training.train(config)
    (run,) = runs
    assert summary["step"] == 2 * run.steps_per_epoch and not summary["interrupted"]    # trained to the end
    out = capsys.readouterr().out
    line = f"2 unreadable images skipped: {bad[0]}, {bad[1]}"
    assert out.count(line) == 1, out                                   # printed once, over two epochs
    assert skipped_images(run.train_ds, run.val_loader) == bad == summary["skipped_images"]   # and the summary
    captions = 5 * 210
    if cache:
        # extraction gave them no row: meta.json says which, and their captions are left out
        folder = os.path.dirname(run.train_ds.cache.filename)
        meta = json.load(open(os.path.join(folder, "meta.json")))
        rows = sorted(i for i, name, _ in meta["unreadable"])
        assert [name for _, name, _ in sorted(meta["unreadable"])] == bad and meta["complete"]
        assert len(run.train_ds) == captions - 2 * 5
        assert not {run.train_ds.ds.image_index(i) for i in run.train_ds.items} & set(rows)
        assert not run.train_ds.cache[rows].any()                    # zeros, never read
    else:
        assert len(run.train_ds) == captions and sorted(run.train_ds.skipped) == bad


def test_collate_leaves_unreadable_items_out_and_workers_report_them(big_set):
    data_dir, bad = big_set
    vocab = build_vocabulary(str(data_dir / "annotations" / "captions_train2014.json"), 1, progress=False)
    from captioning.data import eval_transform

    ds = CocoCaptionDataset(str(data_dir / "resized_images" / "train2014"),
                            str(data_dir / "annotations" / "captions_train2014.json"), vocab, eval_transform(36, 32))
    bad_items = [i for i in range(len(ds)) if os.path.basename(ds.image_path(ds.image_index(i))) in bad]
    assert len(bad_items) == 10
    item = ds[bad_items[0]]
    assert isinstance(item, Unreadable) and item.name in bad and item.reason.startswith("OSError")
    good = ds[0]
    images, captions, lengths = collate_function([good, item])
    assert images.shape[0] == 1 and len(lengths) == 1                 # left out of the batch
    # a batch of unreadable images only gets the next readable item instead (a step needs one)
    images, captions, lengths = collate_function([ds[bad_items[0]], ds[bad_items[5]]])
    assert images.shape[0] == 1 and torch.equal(captions[0, : lengths[0]], ds.target(max(bad_items) + 1))
    # DataLoader workers are other processes: the names come back with the batches
    fresh = CocoCaptionDataset(ds.data_path, str(data_dir / "annotations" / "captions_train2014.json"), vocab,
                               eval_transform(36, 32))
    said = []
    loader = CountingLoader(data.Subset(fresh, bad_items + list(range(40))), log=said.append, batch_size=8,
                            num_workers=2)
    batches = list(loader)            # the first batch is all unreadable: one substitute
    assert [b[0].shape[0] for b in batches][:2] == [1, 6] and sorted(fresh.skipped) == bad
    assert said == [f"2 unreadable images skipped: {bad[0]}, {bad[1]} ({fresh.data_path}: their captions are "
                    f"left out)"]
    list(loader)
    assert len(said) == 1                                             # said once


def test_more_than_one_percent_is_refused_naming_count_split_and_files(tmp_path):
    names = {f"{k}.jpg": "truncated" for k in range(7)}
    assert too_many_unreadable(dict(list(names.items())[:2]), 200, tmp_path / "train2014") is None   # 1%: on
    error = too_many_unreadable(dict(list(names.items())[:3]), 200, tmp_path / "train2014")
    assert str(error).startswith(f"3 of 200 images of train2014 ({tmp_path / 'train2014'}) are unreadable, "
                                 f"more than 1%: 0.jpg (truncated); 1.jpg (truncated); 2.jpg (truncated);")
    error = too_many_unreadable(names, 10, tmp_path / "val2014")
    assert "4.jpg (truncated) and 2 more;" in str(error) and "5.jpg" not in str(error)
