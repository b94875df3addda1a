import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# sizes that keep a training run in the tests to seconds
SMALL = dict(resize_size=36, crop_size=32, batch_size=8, embedding_size=16, hidden_layer_size=32, num_workers=0,
             progress=False, vocab_threshold=1, val_max_captions=20, standin_steps=2)


def run_cli(*args, timeout=300, check=True, **kwargs):
    """Run `python -m captioning ...` from the repo root; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "captioning", *map(str, args)], cwd=kwargs.pop("cwd", ROOT),
                          capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small tiny-set in COCO layout (60 train / 16 val images), shared read-only by the tests."""
    from captioning.tinyset import make_tinyset

    out = tmp_path_factory.mktemp("data") / "tiny"
    make_tinyset(str(out), train=60, val=16, seed=1)
    return out


@pytest.fixture(scope="session")
def tiny_vocab(tiny_data):
    from captioning.vocabulary import build_vocabulary

    return build_vocabulary(str(tiny_data / "annotations" / "captions_train2014.json"), threshold=1, progress=False)


@pytest.fixture
def tiny_copy(tiny_data, tmp_path):
    """A private, writable copy of the tiny data (for tests that build vocabularies, caches, resized images)."""
    import shutil

    dst = tmp_path / "tiny"
    shutil.copytree(tiny_data, dst)
    return dst


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder in which nothing can be created: a chmod 555 folder, or /sys where permissions do not
    stop us (root)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, "/sys"):
        try:
            os.mkdir(os.path.join(candidate, "probe"))
        except OSError:
            return str(candidate)
        os.rmdir(os.path.join(candidate, "probe"))
    pytest.skip("no read-only folder available here")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url, wait=30):
    """The HTTP status of url; the server may print its URL a moment before it listens."""
    deadline = time.time() + wait
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except urllib.error.URLError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@contextmanager
def make_server(args, url_pattern, env=None, timeout=90):
    """Run `make -s ARGS` as a user without a display would, until it prints a line matching url_pattern.

    Yields (the match, every line printed so far); the server's whole process group is stopped on exit.
    """
    env = {k: v for k, v in (env or os.environ).items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    proc = subprocess.Popen(["make", "-s", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, match = [], None
    try:
        deadline = time.time() + timeout
        while match is None and time.time() < deadline:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)
                continue
            match = re.search(url_pattern, seen[-1])
        assert match, "no URL printed:\n" + "".join(seen)
        yield match, seen
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
