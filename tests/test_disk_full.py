"""A full disk, made by the tests: a write, a reservation or the free-space figure that says ENOSPC.

Each failure must be one line that names the file and says the disk is full, and must lose nothing
written before it (the rows of a feature cache extracted so far, the previous checkpoint).
"""
import errno
import os
import shutil
from collections import namedtuple

import pytest
import torch
from conftest import SMALL

from captioning.checkpoint import atomic_save, load_checkpoint
from captioning.config import get_config
from captioning.training import train

Usage = namedtuple("Usage", "total used free")


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
