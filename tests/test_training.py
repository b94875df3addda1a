import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, SMALL, run_cli

from captioning.checkpoint import atomic_save, load_checkpoint
from captioning.config import get_config
from captioning.rundir import read_log
from captioning.training import decay_epoch, train

FINETUNE = dict(SMALL, log_every=1, save_every=1000, train_backbone=True, group_by_image=True)  # one item per image
FROZEN = dict(train_backbone=False, weights=None, cache=True, cache_views=2)  # the tiny preset's way


def small_config(data, models, **kw):
    return get_config("tiny", data_dir=str(data), models_dir=str(models), **{**FINETUNE, **kw})


def losses(log_path):
    return {r["step"]: r["loss"] for r in read_log(str(log_path)) if "loss" in r}


def test_training_builds_prerequisites_and_writes_a_self_contained_checkpoint(tiny_copy, tmp_path):
    assert not (tiny_copy / "vocabulary.pkl").exists() and not (tiny_copy / "resized_images").exists()
    summary = train(small_config(tiny_copy, tmp_path / "m", epochs=1))
    assert (tiny_copy / "vocabulary.pkl").exists()
    assert len([f for f in os.listdir(tiny_copy / "resized_images" / "train2014") if f.endswith(".jpg")]) == 60
    ckpt = torch.load(summary["last"], weights_only=True)  # plain tensors and containers only
    assert {"config", "vocab", "encoder", "decoder", "optimizer", "epoch", "step", "rng", "backbone"} <= set(ckpt)
    assert ckpt["step"] == summary["step"] == 8 and ckpt["epoch"] == 1   # 60 images / 8 per step
    assert ckpt["vocab"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert ckpt["config"]["crop_size"] == 32 and ckpt["backbone"]["trained"]
    assert any(k.startswith("resnet_module.") for k in ckpt["encoder"])   # a trained backbone is saved
    assert os.path.exists(summary["best"])
    rows = [json.loads(line) for line in open(summary["log"])]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert any("val_loss" in r for r in rows)


@pytest.mark.parametrize("kind", ["finetune", "cached"])
def test_resume_reproduces_the_uninterrupted_run(tiny_copy, tmp_path, kind):
    extra = FROZEN if kind == "cached" else {}
    straight = train(small_config(tiny_copy, tmp_path / "a", epochs=4, max_steps=30, **extra))
    first = train(small_config(tiny_copy, tmp_path / "b", epochs=4, max_steps=15, **extra))
    assert first["step"] == 15
    resumed = train(small_config(tiny_copy, tmp_path / "b", epochs=4, max_steps=30, **extra), resume=True)
    assert straight["step"] == resumed["step"] == 30
    a, b = losses(straight["log"]), losses(resumed["log"])
    assert sorted(b) == list(range(1, 31))           # the resumed log continues the first one
    assert max(abs(a[s] - b[s]) for s in range(16, 31)) < 1e-3
    assert a[30] < a[1]                               # and it did learn something


def test_cached_features_are_built_once_and_keyed(tiny_copy, tmp_path):
    train(small_config(tiny_copy, tmp_path / "m", max_steps=3, **FROZEN))
    folders = sorted(os.listdir(tiny_copy / "features"))
    assert [f.split("-")[0] for f in folders] == ["train", "val"]
    meta = json.load(open(tiny_copy / "features" / folders[0] / "meta.json"))
    assert meta["done"] == meta["images"] == 60 and meta["views"] == 2
    feats = np.load(tiny_copy / "features" / folders[0] / "features.npy", mmap_mode="r")
    assert feats.shape == (60, 2, 512) and feats.dtype == np.float16
    assert not np.array_equal(feats[:, 0], feats[:, 1])              # two different augmented views
    val_meta = json.load(open(tiny_copy / "features" / folders[1] / "meta.json"))
    assert val_meta["images"] == 4 and val_meta["views"] == 1        # val_max_captions=20: 4 of the 16 val images
    ckpt = load_checkpoint(str(tmp_path / "m" / "last.ckpt"))
    assert ckpt["backbone"]["included"]   # a random frozen backbone cannot be rebuilt from a name: it is saved
    # a different transform (crop size) must not reuse these features
    train(small_config(tiny_copy, tmp_path / "m2", max_steps=2, **{**FROZEN, "crop_size": 28}))
    assert len(os.listdir(tiny_copy / "features")) == 4
    # opening a cache marks it used; --prune keeps the most recently used one of each split
    for folder in os.listdir(tiny_copy / "features"):
        os.utime(tiny_copy / "features" / folder / "meta.json", (time.time() - 86400,) * 2)
    train(small_config(tiny_copy, tmp_path / "m4", max_steps=1, **FROZEN))   # the first caches again
    assert len(os.listdir(tiny_copy / "features")) == 4
    listed = run_cli("features", "--data-dir", tiny_copy).stdout
    assert all(f in listed for f in folders) and "60/60" in listed
    assert "removed 2 feature cache(s)" in run_cli("features", "--data-dir", tiny_copy, "--prune").stdout
    assert sorted(os.listdir(tiny_copy / "features")) == folders
    bad = run_cli("features", "--data-dir", tiny_copy, "--prune", "--keep", "-1", check=False)
    assert bad.returncode == 1 and "keep must be >= 0" in bad.stderr
    # the chapter-faithful loop (no cache) trains too
    summary = train(small_config(tiny_copy, tmp_path / "m3", max_steps=2, **{**FROZEN, "cache": False}))
    assert summary["step"] == 2


def test_feature_extraction_resumes_after_an_interruption(tiny_copy, tmp_path):
    from captioning.data import CocoCaptionDataset, TrainTransform
    from captioning.features import build_feature_cache
    from captioning.model import CNNModel
    from captioning.vocabulary import Vocab

    vocab = Vocab.from_words(["<pad>", "<start>", "<end>", "<unk>"])
    ds = CocoCaptionDataset(str(tiny_copy / "train2014"), str(tiny_copy / "annotations" / "captions_train2014.json"),
                            vocab)
    torch.manual_seed(0)
    encoder = CNNModel(8, "resnet18", weights=None).eval()
    tf = TrainTransform(32, hflip=True)
    args = dict(transform=tf, views=2, split="train", device=torch.device("cpu"), batch_size=16, progress=False)
    reference = np.array(build_feature_cache(encoder, ds, features_dir=str(tmp_path / "ref"), **args))

    calls = {"n": 0}
    real_extractor = encoder.frozen_extractor

    def flaky_extractor(maps=False):          # what the cache runs: Ctrl-C arrives during its third batch
        extractor = real_extractor(maps)

        class Flaky(torch.nn.Module):
            def forward(self, images):
                calls["n"] += 1
                if calls["n"] == 3:
                    raise KeyboardInterrupt
                return extractor(images)
        return Flaky()

    encoder.frozen_extractor = flaky_extractor
    with pytest.raises(KeyboardInterrupt):
        build_feature_cache(encoder, ds, features_dir=str(tmp_path / "f"), **args)
    folder = tmp_path / "f" / os.listdir(tmp_path / "f")[0]
    assert json.load(open(folder / "meta.json"))["done"] == 32
    calls["n"] = -100  # no more failures; count the batches the second run needs
    resumed = np.array(build_feature_cache(encoder, ds, features_dir=str(tmp_path / "f"), **args))
    assert calls["n"] == -100 + 2                     # only the 28 images left: 2 batches of 16
    assert np.array_equal(resumed, reference)


def test_cached_batches_match_items_and_draw_every_view(tiny_copy):
    """The loader fetches a batch with one gather (__getitems__): same rows as item by item."""
    from captioning.data import CocoCaptionDataset
    from captioning.features import CachedCaptionDataset
    from captioning.vocabulary import Vocab

    vocab = Vocab.from_words(["<pad>", "<start>", "<end>", "<unk>"])
    ds = CocoCaptionDataset(str(tiny_copy / "train2014"), str(tiny_copy / "annotations" / "captions_train2014.json"),
                            vocab)
    cache = np.random.default_rng(0).standard_normal((len(ds.image_ids), 3, 6)).astype(np.float16)
    cached = CachedCaptionDataset(ds, cache, seed=1)
    indices = [7, 0, 33, 7, len(ds) - 1]
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        batch = cached.__getitems__(indices)
        for i, (feature, caption) in zip(indices, batch):
            single = cached[i]
            assert torch.equal(feature, single[0]) and torch.equal(caption, single[1])
            assert any(torch.equal(feature, torch.from_numpy(cache[ds.image_index(i), k].astype(np.float32)))
                       for k in range(3))
    views = {cached._view(i) for i in range(len(ds))}
    assert views == {0, 1, 2}


def test_atomic_save_leaves_the_previous_file_when_a_write_dies(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1, "w": torch.ones(3)}, str(path))

    def dies_halfway(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]      # no temp file left behind


def _train_cmd(data, models, *extra):
    return [sys.executable, "-m", "captioning", "train", "--preset", "tiny", "--data-dir", str(data),
            "--models-dir", str(models), "--num-workers", "0", "--batch-size", "8", "--set", "resize_size=36",
            "--set", "crop_size=32", "--set", "embedding_size=16", "--set", "hidden_layer_size=32",
            "--set", "log_every=1", "--set", "vocab_threshold=1", "--set", "progress=false",
            "--set", "standin_steps=2", *extra]


def _wait_for_step(path, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(path) and max(losses(path), default=0) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"training never reached step {step}")


def test_kill_9_during_training_then_resume(tiny_copy, tmp_path):
    models = tmp_path / "m"
    proc = subprocess.Popen(_train_cmd(tiny_copy, models, "--epochs", "50", "--save-every", "2"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(models / "train_log.jsonl", 7, proc)
    finally:
        proc.kill()                                   # SIGKILL: no chance to clean up
        proc.wait()
    saved = load_checkpoint(str(models / "last.ckpt"))["step"]
    assert saved >= 6 and saved % 2 == 0
    run_cli(*_train_cmd(tiny_copy, models, "--epochs", "50", "--max-steps", str(saved + 5), "--resume")[3:])
    assert load_checkpoint(str(models / "last.ckpt"))["step"] == saved + 5
    assert sorted(losses(models / "train_log.jsonl")) == list(range(1, saved + 6))


CTRL_C_RUNS = int(os.environ.get("CTRL_C_RUNS", "3"))


def _temp_files(models):
    try:
        return {f for f in os.listdir(models) if f.endswith(".tmp")}
    except FileNotFoundError:
        return set()


# Runs the CLI with a hook that sends this process a SIGINT from inside chosen checkpoint writes (while
# atomic_save's temporary file is open, before torch.save writes into it), so that the signal lands
# inside a write every time rather than when a poll happens to see the temporary file.
# SIGINT_IN_WRITES: numbers of atomic_save calls in this process (1 = the first), and "final": the
# write after the loop has stopped (the one not made by train_one_epoch).
SIGINT_IN_WRITES = """
import os, runpy, signal, sys
import torch
import captioning.training as training

wanted = os.environ["SIGINT_IN_WRITES"].split(",")
real_atomic_save, real_save = training.atomic_save, torch.save
calls, armed = [0], [False]

def atomic_save(obj, path):
    calls[0] += 1
    in_loop = any(f.f_code.co_name == "train_one_epoch" for f in _frames(sys._getframe()))
    armed[0] = str(calls[0]) in wanted or ("final" in wanted and not in_loop)
    try:
        return real_atomic_save(obj, path)
    finally:
        armed[0] = False

def _frames(f):
    while f:
        yield f
        f = f.f_back

def save(obj, f, *args, **kwargs):
    if armed[0]:
        armed[0] = False
        print(f"test hook: SIGINT inside checkpoint write {calls[0]}", flush=True)
        os.kill(os.getpid(), signal.SIGINT)
    return real_save(obj, f, *args, **kwargs)

training.atomic_save, torch.save = atomic_save, save
runpy.run_module("captioning", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_during_checkpoint_writes_always_saves_and_exits_130(tiny_copy, tmp_path):
    """Every step writes a checkpoint. A hook sends SIGINT from inside the second write, and a second
    SIGINT from inside the final write (an impatient second Ctrl-C). Each time: both are held until
    their write is done ("finishing the checkpoint write first", once before the stop and once after),
    exit 130, a loadable last.ckpt that matches the log, no temporary file, no lock left. Each run
    resumes the one before; CTRL_C_RUNS=20 makes it 20 runs."""
    models = tmp_path / "m"
    env = {**os.environ, "SIGINT_IN_WRITES": "2,final", "PYTHONUNBUFFERED": "1"}   # unbuffered: the order below
    for run in range(CTRL_C_RUNS):
        start = max(losses(models / "train_log.jsonl")) if run else 0
        # A shell that starts jobs in the background makes them ignore SIGINT, and Python then never
        # raises KeyboardInterrupt: give the child the default disposition whatever runs the tests.
        cmd = _train_cmd(tiny_copy, models, "--epochs", "50", "--save-every", "1", *(["--resume"] if run else []))
        proc = subprocess.Popen([sys.executable, "-c", SIGINT_IN_WRITES, *cmd[3:]],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 130, (run, out)
        assert "Traceback" not in out and out.count("interrupted at step") == 1, out
        before, after = out.split("interrupted at step")
        # the first SIGINT landed inside write 2 and was held until it was done; so was the second, in the final write
        assert "SIGINT inside checkpoint write 2" in before, out
        assert before.split("SIGINT inside checkpoint write 2")[1].count("finishing the checkpoint write first") == 1
        assert after.count("test hook: SIGINT inside checkpoint write") == 1, out
        assert "finishing the checkpoint write first" in after.split("test hook: SIGINT inside checkpoint write")[1]
        ckpt = load_checkpoint(str(models / "last.ckpt"))
        assert ckpt["step"] == max(losses(models / "train_log.jsonl")) >= start + 2, run
        assert not _temp_files(models) and not (models / "train.lock").exists(), os.listdir(models)


@pytest.mark.parametrize("procs", [2, 1])
def test_torchrun_ddp_on_cpu(tiny_copy, tmp_path, procs):
    """torchrun means DDP, one process included (that is how a single GPU exercises NCCL)."""
    models = tmp_path / "m"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "captioning"] + _train_cmd(tiny_copy, models, "--max-steps", "6")[3:]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = f"training on cpu ({procs} process{'es' if procs > 1 else ''}, DDP)"
    assert proc.stdout.count(expected) == 1, proc.stdout                # only rank 0 logs
    rows = [json.loads(line) for line in open(models / "train_log.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))  # one writer, no duplicates
    assert len([f for f in os.listdir(models / "tb") if f.startswith("events.")]) == 1   # and one TensorBoard file
    assert load_checkpoint(str(models / "last.ckpt"))["step"] == 6


def test_bad_data_dir_and_bad_overrides_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="COCO-layout"):
        train(small_config(tmp_path / "nowhere", tmp_path / "m"))
    proc = run_cli("train", "--set", "no_such_field=1", check=False)
    assert proc.returncode != 0 and "no_such_field" in proc.stderr
    proc = run_cli("train", "--set", "epochs=many", check=False)
    assert proc.returncode != 0 and "epochs expects int" in proc.stderr
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("imagenet")
    # out-of-range hyperparameters are refused by name before any work starts (no data dir is read)
    for args, field in ((["--lr", "-1"], "lr"), (["--set", "log_every=0"], "log_every"),
                        (["--epochs", "0"], "epochs"), (["--set", "max_seq_len=0"], "max_seq_len"),
                        (["--batch-size", "-3"], "batch_size"), (["--set", "lr_decay=1"], "lr_decay")):
        proc = run_cli("train", "--data-dir", tmp_path / "nowhere", *args, check=False)
        assert proc.returncode == 1 and proc.stderr.startswith(f"error: {field} must be"), (args, proc.stderr)
        assert "Traceback" not in proc.stderr and not (tmp_path / "nowhere").exists()


class _GRUDecoder(torch.nn.Module):
    """A decoder of the reader's own: not what captioning/model.py builds, with the chapter's interface."""

    def __init__(self, embedding_size, hidden_size, vocab_size, max_seq_len=20):
        super().__init__()
        self.embedding_layer = torch.nn.Embedding(vocab_size, embedding_size)
        self.lstm_layer = torch.nn.GRU(embedding_size, hidden_size, batch_first=True)
        self.linear_layer = torch.nn.Linear(hidden_size, vocab_size)
        self.max_seq_len = max_seq_len

    def forward(self, features, captions, lengths):
        inputs = torch.cat((features.unsqueeze(1), self.embedding_layer(captions)), 1)
        packed = torch.nn.utils.rnn.pack_padded_sequence(inputs, lengths, batch_first=True)
        return self.linear_layer(self.lstm_layer(packed)[0].data)

    def sample(self, features):
        ids, inputs, state = [], features.unsqueeze(1), None
        for _ in range(self.max_seq_len):
            out, state = self.lstm_layer(inputs, state)
            ids.append(self.linear_layer(out.squeeze(1)).argmax(-1))
            inputs = self.embedding_layer(ids[-1]).unsqueeze(1)
        return torch.stack(ids, 1)


def test_train_trains_prebuilt_modules_in_place_and_says_when_the_library_cannot_rebuild_them(tiny_copy, tmp_path,
                                                                                               capsys):
    from captioning.checkpoint import build_models
    from captioning.inference import caption_images
    from captioning.vocabulary import load_vocabulary

    config = small_config(tiny_copy, tmp_path / "m", epochs=1, **FROZEN)
    train(small_config(tiny_copy, tmp_path / "first", epochs=1, max_steps=1, **FROZEN))   # the vocabulary
    vocab = load_vocabulary(config.vocabulary_path)
    torch.manual_seed(0)
    decoder = _GRUDecoder(config.embedding_size, 24, len(vocab))
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    encoder = build_models(config, len(vocab))[0]
    capsys.readouterr()
    summary = train(config, encoder=encoder, decoder=decoder)
    out = capsys.readouterr().out
    saved = torch.load(summary["last"], weights_only=True)["decoder"]
    assert saved.keys() == before.keys() and saved["lstm_layer.weight_hh_l0"].shape == (72, 24)   # a GRU's gates
    assert all(torch.equal(saved[k], v) for k, v in decoder.state_dict().items())   # trained in place, saved
    assert not torch.equal(saved["linear_layer.weight"], before["linear_layer.weight"])
    assert "not what captioning/model.py builds" in out and "07, 08 or the CLI" in out
    images = sorted((tiny_copy / "val2014").iterdir())[:2]
    results = caption_images(images, encoder, decoder, vocab, config)      # greedy needs only sample()
    assert [error for _, _, error in results] == [None, None] and all(isinstance(c, str) for _, c, _ in results)
    # the library's own classes, prebuilt: no note
    capsys.readouterr()
    train(config, overwrite="delete", decoder=build_models(config, len(vocab))[1])
    assert "not what captioning/model.py builds" not in capsys.readouterr().out


def test_train_refuses_prebuilt_modules_that_do_not_fit(tiny_copy, tmp_path):
    from captioning.vocabulary import load_vocabulary

    config = small_config(tiny_copy, tmp_path / "m", epochs=1, **FROZEN)
    with pytest.raises(ValueError, match="needs its decoder too"):
        train(config, encoder=torch.nn.Linear(2, 2))
    train(small_config(tiny_copy, tmp_path / "first", epochs=1, max_steps=1, **FROZEN))   # the vocabulary
    words = len(load_vocabulary(config.vocabulary_path))
    with pytest.raises(ValueError, match=f"predicts {words + 5} words, but the vocabulary .* has {words}"):
        train(config, decoder=_GRUDecoder(config.embedding_size, 24, words + 5))
    assert not os.path.exists(tmp_path / "m" / "last.ckpt")


def test_min_steps_gives_a_small_set_more_epochs_and_an_explicit_epochs_is_kept(tiny_copy, tmp_path, capsys):
    # the tiny preset's recipe is a number of updates as much as of epochs: it keeps them on a smaller set
    assert get_config("tiny").min_steps > 0
    assert get_config("tiny", epochs=3).min_steps == 0                 # the epochs asked for, exactly
    assert get_config("tiny", epochs=3, min_steps=50).min_steps == 50
    assert get_config("tiny", objective="scst").min_steps == 0         # self-critical counts its own epochs
    summary = train(small_config(tiny_copy, tmp_path / "m", epochs=1, min_steps=20))   # 8 steps an epoch
    assert summary["epoch"] == 3 and summary["step"] == 24
    assert "training 3 epochs instead of 1, to reach min_steps=20" in capsys.readouterr().out
    card = (tmp_path / "m" / "README.md").read_text()
    assert "3 of 3 epochs done" in card
    assert train(small_config(tiny_copy, tmp_path / "n", epochs=1))["step"] == 8


def _rates(path):
    return [group["lr"] for group in torch.load(path, weights_only=True)["optimizer"]["param_groups"]]


def test_lr_decay_trains_the_last_epochs_at_a_tenth_and_a_resume_keeps_each_epochs_rate(tiny_copy, tmp_path,
                                                                                      capsys):
    tiny = get_config("tiny")
    assert [decay_epoch(tiny, e) for e in (1, 2, 3, 14, 28)] == [1, 2, 2, 11, 22]   # the last fifth, never the first
    assert decay_epoch(get_config("coco"), 5) == 5                                  # the chapter's: constant
    assert get_config("tiny", objective="scst").lr_decay == 0                       # as SCST's figures were measured
    for bad in (1, -0.1, True, "half"):
        with pytest.raises(ValueError, match="lr_decay must be"):
            get_config("tiny", lr_decay=bad)
    # 5 epochs of 6 steps with the last two at a tenth; stopped in epoch 1, then resumed to the end
    config = dict(FROZEN, epochs=5, lr_decay=0.4, lr=0.004, batch_size=50)
    first = train(small_config(tiny_copy, tmp_path / "m", max_steps=10, **config))
    assert "learning rates 0.004 until epoch 2, a tenth of that after" in capsys.readouterr().out
    assert first["step"] == 10 and _rates(first["last"]) == [0.004]
    done = train(small_config(tiny_copy, tmp_path / "m", max_steps=0, **config), resume=True)
    assert done["step"] == 30 and _rates(done["last"]) == [pytest.approx(0.0004)]
    # a resume into the decayed epochs that turns the decay off trains the rest at the full rate
    train(small_config(tiny_copy, tmp_path / "n", max_steps=22, **config))
    assert _rates(tmp_path / "n" / "last.ckpt") == [pytest.approx(0.0004)]
    off = train(small_config(tiny_copy, tmp_path / "n", max_steps=0, **{**config, "lr_decay": 0.0}), resume=True)
    assert "lr_decay 0.4 -> 0.0" in capsys.readouterr().out and _rates(off["last"]) == [0.004]
