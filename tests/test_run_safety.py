"""A run folder is never mixed or replaced unasked: the existing-run check, --overwrite, the lock,
the temporary files of a killed write, a torn log line, and the checks a resume makes first."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SMALL, cli_error, cli_main, run_cli
from test_training import _train_cmd, _wait_for_step, losses

from captioning.checkpoint import atomic_save, load_checkpoint
from captioning.config import get_config
from captioning.rundir import RunInUse, RunLock, read_log
from captioning.training import train
from captioning.viz import plot_training_log


def config(data, models, **kw):
    return get_config("tiny", data_dir=str(data), models_dir=str(models), **{**SMALL, **kw})


def test_a_fresh_run_refuses_a_folder_holding_a_run_and_overwrite_replaces_it(tiny_copy, tmp_path, capsys):
    models = tmp_path / "m"
    train(config(tiny_copy, models, max_steps=2))
    (models / "evaluation.json").write_text("{}")          # notebook 08's report of that run
    before = {n: (models / n).read_bytes() for n in ("last.ckpt", "best.ckpt", "train_log.jsonl", "README.md")}
    proc = run_cli(*_train_cmd(tiny_copy, models, "--max-steps", "3")[3:], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert all(word in proc.stderr for word in ("already holds a training run", "--resume", "--overwrite",
                                                "--models-dir")), proc.stderr
    assert "training on" not in proc.stdout                  # refused before any setup
    assert {n: (models / n).read_bytes() for n in before} == before
    with pytest.raises(FileExistsError, match="overwrite=True"):   # the library refuses the same way
        train(config(tiny_copy, models, max_steps=3))
    # overwrite: the old run's files are moved aside, best.ckpt included (no epoch ends in 3 steps: best = last)
    capsys.readouterr()
    train(config(tiny_copy, models, max_steps=3, log_every=1), overwrite=True)
    said = capsys.readouterr().out
    assert "moved the previous run (last.ckpt, best.ckpt, train_log.jsonl, evaluation.json, tb, README.md)" in said
    assert sorted(losses(models / "train_log.jsonl")) == [1, 2, 3]
    assert load_checkpoint(str(models / "best.ckpt"))["step"] == 3
    assert not (models / "evaluation.json").exists()
    [aside] = [p for p in models.iterdir() if p.name.startswith("previous-")]
    assert aside.name in said
    assert {n: (aside / n).read_bytes() for n in before} == before      # the first run, byte for byte
    assert (aside / "evaluation.json").read_text() == "{}" and (aside / "tb").is_dir()
    # the CLI's --overwrite moves aside too, into a folder of its own; only "--overwrite delete" deletes
    second = {n: (models / n).read_bytes() for n in before}
    cli_main(*_train_cmd(tiny_copy, models, "--max-steps", "1", "--overwrite")[3:])
    asides = sorted(p for p in models.iterdir() if p.name.startswith("previous-"))
    assert len(asides) == 2
    assert {n: (asides[1] / n).read_bytes() for n in before} == second
    capsys.readouterr()
    cli_main(*_train_cmd(tiny_copy, models, "--max-steps", "1", "--overwrite", "delete")[3:])
    assert "deleted the previous run's last.ckpt, best.ckpt, train_log.jsonl, tb, README.md" in capsys.readouterr().out
    assert sorted(p for p in models.iterdir() if p.name.startswith("previous-")) == asides   # untouched
    # the model card goes with its run; a README.md of the user's own is neither moved nor replaced
    (models / "README.md").write_text("my notes on these runs\n")
    cli_main(*_train_cmd(tiny_copy, models, "--max-steps", "1", "--overwrite")[3:])
    assert (models / "README.md").read_text() == "my notes on these runs\n"
    assert "the model card" in capsys.readouterr().out and (models / "best.ckpt").exists()
    with pytest.raises(ValueError, match="overwrite must be one of"):
        train(config(tiny_copy, models, max_steps=1), overwrite="yes")
    message = cli_error(*_train_cmd(tiny_copy, models, "--resume", "--overwrite")[3:])   # the flag reaches train
    assert "--resume and --overwrite contradict each other" in message


def test_epochs_below_one_are_refused(tmp_path):
    for value in ("0", "-1"):
        message = cli_error("train", "--data-dir", tmp_path / "nowhere", "--epochs", value)
        assert message.startswith("error: epochs must be an integer >= 1"), message


def test_resume_checks_come_before_any_expensive_work(tiny_copy, tmp_path):
    proc = run_cli(*_train_cmd(tiny_copy, tmp_path / "empty", "--resume")[3:], check=False)
    assert proc.returncode == 1 and "no checkpoint at" in proc.stderr and "last.ckpt" in proc.stderr
    assert not (tiny_copy / "vocabulary.pkl").exists() and not (tiny_copy / "resized_images").exists()
    assert not (tiny_copy / "features").exists()


def test_resume_with_another_batch_size_mid_epoch_is_refused(tiny_copy, tmp_path):
    models = tmp_path / "m"
    summary = train(config(tiny_copy, models, max_steps=3))              # 300 captions / 8: mid-epoch
    ckpt = load_checkpoint(summary["last"])
    assert ckpt["batch"] == 3 and ckpt["world_size"] == 1
    with pytest.raises(ValueError, match="batch_size 8: resuming with 16 would skip the wrong captions"):
        train(config(tiny_copy, models, max_steps=6, batch_size=16), resume=True)
    assert train(config(tiny_copy, models, max_steps=5), resume=True)["step"] == 5   # the same size resumes
    assert load_checkpoint(summary["last"])["step"] == 5
    state = torch.load(summary["last"], weights_only=True)
    del state["optimizer"]                                  # e.g. a checkpoint exported for inference
    torch.save(state, summary["last"])
    with pytest.raises(ValueError, match="cannot be resumed: it has no 'optimizer'"):
        train(config(tiny_copy, models, max_steps=6), resume=True)


def test_lock_keeps_a_second_owner_out_and_takes_over_stale_locks(tmp_path):
    folder = tmp_path / "m"
    lock = RunLock(str(folder)).acquire()
    owner = json.load(open(folder / "train.lock"))
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(RunInUse, match=f"PID {os.getpid()}"):
        RunLock(str(folder)).acquire()
    lock.release()
    assert not (folder / "train.lock").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                             # a PID that no longer runs
    (folder / "train.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    said = []
    with RunLock(str(folder)).acquire(log=said.append):
        assert json.load(open(folder / "train.lock"))["pid"] == os.getpid()
    assert said and "stale lock" in said[0] and str(dead.pid) in said[0]

    # our own PID, but a process that started at another time: the PID was reused
    (folder / "train.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": 1}))
    if os.path.exists("/proc/self/stat"):
        RunLock(str(folder)).acquire(log=said.append).release()
    (folder / "train.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(RunInUse, match="on host elsewhere"):
        RunLock(str(folder)).acquire()
    (folder / "train.lock").write_text("")                  # torn: being written now, or left by a crash
    with pytest.raises(RunInUse, match="being locked"):
        RunLock(str(folder)).acquire()
    os.utime(folder / "train.lock", (time.time() - 60,) * 2)
    RunLock(str(folder)).acquire(log=said.append).release()
    assert "unreadable lock" in said[-1]


def test_a_second_trainer_is_kept_out_and_a_killed_ones_files_are_cleaned(tiny_copy, tmp_path, capsys):
    models = tmp_path / "m"
    first = subprocess.Popen(_train_cmd(tiny_copy, models, "--epochs", "50", "--save-every", "1"), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(models / "train_log.jsonl", 2, first)
        second = run_cli(*_train_cmd(tiny_copy, models, "--resume")[3:], check=False)
        assert second.returncode == 1 and f"another training run (PID {first.pid})" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert first.poll() is None                          # the first one never noticed
    finally:
        first.kill()                                         # kill -9: the lock and maybe a temp file stay
        first.wait()
    assert json.load(open(models / "train.lock"))["pid"] == first.pid
    ours = ["last.ckpt.k9x_2ab7.tmp", "best.ckpt.0a1b2c3d.tmp"]
    others = ["notes.tmp", "last.ckpt.tmp", "mine.ckpt.abcdefgh.tmp"]
    for name in ours + others:
        (models / name).write_bytes(b"half a checkpoint")
    saved = load_checkpoint(str(models / "last.ckpt"))["step"]
    # a torn last line in the log, as a kill during its write leaves it
    with open(models / "train_log.jsonl", "a") as f:
        f.write('{"step": 99999, "epoch": 0, "lo')
    assert 99999 not in [r["step"] for r in read_log(str(models / "train_log.jsonl"))]   # readers skip it
    plot_training_log(str(models / "train_log.jsonl"))
    capsys.readouterr()
    resume = get_config("tiny", data_dir=str(tiny_copy), models_dir=str(models), max_steps=saved + 2,
                        progress=False)                    # the rest from the checkpoint (the CLI's settings)
    train(resume, resume=True)
    said = capsys.readouterr().out
    assert "stale lock" in said and str(first.pid) in said
    removed = re.search(r"removed (\d+) temporary file\(s\)", said)    # ours, and the kill's own if any
    assert removed and int(removed.group(1)) >= 2 and "dropped 1 unreadable line" in said, said
    left = sorted(os.listdir(models))
    assert not any(name in left for name in ours) and all(name in left for name in others)
    assert "train.lock" not in left                          # released at exit
    assert sorted(losses(models / "train_log.jsonl")) == list(range(1, saved + 3))


def test_checkpoints_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_save({"step": 1}, str(tmp_path / "last.ckpt"))
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o640          # not mkstemp's 0600



def test_a_new_vocab_threshold_rebuilds_the_vocabulary_and_a_resume_keeps_its_own(tiny_copy, tmp_path, capsys):
    from captioning.vocabulary import load_vocabulary

    first = train(config(tiny_copy, tmp_path / "a", max_steps=1))                      # vocab_threshold=1
    words = load_vocabulary(str(tiny_copy / "vocabulary.pkl")).words()
    capsys.readouterr()
    second = train(config(tiny_copy, tmp_path / "b", max_steps=1, vocab_threshold=100))
    assert "rebuilding it" in capsys.readouterr().out
    rebuilt = load_vocabulary(str(tiny_copy / "vocabulary.pkl")).words()
    ckpt = load_checkpoint(second["last"])
    assert len(rebuilt) < len(words) and ckpt["vocab"] == rebuilt and ckpt["config"]["vocab_threshold"] == 100
    with pytest.raises(ValueError, match="vocab_threshold 1 -> 100"):
        train(config(tiny_copy, tmp_path / "a", max_steps=2, vocab_threshold=100), resume=True)
    assert load_vocabulary(str(tiny_copy / "vocabulary.pkl")).words() == rebuilt      # refused before a rebuild
    assert load_checkpoint(first["last"])["vocab"] == words


def test_a_resume_that_would_change_the_run_is_refused_first_naming_every_field(tiny_copy, tmp_path):
    models = tmp_path / "m"
    train(config(tiny_copy, models, max_steps=3))                          # mid-epoch, crop 32, 16 views
    features = sorted(os.listdir(tiny_copy / "features"))
    before = (models / "last.ckpt").read_bytes()
    started = time.time()
    message = cli_error(*_train_cmd(tiny_copy, models, "--resume", "--set", "crop_size=28", "--cache-views", "3")[3:])
    assert time.time() - started < 20
    assert "crop_size 32 -> 28" in message and "cache_views 16 -> 3" in message, message
    assert "last.ckpt" in message and "--overwrite" in message
    assert sorted(os.listdir(tiny_copy / "features")) == features          # no cache extracted
    assert (models / "last.ckpt").read_bytes() == before


def test_a_resume_keeps_the_checkpoints_settings_and_applies_a_new_learning_rate(tiny_copy, tmp_path, capsys):
    models = tmp_path / "m"
    train(config(tiny_copy, models, max_steps=3, lr=1e-3))
    # only max_steps and lr given: every other field is the checkpoint's, not the tiny preset's
    given = get_config("tiny", data_dir=str(tiny_copy), models_dir=str(models), max_steps=5, lr=5e-4,
                       progress=False)
    assert given.embedding_size != SMALL["embedding_size"]
    capsys.readouterr()
    summary = train(given, resume=True)
    assert "changed on resume: lr 0.001 -> 0.0005, max_steps 3 -> 5" in capsys.readouterr().out
    ckpt = load_checkpoint(summary["last"])
    assert summary["step"] == 5 and ckpt["config"]["embedding_size"] == SMALL["embedding_size"]
    assert ckpt["config"]["lr"] == 5e-4 and ckpt["config"]["batch_size"] == SMALL["batch_size"]
    assert all(g["lr"] == 5e-4 for g in ckpt["optimizer"]["param_groups"])     # applied, not undone
    rows = read_log(str(models / "train_log.jsonl"))
    assert {"step": 3, "epoch": 0, "changed_on_resume": {"lr": [1e-3, 5e-4], "max_steps": [3, 5]}} in rows
    assert [r["step"] for r in rows if "loss" in r] == [3, 5]          # log_every 10: the last steps


def test_every_config_field_has_one_place_in_the_resume_rules():
    import dataclasses

    from captioning.config import EXECUTION_FIELDS, OPTIMISATION_FIELDS, SHAPING_FIELDS, Config

    groups = SHAPING_FIELDS + OPTIMISATION_FIELDS + EXECUTION_FIELDS
    assert sorted(groups) == sorted(f.name for f in dataclasses.fields(Config))     # each field, once


def _sigterm_run(tiny_copy, models, *extra, launcher=()):
    """Train (every step saves) until step 2 is logged, then SIGTERM, as docker stop does; returns (proc, out)."""
    proc = subprocess.Popen([*launcher, *(_train_cmd(tiny_copy, models, "--epochs", "50", "--save-every", "1",
                                                     *extra)[(3 if launcher else 0):])],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_for_step(models / "train_log.jsonl", 2, proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc, out


def test_sigterm_saves_like_ctrl_c_exits_143_and_the_run_resumes_from_its_step(tiny_copy, tmp_path):
    models = tmp_path / "m"
    proc, out = _sigterm_run(tiny_copy, models)
    assert proc.returncode == 143, out
    assert "SIGTERM: stopped at step" in out and "Traceback" not in out, out
    saved = load_checkpoint(str(models / "last.ckpt"))["step"]
    assert saved == max(losses(models / "train_log.jsonl")) >= 2
    assert not (models / "train.lock").exists() and not [n for n in os.listdir(models) if n.endswith(".tmp")]
    resumed = train(get_config("tiny", data_dir=str(tiny_copy), models_dir=str(models), max_steps=saved + 2,
                               progress=False), resume=True)
    assert resumed["step"] == saved + 2 and sorted(losses(models / "train_log.jsonl")) == list(range(1, saved + 3))


def test_a_stop_signal_during_a_write_waits_for_it(tmp_path):
    """SIGTERM or SIGINT inside atomic_save: the file is written whole first, then the signal acts
    (a handler is called; with none, the process ends by it once the file is complete)."""
    script = f"""
import os, signal, sys
from captioning.atomic import interrupts_deferred
from captioning.checkpoint import atomic_save, load_checkpoint
seen = []
if sys.argv[1] == "handler":
    signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
with interrupts_deferred():
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)             # a second, impatient signal
    atomic_save({{"config": {{}}, "vocab": [], "encoder": {{}}, "decoder": {{}}, "n": 7}},
                {str(tmp_path)!r} + "/x.ckpt")
    print("written", seen, flush=True)
print("after", seen, load_checkpoint({str(tmp_path)!r} + "/x.ckpt")["n"], flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script, "handler"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.split("\n")[:2] == ["written []", "after [15] 7"], proc
    assert "SIGTERM: finishing the checkpoint write first" in proc.stderr
    os.remove(tmp_path / "x.ckpt")
    proc = subprocess.run([sys.executable, "-c", script, "default"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGTERM and proc.stdout == "written []\n", proc
    assert load_checkpoint(str(tmp_path / "x.ckpt"))["n"] == 7


def test_sigterm_under_torchrun_stops_every_rank_at_the_same_step(tiny_copy, tmp_path):
    models = tmp_path / "m"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "captioning"]
    proc, out = _sigterm_run(tiny_copy, models, launcher=launcher)
    assert "SIGTERM: stopped at step" in out and proc.returncode != 0, out
    saved = load_checkpoint(str(models / "last.ckpt"))
    assert saved["step"] == max(losses(models / "train_log.jsonl")) >= 2 and saved["world_size"] == 2
    assert not (models / "train.lock").exists()


def test_a_resume_on_other_data_or_from_a_newer_checkpoint_is_refused(tiny_copy, tmp_path):
    models = tmp_path / "m"
    summary = train(config(tiny_copy, models, max_steps=2))
    ckpt = torch.load(summary["last"], weights_only=True)
    assert ckpt["schema"] == 2 and len(ckpt["data"]["train_captions_sha1"]) == 40
    captions = tiny_copy / "annotations" / "captions_train2014.json"
    data = json.loads(captions.read_text())
    data["annotations"][0]["caption"] = "a different caption altogether"
    captions.write_text(json.dumps(data))
    message = cli_error(*_train_cmd(tiny_copy, models, "--resume")[3:])
    assert "was trained on other data" in message and str(captions) in message, message
    ckpt["schema"] = 3                                          # written by a future version
    torch.save(ckpt, summary["last"])
    message = cli_error("caption", str(tiny_copy / "val2014"), "--checkpoint", summary["last"])
    assert "written by a newer version of this project (checkpoint schema 3; this one reads up to 2)" in message


def test_an_early_checkpoint_is_kept_for_the_notebooks_and_moved_aside_with_the_run(tiny_copy, tmp_path):
    models = tmp_path / "m"
    summary = train(config(tiny_copy, models, epochs=3, batch_size=64, keep_epoch=1))
    early = load_checkpoint(str(models / "early.ckpt"))
    steps_per_epoch = -(-300 // 64)
    assert early["epoch"] == 1 and early["step"] == steps_per_epoch < summary["step"] == 3 * steps_per_epoch
    train(config(tiny_copy, models, epochs=1, batch_size=64, keep_epoch=1), overwrite=True)   # ends at epoch 1
    [aside] = [p for p in models.iterdir() if p.name.startswith("previous-")]
    assert (aside / "early.ckpt").exists() and not (models / "early.ckpt").exists()   # no copy of last.ckpt
