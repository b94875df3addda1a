import os
import subprocess
import sys

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
