"""What is built once per data set (stand-in backbone, vocabulary, resized images) is built under a lock:
a second run on the same data waits for the first, says so, then uses what the first built.

The "first run" here holds the lock itself (a separate open file: flock locks conflict between two opens
in one process as between two processes), builds the thing while the second waits, and lets go."""
import fcntl
import os
import subprocess
import sys
import threading
import time

from conftest import ROOT, SMALL

from captioning.config import get_config
from captioning.derived import build_lock
from captioning.images import list_images

WAITING = "waiting for another process building"


class Second(threading.Thread):
    """Runs fn(log) in a thread, collecting what it logs; .result is its return value."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.lines, self.result, self.error = fn, [], None, None

    def run(self):
        try:
            self.result = self.fn(self.lines.append)
        except BaseException as e:  # noqa: B036 - reported by the test
            self.error = e

    def wait_for(self, text, timeout=60):
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.is_alive() and time.monotonic() < deadline, (self.lines, self.error)
            time.sleep(0.02)

    def finish(self, timeout=120):
        self.join(timeout)
        assert not self.is_alive() and self.error is None, (self.lines, self.error)
        return self.result


def hold(path):
    """The first run's lock: an open file (or folder) flocked exclusively; close it to let go."""
    fd = os.open(path, os.O_RDONLY) if os.path.isdir(path) else os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_build_lock_waits_and_says_so(tmp_path):
    thing = str(tmp_path / "thing")
    fd = hold(thing + ".lock")
    order = []

    def second(log):
        with build_lock(thing, "the thing", log):
            order.append("second")

    t = Second(second)
    t.start()
    t.wait_for(WAITING)
    assert order == [] and any("the thing" in line and thing in line for line in t.lines)
    order.append("first")
    os.close(fd)
    t.finish()
    assert order == ["first", "second"]


def test_build_lock_does_not_wait_or_talk_when_free(tmp_path):
    lines = []
    with build_lock(str(tmp_path / "x"), "x", lines.append):
        pass
    with build_lock(str(tmp_path), "a folder", lines.append):   # a folder: locked itself, nothing added to it
        pass
    assert lines == [] and sorted(os.listdir(tmp_path)) == ["x.lock"]


def test_a_second_standin_pretraining_waits_and_reuses_the_first(tmp_path, monkeypatch):
    import torch

    import captioning.standin as standin

    config = get_config("tiny", data_dir=str(tmp_path / "data"), models_dir=str(tmp_path / "models"), **SMALL)
    calls = []
    monkeypatch.setattr(standin, "pretrain_standin", lambda *a, **k: calls.append(1) or ({}, {}))
    path = standin.standin_path(config)
    os.makedirs(os.path.dirname(path))
    fd = hold(path + ".lock")
    t = Second(lambda log: standin.ensure_standin(config, log))
    t.start()
    t.wait_for(WAITING)
    torch.save({"first": torch.ones(1)}, path)          # the first run saves its stand-in, then lets go
    os.close(fd)
    assert t.finish() == path
    assert calls == [], "pretrained again instead of using the first run's stand-in"
    assert "first" in torch.load(path, weights_only=True)
    assert any("another process just pretrained" in line for line in t.lines), t.lines


def test_a_second_run_waits_for_the_vocabulary_and_uses_it(tiny_copy, tmp_path, monkeypatch):
    import captioning.prepare as prepare
    from captioning.vocabulary import build_vocabulary, load_vocabulary, save_vocabulary

    monkeypatch.setattr(prepare, "ensure_standin", lambda config, log: None)   # not what this test is about
    config = get_config("tiny", data_dir=str(tiny_copy), models_dir=str(tmp_path / "models"), **SMALL)
    fd = hold(config.vocabulary_path + ".lock")
    t = Second(lambda log: prepare.ensure_prerequisites(config, log))
    t.start()
    t.wait_for(WAITING)
    assert not os.path.exists(config.vocabulary_path)
    vocab = build_vocabulary(config.captions_json("train"), config.vocab_threshold, progress=False)
    save_vocabulary(vocab, config.vocabulary_path)       # the first run's vocabulary
    inode = os.stat(config.vocabulary_path).st_ino
    os.close(fd)
    t.finish()
    assert os.stat(config.vocabulary_path).st_ino == inode, "the vocabulary was written again"
    assert not any(line.startswith("building the vocabulary") or "rebuilding" in line for line in t.lines), t.lines
    assert load_vocabulary(config.vocabulary_path).words() == vocab.words()


def test_a_second_resize_waits_and_finds_the_images_done(tiny_copy, tmp_path):
    from captioning import images

    src, dst = str(tiny_copy / "train2014"), str(tmp_path / "resized")
    os.makedirs(dst)
    fd = hold(dst)
    t = Second(lambda log: images.resize_images(src, dst, 16, workers=1, progress=False, log=log))
    t.start()
    t.wait_for(WAITING)
    first = images._resize_all(src, dst, 16, 1, False)       # the first run fills the folder, then lets go
    os.close(fd)
    second = t.finish()
    assert first["resized"] == len(images.list_images(src)) > 0
    assert second["resized"] == 0 and second["skipped_up_to_date"] == first["resized"]


FIRST_RESIZE = """
import sys
from captioning import images
from captioning.derived import build_lock
from captioning.images import list_images
src, dst = sys.argv[1:]
with build_lock(dst, "the resized images"):
    print("locked", flush=True)
    sys.stdin.readline()
    images._resize_all(src, dst, 16, 1, False)
"""


def test_two_resize_processes_the_second_waits_then_reuses(tiny_copy, tmp_path):
    src, dst = str(tiny_copy / "train2014"), str(tmp_path / "resized")
    os.makedirs(dst)
    first = subprocess.Popen([sys.executable, "-c", FIRST_RESIZE, src, dst], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        second = subprocess.Popen([sys.executable, "-m", "captioning", "resize", "--src", src, "--dst", dst,
                                   "--size", "16"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = second.stdout.readline()          # printed before it blocks on the lock
        assert WAITING in line, line
        assert second.poll() is None
        first.stdin.write("go\n")
        first.stdin.close()
        assert first.wait(120) == 0
        rest = second.stdout.read()
        assert second.wait(120) == 0, rest
        n = len(list_images(src))
        assert f"0 resized, {n} already up to date" in rest, rest
    finally:
        for p in (first,) + ((second,) if "second" in locals() else ()):
            if p.poll() is None:
                p.kill()
