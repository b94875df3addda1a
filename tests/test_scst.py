"""Self-critical training: the sampling, the reward, the loss, and a run started from a cross-entropy checkpoint."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SMALL, cli_error

from captioning.checkpoint import load_checkpoint
from captioning.config import SCST_PRESETS, get_config, initialised_config
from captioning.decoding import START_ID, cut_after_end, sample_captions
from captioning.model import LSTMModel
from captioning.rundir import read_log
from captioning.scst import Rewards, mean_of_others, reinforce_loss, words_of
from captioning.training import train
from captioning.vocabulary import END_ID, Vocab

SCST = dict(objective="scst", epochs=2, batch_size=8, log_every=1, lr=5e-4)


def test_sampling_draws_from_the_decoder_and_keeps_the_graph():
    torch.manual_seed(0)
    decoder = LSTMModel(8, 16, 12, 1, max_seq_len=7)
    features = torch.randn(3, 8)
    drawn = sample_captions(decoder, features, samples=4)
    assert drawn.ids.shape == drawn.log_probs.shape == drawn.mask.shape and drawn.ids.shape[0] == 12
    assert drawn.ids.shape[1] <= 6                                     # max_seq_len - 1 words after <start>
    for ids, mask, finished in zip(drawn.ids.tolist(), drawn.mask.tolist(), drawn.finished.tolist()):
        words = [i for i, m in zip(ids, mask) if m]
        assert finished == (END_ID in words) and (END_ID not in words[:-1])   # the mask stops at <end>
        assert all(i == 0 for i, m in zip(ids, mask) if not m)              # <pad> after it
    drawn.log_probs[drawn.mask].sum().backward()                            # REINFORCE needs this gradient
    assert decoder.linear_layer.weight.grad is not None and decoder.linear_layer.weight.grad.abs().sum() > 0
    # the draws vary; greedy=True is the greedy search, word for word
    assert len({tuple(r) for r in sample_captions(decoder, features[:1], samples=20).ids.tolist()}) > 1
    with torch.no_grad():
        greedy = sample_captions(decoder, features, greedy=True)
        _, state = decoder.init_state(features)                       # the likeliest words after <start>
        tokens, expected = torch.full((3,), START_ID), []
        for _ in range(6):
            log_probs, state = decoder.step(tokens, state)
            tokens = log_probs.argmax(-1)
            expected.append(tokens)
    expected = [cut_after_end(row) for row in torch.stack(expected, 1).tolist()]
    for ids, mask, want in zip(greedy.ids.tolist(), greedy.mask.tolist(), expected):
        assert [i for i, m in zip(ids, mask) if m] == want
    with pytest.raises(ValueError, match="samples"):
        sample_captions(decoder, features, samples=0)


def test_mean_of_others_baseline_and_the_reinforce_step_make_a_better_caption_likelier():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 16.0])
    assert torch.allclose(mean_of_others(rewards, 3), torch.tensor([2.5, 2.0, 1.5, 13.0, 13.0, 10.0]))
    # one step on a two-word choice: the caption rewarded above its baseline gains probability
    logits = torch.zeros(2, 5, requires_grad=True)                   # two captions, one word each
    choice = torch.tensor([1, 3])
    log_probs = logits.log_softmax(-1).gather(1, choice[:, None])    # (2, 1)
    loss = reinforce_loss(log_probs, torch.ones(2, 1, dtype=torch.bool), torch.tensor([1.0, 0.0]),
                          torch.tensor([0.5, 0.5]))
    loss.backward()
    with torch.no_grad():
        after = (logits - 0.1 * logits.grad).softmax(-1)
    assert after[0, 1] > 0.2 and after[1, 3] < 0.2                   # 0.2: uniform over 5 words before
    # words past <end> (mask False) carry no gradient
    logits.grad = None
    log_probs = logits.log_softmax(-1).gather(1, choice[:, None])
    reinforce_loss(log_probs, torch.tensor([[True], [False]]), torch.tensor([1.0, 5.0]),
                   torch.tensor([0.0, 0.0])).backward()
    assert logits.grad[1].abs().sum() == 0


def test_the_reward_is_cider_d_with_end_and_nothing_for_a_cut_off_caption():
    vocab = Vocab.from_words(["<pad>", "<start>", "<end>", "<unk>", "a", "red", "circle", "left", "of", "blue",
                              "square", "to", "the"])
    refs = [["a red circle to the left of a blue square", "a red circle left of a blue square"],
            ["a blue square", "the blue square"], ["a red circle", "a circle"]]
    rewards = Rewards(refs)

    def ids(text, end=True):
        return [vocab(w) for w in text.split()] + ([END_ID] if end else [])

    rows = [0, 0, 0, 0]
    texts = ["a red circle to the left of a blue square", "a red circle to the left of a",
             "a blue square", "a red circle to the left of a blue square"]
    batch = torch.zeros(4, 12, dtype=torch.long)
    for r, t in enumerate(texts):
        seq = ids(t)
        batch[r, :len(seq)] = torch.tensor(seq)
    finished = torch.tensor([True, True, True, False])                # the last one was cut off
    got = rewards(batch, finished, rows, vocab)
    assert words_of(batch[1].tolist(), vocab) == texts[1].split()
    assert got[0] > got[1] > 0 and got[0] > got[2] and got[3] == 0
    # exactly CIDEr-D with <end> appended to the caption and to the references
    assert got[0] == pytest.approx(rewards.cider.score([texts[0] + " <end>"], [[r + " <end>" for r in refs[0]]])[0])


def test_scst_settings_are_checked_and_bring_their_own_defaults():
    tiny = get_config("tiny", objective="scst")
    for name, value in SCST_PRESETS["tiny"].items():
        assert getattr(tiny, name) == value
    assert get_config("tiny", objective="scst", lr=0.01).lr == 0.01            # a given value wins
    assert get_config("tiny").lr != SCST_PRESETS["tiny"]["lr"]                  # cross-entropy keeps its own
    assert get_config("coco", objective="scst").lr == 5e-5
    with pytest.raises(ValueError, match="objective must be one of"):
        get_config("tiny", objective="cider")
    with pytest.raises(ValueError, match="scst_samples >= 2"):
        get_config("tiny", objective="scst", scst_samples=1)
    assert get_config("tiny", objective="scst", scst_samples=1, scst_baseline="greedy").scst_samples == 1
    with pytest.raises(ValueError, match="scst_baseline must be one of"):
        get_config("tiny", scst_baseline="max")


def test_init_from_takes_the_model_and_data_from_the_checkpoint(tmp_path):
    saved = get_config("tiny", data_dir="data_dir/relations", decoder="attention", hidden_layer_size=64,
                       models_dir="models_dir/rel").hyperparameters()
    ckpt = str(tmp_path / "rel" / "best.ckpt")
    config = initialised_config(saved, get_config("tiny", objective="scst"), ckpt)
    assert (config.decoder, config.hidden_layer_size, config.data_dir) == ("attention", 64, "data_dir/relations")
    assert config.objective == "scst" and config.lr == SCST_PRESETS["tiny"]["lr"]
    assert config.models_dir == str(tmp_path / "rel-scst")                        # beside it, never in it
    with pytest.raises(ValueError, match=r"hidden_layer_size 64 -> 32.*decoder 'attention' -> 'lstm'|"
                                         r"decoder 'attention' -> 'lstm'.*hidden_layer_size 64 -> 32"):
        initialised_config(saved, get_config("tiny", objective="scst", decoder="lstm", hidden_layer_size=32), ckpt)
    given = get_config("tiny", objective="scst", models_dir=str(tmp_path / "new"), scst_samples=3)
    config = initialised_config(saved, given, ckpt)
    assert config.models_dir == str(tmp_path / "new") and config.scst_samples == 3


def _xe_run(data, models, **kw):
    return train(get_config("tiny", data_dir=str(data), models_dir=str(models),
                            **{**SMALL, "weights": None, "epochs": 2, "log_every": 1, "cache_views": 2, **kw}))


def test_scst_fine_tunes_a_checkpoint_into_a_new_folder_and_resumes_exactly(tiny_copy, tmp_path):
    xe = _xe_run(tiny_copy, tmp_path / "xe")
    before = load_checkpoint(xe["best"])
    config = get_config("tiny", models_dir=str(tmp_path / "scst"), progress=False, **SCST)
    summary = train(config, init_from=xe["best"])
    ckpt = load_checkpoint(summary["last"])
    assert ckpt["config"]["objective"] == "scst" and ckpt["config"]["hidden_layer_size"] == SMALL["hidden_layer_size"]
    assert ckpt["init_from"]["path"] == os.path.abspath(xe["best"]) and ckpt["init_from"]["objective"] == "xe"
    rows = read_log(summary["log"])
    steps = [r for r in rows if "reward" in r]
    assert steps and all({"reward", "baseline", "sample_length", "finished", "loss", "xe"} <= set(r) for r in steps)
    assert abs(sum(r["reward"] - r["baseline"] for r in steps)) < 1e-3 * len(steps)   # the others' mean: same mean
    vals = [r for r in rows if "val_cider" in r]
    assert [r["epoch"] for r in vals] == [-1, 0, 1]                  # the starting point, then each epoch
    best = max(r["val_cider"] for r in vals)
    assert summary["best_val_cider"] == pytest.approx(best) == load_checkpoint(summary["best"])["best_val_cider"]
    # the XE checkpoint is untouched, and the SCST run changed the weights
    assert all(torch.equal(before["decoder"][k], load_checkpoint(xe["best"])["decoder"][k]) for k in before["decoder"])
    assert any(not torch.equal(before["decoder"][k], ckpt["decoder"][k]) for k in before["decoder"])
    events = os.listdir(tmp_path / "scst" / "tb")
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(tmp_path / "scst" / "tb")).Reload().Tags()["scalars"]
    assert {"train/reward", "train/baseline", "train/sample_length", "val/cider"} <= set(tags)

    # stopped after 5 steps and resumed: the same run as the uninterrupted one
    half = get_config("tiny", models_dir=str(tmp_path / "half"), progress=False, max_steps=5, **SCST)
    train(half, init_from=xe["best"])
    resumed = train(get_config("tiny", models_dir=str(tmp_path / "half"), progress=False, max_steps=0,
                               data_dir=str(tiny_copy)), resume=True)
    a = {r["step"]: r["reward"] for r in rows if "reward" in r}
    b = {r["step"]: r["reward"] for r in read_log(resumed["log"]) if "reward" in r}
    assert sorted(a) == sorted(b) and max(abs(a[s] - b[s]) for s in a) < 1e-4
    assert load_checkpoint(resumed["last"])["init_from"] == ckpt["init_from"]

    # the paper's baseline, the greedy caption's reward, and plain SCST without the cross-entropy term
    greedy = train(get_config("tiny", models_dir=str(tmp_path / "greedy"), progress=False, max_steps=3,
                              scst_baseline="greedy", scst_xe=0.0, **SCST), init_from=xe["best"])
    steps = [r for r in read_log(greedy["log"]) if "reward" in r]
    assert len(steps) == 3 and all("xe" not in r for r in steps)
    assert any(abs(r["reward"] - r["baseline"]) > 1e-3 for r in steps)


def test_scst_refuses_what_would_mix_or_lose_runs(tiny_copy, tmp_path):
    xe = _xe_run(tiny_copy, tmp_path / "xe", epochs=1)
    best = open(xe["best"], "rb").read()
    with pytest.raises(ValueError, match="is the folder that holds --init-from"):
        train(get_config("tiny", models_dir=str(tmp_path / "xe"), **SCST), init_from=xe["best"])
    with pytest.raises(ValueError, match="--resume continues a run"):
        train(get_config("tiny", models_dir=str(tmp_path / "n"), **SCST), init_from=xe["best"], resume=True)
    with pytest.raises(ValueError, match="fine-tunes a trained model"):
        train(get_config("tiny", data_dir=str(tiny_copy), models_dir=str(tmp_path / "n"), **SCST))
    with pytest.raises(ValueError, match="embedding_size"):
        train(get_config("tiny", models_dir=str(tmp_path / "n"), embedding_size=99, **SCST), init_from=xe["best"])
    message = cli_error("train", "--init-from", xe["best"], "--objective", "scst", "--models-dir", tmp_path / "xe",
                        "--overwrite", "delete")
    assert "is the folder that holds --init-from" in message
    assert open(xe["best"], "rb").read() == best                     # --overwrite delete never reached it



def test_scst_under_torchrun_on_cpu(tiny_copy, tmp_path):
    """Two processes (DDP over gloo): the draws go through DistributedDataParallel's forward, rank 0 alone
    validates, logs and saves, and the ranks stay in step."""
    xe = _xe_run(tiny_copy, tmp_path / "xe", epochs=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "captioning",
           "train", "--init-from", xe["best"], "--objective", "scst", "--models-dir", str(tmp_path / "scst"),
           "--batch-size", "4", "--max-steps", "6", "--log-every", "1", "--progress", "false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("training on cpu (2 processes, DDP)") == 1, proc.stdout
    rows = read_log(str(tmp_path / "scst" / "train_log.jsonl"))
    assert [r["step"] for r in rows if "reward" in r] == list(range(1, 7))
    assert [r["epoch"] for r in rows if "val_cider" in r] == [-1]
    assert load_checkpoint(str(tmp_path / "scst" / "last.ckpt"))["step"] == 6
