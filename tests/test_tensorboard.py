"""train() writes TensorBoard event files that hold what train_log.jsonl holds, plus sample captions."""
import json
import os

from conftest import SMALL
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from captioning.config import get_config
from captioning.training import train


def small(data, models, **kw):
    return get_config("tiny", data_dir=str(data), models_dir=str(models), weights=None, log_every=1,
                      **{**SMALL, **kw})


def board(tb_dir):
    """What TensorBoard shows: {tag: {step: value}} of the scalars, and {step: text} of the sample captions."""
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    texts = {e.step: e.tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"] if tag.startswith("samples")
             for e in acc.Tensors(tag)}
    return scalars, texts


def jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_events_hold_the_losses_learning_rate_and_sample_captions_of_each_epoch(tiny_copy, tmp_path):
    summary = train(small(tiny_copy, tmp_path / "m", epochs=2, batch_size=64))   # 300 captions: 5 steps an epoch
    scalars, texts = board(tmp_path / "m" / "tb")
    rows = jsonl(summary["log"])
    train_rows = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(scalars["train/loss"]) == sorted(train_rows) == list(range(1, 11))
    assert all(abs(scalars["train/loss"][s] - r["loss"]) < 1e-5 for s, r in train_rows.items())
    assert all(abs(scalars["train/perplexity"][s] / r["perplexity"] - 1) < 1e-5 for s, r in train_rows.items())
    assert all(abs(v - get_config("tiny").lr) < 1e-9 for v in scalars["lr/head"].values())
    assert sorted(scalars["lr/head"]) == list(range(1, 11)) and "lr/backbone" not in scalars   # frozen: one group
    val_rows = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(scalars["val/loss"]) == sorted(val_rows) == [5, 10]
    assert all(abs(scalars["val/loss"][s] - v) < 1e-5 for s, v in val_rows.items())
    assert sorted(texts) == [5, 10]                                          # captions at each epoch end
    first_val = sorted(os.listdir(tiny_copy / "val2014"))[:4]                  # the same fixed val images
    for text in texts.values():
        lines = text.splitlines()
        assert lines[0] == "| image | greedy caption | a reference |" and len(lines) == 2 + 4
        assert [line.split(" | ")[0].strip("| ") for line in lines[2:]] == first_val
        assert all(line.split(" | ")[1].strip() for line in lines[2:])          # a caption in each row


def test_a_resume_hides_events_after_its_checkpoint_and_a_fresh_run_starts_over(tiny_copy, tmp_path):
    models = tmp_path / "m"
    train(small(tiny_copy, models, epochs=3, max_steps=3))
    with SummaryWriter(str(models / "tb")) as stale:       # what an interrupted run logged after its last checkpoint
        stale.add_scalar("train/loss", 123.0, 5)
    summary = train(small(tiny_copy, models, epochs=3, max_steps=6), resume=True)
    scalars, _ = board(models / "tb")
    losses = {r["step"]: r["loss"] for r in jsonl(summary["log"]) if "loss" in r}
    assert sorted(scalars["train/loss"]) == list(range(1, 7))
    assert abs(scalars["train/loss"][5] - losses[5]) < 1e-5 and scalars["train/loss"][5] != 123.0

    train(small(tiny_copy, models, epochs=3, max_steps=2), overwrite=True)   # fresh: the old events go
    assert sorted(board(models / "tb")[0]["train/loss"]) == [1, 2]
    train(small(tiny_copy, tmp_path / "off", max_steps=1, tensorboard=False))
    assert not os.path.exists(tmp_path / "off" / "tb") and os.path.exists(tmp_path / "off" / "last.ckpt")


def test_make_tensorboard_serves_the_models_dir_headless_and_prints_its_url(tmp_path):
    """As `make lab`: no display, maybe root. The URL it prints must answer and show the runs."""
    import subprocess
    import time
    import urllib.request

    from conftest import ROOT, free_port, http_status, make_server

    dry = subprocess.run(["make", "-n", "tensorboard"], cwd=ROOT, capture_output=True, text=True)
    assert "tensorboard --logdir models_dir --port" in dry.stdout                 # the default: every dataset
    with SummaryWriter(str(tmp_path / "tiny" / "tb")) as writer:
        writer.add_scalar("train/loss", 1.5, 1)
    port = free_port()
    with make_server(["tensorboard", f"TB_ARGS=--port {port}", f"TB_LOGDIR={tmp_path}"],
                     rf"(http://localhost:{port}/)") as (match, seen):
        assert any(f"ssh -L {port}:localhost:{port}" in line for line in seen)   # the port-forward hint
        assert http_status(match.group(1)) == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/logdir", timeout=10) as r:
            assert json.load(r)["logdir"] == str(tmp_path)
        deadline = time.time() + 30                                            # it finds the run
        while "tiny/tb" not in urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=10).read().decode():
            assert time.time() < deadline, "the run never appeared"
            time.sleep(1)
