"""A full disk, made by the tests: a write, a reservation or the free-space figure that says ENOSPC.

Each failure must be one line that names the file and says the disk is full, and must lose nothing
written before it (the rows of a feature cache extracted so far, the previous checkpoint).
"""
import errno
import json
import os
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch
from conftest import SMALL

from captioning.checkpoint import atomic_save, load_checkpoint
from captioning.config import get_config
from captioning.data import CocoCaptionDataset, TrainTransform
from captioning.features import build_feature_cache, list_feature_caches
from captioning.model import CNNModel
from captioning.training import train
from captioning.vocabulary import Vocab

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def setup(tiny_copy):
    vocab = Vocab.from_words(["<pad>", "<start>", "<end>", "<unk>"])
    ds = CocoCaptionDataset(str(tiny_copy / "train2014"), str(tiny_copy / "annotations" / "captions_train2014.json"),
                            vocab)
    torch.manual_seed(0)
    encoder = CNNModel(8, "resnet18", weights=None).eval()
    args = dict(transform=TrainTransform(32, hflip=True), views=2, split="train", device=torch.device("cpu"),
                batch_size=16, progress=False)
    return encoder, ds, args


def _only_folder(features_dir):
    (name,) = os.listdir(features_dir)
    return features_dir / name


def test_a_write_that_finds_the_disk_full_is_one_line_and_the_rows_before_it_are_kept(setup, tmp_path, monkeypatch):
    encoder, ds, args = setup
    reference = np.array(build_feature_cache(encoder, ds, features_dir=str(tmp_path / "ref"), **args))
    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, data, offset):                # the second batch's rows find the disk full
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError) as failed:
        build_feature_cache(encoder, ds, features_dir=str(tmp_path / "f"), **args)
    folder = _only_folder(tmp_path / "f")
    assert str(failed.value) == f"no space left on device writing {folder / 'features.npy'}"
    assert failed.value.errno == errno.ENOSPC
    meta = json.load(open(folder / "meta.json"))
    assert meta["done"] == 16 and meta["complete"] is False           # the first batch, and not complete
    assert [c["complete"] for c in list_feature_caches(str(tmp_path / "f"))] == [False]
    monkeypatch.undo()
    resumed = np.array(build_feature_cache(encoder, ds, features_dir=str(tmp_path / "f"), **args))
    assert np.array_equal(resumed, reference)                            # the rows before the failure were kept
    assert json.load(open(folder / "meta.json"))["complete"] is True


def test_a_full_disk_is_found_before_extraction_with_the_real_figures(setup, tmp_path, monkeypatch):
    encoder, ds, args = setup
    need = 2 * len(ds.image_ids) * 2 * 512                              # fp16, (images, K=2, 512)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 20_000, 20_000))
    with pytest.raises(OSError) as failed:
        build_feature_cache(encoder, ds, features_dir=str(tmp_path / "f"), **args)
    message = str(failed.value)
    assert f"needs {need / 1e6:.3f} MB but" in message and "has 0.020 MB free" in message, message
    assert "0.0 GB" not in message and not (_only_folder(tmp_path / "f") / "features.npy").exists()


def test_the_reservation_fails_cleanly_and_gives_the_space_back(setup, tmp_path, monkeypatch):
    """posix_fallocate finds the disk full (another process took the space after the check)."""
    encoder, ds, args = setup

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="^no space left on device writing .*features.npy$"):
        build_feature_cache(encoder, ds, features_dir=str(tmp_path / "f"), **args)
    folder = _only_folder(tmp_path / "f")
    assert not (folder / "features.npy").exists()                      # a new cache's reservation is given back
    assert json.load(open(folder / "meta.json"))["complete"] is False


def test_resuming_a_sparse_cache_checks_what_is_left_to_write(setup, tmp_path, monkeypatch):
    """A cache begun by an earlier version is a sparse memmap: resuming it still needs the unallocated rest."""
    encoder, ds, args = setup
    reference = np.array(build_feature_cache(encoder, ds, features_dir=str(tmp_path / "ref"), **args))
    src = _only_folder(tmp_path / "ref")
    folder = tmp_path / "f" / src.name
    folder.mkdir(parents=True)
    sparse = np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=np.float16, shape=reference.shape)
    sparse[:16] = reference[:16]
    sparse.flush()
    del sparse
    meta = json.load(open(src / "meta.json"))
    for key in ("complete", "checksum", "array", "unreadable"):     # what earlier versions did not write
        meta.pop(key, None)
    json.dump({**meta, "done": 16}, open(folder / "meta.json", "w"))   # as earlier versions wrote it
    st = os.stat(folder / "features.npy")
    left = st.st_size - st.st_blocks * 512
    if left < 50_000:
        pytest.skip("this filesystem does not make sparse files")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 30_000, 30_000))
    with pytest.raises(OSError) as failed:
        build_feature_cache(encoder, ds, features_dir=str(tmp_path / "f"), **args)
    assert f"needs {left / 1e6:.3f} MB more but" in str(failed.value) and "0.030 MB free" in str(failed.value)
    monkeypatch.undo()
    resumed = np.array(build_feature_cache(encoder, ds, features_dir=str(tmp_path / "f"), **args))
    assert np.array_equal(resumed, reference)


class _FillsUp:
    """A file whose writes fail with ENOSPC once `room` bytes are written, as on a full disk."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.f.write(b)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.f, name)


def _disk_fills_up(monkeypatch, room=1000):
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: _FillsUp(real_fdopen(fd, mode, *a, **k), room))


def test_a_checkpoint_write_on_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "m" / "last.ckpt"
    atomic_save({"step": 1, "w": torch.ones(3)}, str(path))
    _disk_fills_up(monkeypatch)
    # what torch.save itself says: "[enforce fail at inline_container.cc:...] . unexpected pos ..."
    with pytest.raises(RuntimeError, match="unexpected pos|file write failed"):
        torch.save({"w": torch.ones(10_000)}, _FillsUp(open(tmp_path / "x", "wb"), 1000))
    with pytest.raises(OSError) as failed:
        atomic_save({"step": 2, "w": torch.ones(10_000)}, str(path))
    assert str(failed.value) == f"no space left on device writing {path}" and failed.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(path.parent) == ["last.ckpt"]                    # no temp file left behind


def test_torch_writer_errors_without_a_cause_are_judged_by_the_free_space(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"

    def torn(obj, f, *a, **k):
        f.write(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", torn)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 0))
    with pytest.raises(OSError, match=f"^no space left on device writing {path}$"):
        atomic_save({"step": 2}, str(path))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 0, 10**9))
    with pytest.raises(RuntimeError, match=f"^writing {path} failed .*unexpected pos"):
        atomic_save({"step": 2}, str(path))
    assert not os.listdir(tmp_path)


def test_training_on_a_full_disk_stops_naming_the_checkpoint_and_keeps_the_last_one(tiny_copy, tmp_path,
                                                                                      monkeypatch):
    models = tmp_path / "m"
    config = get_config("tiny", data_dir=str(tiny_copy), models_dir=str(models), max_steps=6, save_every=2,
                        train_backbone=False, weights=None, **SMALL)
    real_save, saves = torch.save, []

    def save(obj, f, *a, **k):                  # the second checkpoint finds the disk full
        saves.append(obj["step"])
        if len(saves) == 2:
            f = _FillsUp(f, 4096)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError) as failed:
        train(config)
    last = models / "last.ckpt"
    assert str(failed.value).startswith(f"no space left on device writing {last} (step 4); the previous {last} "
                                        f"is kept"), failed.value
    monkeypatch.undo()
    assert load_checkpoint(str(last))["step"] == 2
    assert not [f for f in os.listdir(models) if f.endswith(".tmp")]
