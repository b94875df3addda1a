import json
import os
import shutil

import pytest
import torch
import torchvision
from conftest import SMALL, cli_error, run_cli
from PIL import Image

from captioning.checkpoint import load_captioner
from captioning.config import Config, get_config
from captioning.evaluation import blind_baseline, evaluate_checkpoint, heldout_split, score_captions
from captioning.java import java_available
from captioning.training import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("trained")
    data = root / "tiny"
    shutil.copytree(tiny_data, data)
    summary = train(get_config("tiny", data_dir=str(data), models_dir=str(root / "m"), max_steps=40, **SMALL))
    return data, summary["best"]


@pytest.fixture
def image_dir(tmp_path, trained):
    data, _ = trained
    folder = tmp_path / "imgs"
    folder.mkdir()
    for src in sorted((data / "val2014").iterdir())[:2]:
        shutil.copy(src, folder / src.name)
    Image.open(folder / src.name).convert("L").save(folder / "gray.png")
    Image.open(folder / src.name).convert("CMYK").save(folder / "cmyk.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


def test_caption_cli_reports_bad_files_and_captions_the_rest(trained, image_dir):
    _, ckpt = trained
    proc = run_cli("caption", image_dir, "--checkpoint", ckpt, "--beam", 2, check=False)
    assert proc.returncode == 1
    assert "broken.jpg" in proc.stderr
    lines = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert sorted(p.split("/")[-1] for p, _ in lines) == sorted(
        f.name for f in image_dir.iterdir() if f.name != "broken.jpg")
    assert all(c.strip() and "<start>" not in c and "<end>" not in c for _, c in lines)


def test_caption_cli_json(trained, image_dir):
    _, ckpt = trained
    proc = run_cli("caption", image_dir / "gray.png", image_dir / "cmyk.jpg", "--checkpoint", ckpt, "--json",
                   "--beam", 1)
    items = json.loads(proc.stdout)
    assert [i["image"].split("/")[-1] for i in items] == ["gray.png", "cmyk.jpg"]
    assert all(isinstance(i["caption"], str) and "<" not in i["caption"] for i in items)


def test_caption_cli_clear_errors(trained, tmp_path, image_dir):
    _, ckpt = trained
    proc = run_cli("caption", image_dir, "--checkpoint", tmp_path / "nope.ckpt", check=False)
    assert proc.returncode != 0 and "checkpoint not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("caption", tmp_path / "no_such.jpg", "--checkpoint", ckpt, check=False)
    assert proc.returncode != 0 and "no_such.jpg" in proc.stderr
    # a missing file beside good ones: the good ones are still captioned, and the exit code says 1
    proc = run_cli("caption", image_dir / "gray.png", tmp_path / "no_such.jpg", "--checkpoint", ckpt, check=False)
    assert proc.returncode == 1 and "no_such.jpg" in proc.stderr and proc.stdout.startswith(str(image_dir / "gray.png"))
    # a FIFO named like an image is skipped, not opened (opening it would block forever)
    os.mkfifo(image_dir / "pipe.jpg")
    proc = run_cli("caption", image_dir, "--checkpoint", ckpt, check=False, timeout=120)
    assert "pipe.jpg" not in proc.stdout and "gray.png" in proc.stdout
    torch.save(5, tmp_path / "five.ckpt")                 # loads, but is no checkpoint
    proc = run_cli("caption", image_dir, "--checkpoint", tmp_path / "five.ckpt", check=False)
    assert proc.returncode == 1 and "holds int, not a dict" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("--debug", "caption", image_dir, "--checkpoint", tmp_path / "five.ckpt", check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr          # --debug shows where
    bad = torch.load(ckpt, weights_only=True)
    bad["vocab"] = bad["vocab"][:-3]
    torch.save(bad, tmp_path / "mismatch.ckpt")
    with pytest.raises(ValueError, match="does not match"):
        load_captioner(str(tmp_path / "mismatch.ckpt"))


def test_evaluate_cli_writes_metrics_and_coco_results(trained, tmp_path):
    _, ckpt = trained
    out, results = tmp_path / "metrics.json", tmp_path / "results.json"
    proc = run_cli("evaluate", "--checkpoint", ckpt, "--beam", 2, "--out", out, "--results", results)
    written = json.load(open(out))
    metrics = written["metrics"]
    assert set(metrics) >= {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert "CIDEr" in proc.stdout
    rows = json.load(open(results))
    assert len(rows) == 16 and set(rows[0]) == {"image_id", "caption"}
    semantic = written["semantic"]  # the tiny set knows its truth: semantic accuracy comes with the metrics
    assert semantic["counts"]["images"] == 16 and len(semantic["per_image"]) == 16
    assert 0 <= semantic["objects"] <= 1 and "semantic accuracy (16 images" in proc.stdout


def test_evaluate_without_ground_truth_has_no_semantic_block(trained, tmp_path):
    data, ckpt = trained
    plain = tmp_path / "plain"
    shutil.copytree(data, plain, ignore=shutil.ignore_patterns("features", "resized_images"))
    path = plain / "annotations" / "captions_val2014.json"
    coco = json.load(open(path))
    coco["images"] = [{k: img[k] for k in ("id", "file_name", "width", "height")} for img in coco["images"]]
    path.write_text(json.dumps(coco))
    r = evaluate_checkpoint(ckpt, beam_size=1, progress=False, max_images=4, data_dir=str(plain))
    assert r["semantic"] is None and len(r["predictions"]) == 4
    r = evaluate_checkpoint(ckpt, beam_size=1, progress=False, max_images=4, data_dir=str(data))
    assert r["semantic"]["counts"]["images"] == 4
    assert set(r["semantic"]["per_image"]) == set(r["predictions"])


def test_metrics_reward_the_right_caption():
    """With Java where it is installed (PTB tokenizer, METEOR), and always without it."""
    refs = {1: ["a red circle to the left of a blue square", "A red circle and a blue square."],
            2: ["a green triangle above a yellow circle", "The green triangle is above the yellow circle"]}
    right = {1: "a red circle to the left of a blue square", 2: "a green triangle above a yellow circle"}
    wrong = {1: "a green triangle above a yellow circle", 2: "a red circle to the left of a blue square"}
    no_java, per_image = score_captions(refs, right, use_java=False, log=lambda *a: None)
    bad, _ = score_captions(refs, wrong, use_java=False, log=lambda *a: None)
    assert no_java["Bleu_4"] > 0.9 and bad["Bleu_4"] < 0.5 and no_java["CIDEr"] > bad["CIDEr"]
    assert "METEOR" not in no_java and set(per_image) == {1, 2}
    if java_available():
        good, _ = score_captions(refs, right, use_java=True)
        bad, _ = score_captions(refs, wrong, use_java=True)
        assert good["METEOR"] > bad["METEOR"] and abs(no_java["Bleu_4"] - good["Bleu_4"]) < 1e-6
    with pytest.raises(ValueError, match="no reference"):
        score_captions({}, right)


def test_heldout_split_rules(trained):
    data, _ = trained
    tiny = get_config("tiny", data_dir=str(data))
    folder, coco, ids = heldout_split(tiny)
    assert len(ids) == 16
    coco_cfg = get_config("coco", data_dir=str(data))
    assert heldout_split(coco_cfg)[2] == sorted(ids)                     # 5000 of 16: all of them
    coco_cfg.heldout_images = 5                                          # the first N by id, not any N
    assert heldout_split(coco_cfg)[2] == sorted(ids)[:5]
    chosen = [coco.imgs[i]["file_name"] for i in sorted(ids)[:3]]
    images = [{"filename": n, "split": "test"} for n in chosen] + [{"filename": "x.jpg", "split": "train"}]
    (data / "dataset_coco.json").write_text(json.dumps({"images": images}))
    try:
        _, _, ids_karpathy = heldout_split(coco_cfg)
    finally:
        (data / "dataset_coco.json").unlink()
    assert [coco.imgs[i]["file_name"] for i in ids_karpathy] == chosen


def test_blind_baseline_is_the_most_frequent_caption(tmp_path):
    path = tmp_path / "c.json"
    captions = ["A dog.", "a dog", "a cat", "A Dog"]
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}],
                                "annotations": [{"id": k, "image_id": 1, "caption": c}
                                                for k, c in enumerate(captions)]}))
    assert blind_baseline(str(path), [5, 6]) == {5: "a dog", 6: "a dog"}


def test_frozen_pretrained_backbone_is_rebuilt_from_its_weights_file(tiny_copy, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    config = get_config("coco", data_dir=str(tiny_copy), models_dir=str(tmp_path / "m"), backbone="resnet18",
                        weights=str(weights), cache_views=1, max_steps=2, **SMALL)
    ckpt_path = train(config)["last"]
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert not ckpt["backbone"]["included"] and ckpt["backbone"]["weights"] == str(weights)
    assert not any(k.startswith("resnet_module.") for k in ckpt["encoder"])   # small file: head only
    encoder, *_ = load_captioner(ckpt_path)
    assert torch.equal(encoder.resnet_module[0].weight, torch.load(weights)["conv1.weight"])
    moved = tmp_path / "elsewhere.pth"
    weights.rename(moved)
    with pytest.raises(FileNotFoundError, match="resnet18.pth"):
        load_captioner(ckpt_path)
    encoder, *_ = load_captioner(ckpt_path, weights=str(moved))               # --weights on another machine
    assert torch.equal(encoder.resnet_module[0].weight, torch.load(moved)["conv1.weight"])


def test_checkpoints_of_earlier_versions_still_caption(trained, tmp_path, image_dir):
    """Earlier checkpoints kept runtime knobs in their config and did not say whether the backbone is in them."""
    _, ckpt = trained
    old = torch.load(ckpt, weights_only=True)
    old["config"].update(device="cuda:3", progress=True, num_workers=16, a_field_from_another_version=1)
    del old["backbone"]["included"]
    torch.save(old, tmp_path / "old.ckpt")
    encoder, _, _, config = load_captioner(str(tmp_path / "old.ckpt"))
    assert config.device == "" and config.num_workers == Config().num_workers     # this machine's knobs
    proc = run_cli("caption", image_dir / "gray.png", "--checkpoint", tmp_path / "old.ckpt", "--beam", 1)
    assert proc.stdout.startswith(str(image_dir / "gray.png") + "\t")
    del old["backbone"]
    torch.save(old, tmp_path / "foreign.ckpt")
    proc = run_cli("caption", image_dir / "gray.png", "--checkpoint", tmp_path / "foreign.ckpt", check=False)
    assert proc.returncode == 1 and "has no 'backbone' entry" in proc.stderr and "Traceback" not in proc.stderr



def test_evaluate_reports_diagnostics_intervals_signature_and_compares_runs(trained, tmp_path):
    _, ckpt = trained
    a, b = tmp_path / "greedy.json", tmp_path / "beam.json"
    proc = run_cli("evaluate", "--checkpoint", ckpt, "--beam", 1, "--out", a)
    run_cli("evaluate", "--checkpoint", ckpt, "--beam", 3, "--out", b)
    assert "95% bootstrap intervals" in proc.stdout and "signature: pycocoevalcap" in proc.stdout
    assert "| beam:1 | lp:none | scale:0-1" in proc.stdout and "distinct over 16 images" in proc.stdout
    written = json.load(open(a))
    lo, hi = written["intervals"]["CIDEr"]
    assert lo <= written["metrics"]["CIDEr"] <= hi
    assert len(written["per_image"]) == 16 and len(next(iter(written["per_image"].values()))["bleu"]) == 10
    assert written["signature"]["split"] == "val (16 images)"
    compared = run_cli("evaluate", "--compare", a, b, "--resamples", 200).stdout
    assert "B - A" in compared and "CIDEr" in compared and "Bleu_4" in compared
    assert "beam:3" in compared and "beam:1" in compared                   # each file's signature
    same = run_cli("evaluate", "--compare", a, a, "--resamples", 50).stdout
    assert "+0.000   [+0.000, +0.000]" in same
    fewer = tmp_path / "fewer.json"
    run_cli("evaluate", "--checkpoint", ckpt, "--beam", 1, "--max-images", 8, "--out", fewer)
    bad = run_cli("evaluate", "--compare", a, fewer, check=False)
    assert bad.returncode == 1 and "different images" in bad.stderr and "Traceback" not in bad.stderr
    nothing = run_cli("evaluate", check=False)
    assert nothing.returncode == 1 and "--checkpoint" in nothing.stderr


def test_collapse_warning_on_a_decoder_that_says_one_thing(trained, tmp_path):
    """A decoder whose output layer ignores its input says the same caption for every image: evaluate warns."""
    _, ckpt = trained
    state = torch.load(ckpt, weights_only=True)
    weight = state["decoder"]["linear_layer.weight"]
    state["decoder"]["linear_layer.weight"] = torch.zeros_like(weight)
    bias = torch.full((weight.size(0),), -10.0)
    bias[4] = 10.0                                                           # always the same word
    state["decoder"]["linear_layer.bias"] = bias
    broken = tmp_path / "collapsed.ckpt"
    torch.save(state, broken)
    proc = run_cli("evaluate", "--checkpoint", broken, "--beam", 1)
    assert "caption collapse: 1 distinct caption for 16 images, and 100% of them" in proc.stderr
    # a decoder whose captions follow the image: random, strong input and output weights (no <end>, so no
    # empty captions), counted here from its own predictions: no warning for it
    state = torch.load(ckpt, weights_only=True)
    g = torch.Generator().manual_seed(0)
    for name in ("lstm_layer.weight_ih_l0", "linear_layer.weight"):
        state["decoder"][name] = torch.randn(state["decoder"][name].shape, generator=g) * 10
    # and an image embedding that keeps the images apart: centred, unit-variance projections of the features
    head = state["encoder"]["linear_layer.weight"]
    state["encoder"]["linear_layer.weight"] = torch.randn(head.shape, generator=g)
    state["encoder"]["linear_layer.bias"] = torch.zeros(head.size(0))
    features = _backbone_features(trained[0], state)
    projected = features @ state["encoder"]["linear_layer.weight"].T
    state["encoder"]["batch_norm.running_mean"] = projected.mean(0)
    state["encoder"]["batch_norm.running_var"] = projected.var(0) + 1e-6
    state["encoder"]["batch_norm.weight"] = torch.ones(head.size(0))
    state["encoder"]["batch_norm.bias"] = torch.zeros(head.size(0))
    state["decoder"]["linear_layer.bias"] = torch.zeros(weight.size(0))
    state["decoder"]["linear_layer.bias"][:4] = -1e4                        # never <pad> <start> <end> <unk>
    varied = tmp_path / "varied.ckpt"
    torch.save(state, varied)
    out = tmp_path / "varied.json"
    proc = run_cli("evaluate", "--checkpoint", varied, "--beam", 1, "--results", out)
    said = [r["caption"] for r in json.load(open(out))]
    assert len(said) == 16 and len(set(said)) >= 5 and max(map(said.count, said)) <= 7, said
    assert "caption collapse" not in proc.stderr + proc.stdout, proc.stderr


def _backbone_features(data, state):
    """The checkpoint's frozen-backbone features of the 16 val images, as evaluate computes them."""
    from captioning.checkpoint import load_encoder_state
    from captioning.config import get_config
    from captioning.data import eval_transform
    from captioning.images import load_image
    from captioning.model import CNNModel

    config = get_config(saved=state["config"])
    encoder = CNNModel(config.embedding_size, config.backbone, None).eval()
    load_encoder_state(encoder, state)
    transform = eval_transform(config.resize_size, config.crop_size)
    images = torch.stack([transform(load_image(str(p))) for p in sorted((data / "val2014").iterdir())])
    with torch.no_grad():
        return encoder.extract(images)


def _one_line_error(proc, *words):
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert all(w in proc.stderr for w in words), (words, proc.stderr)


def _head_only(ckpt, weights="/elsewhere/resnet18.pth"):
    """The checkpoint as a frozen pretrained backbone leaves it: the head only, the ResNet named by its weights."""
    state = torch.load(ckpt, weights_only=True)
    state["encoder"] = {k: v for k, v in state["encoder"].items() if not k.startswith("resnet_module.")}
    state["backbone"].update(weights=weights, trained=False, included=False)
    return state


def test_bad_checkpoint_and_weights_files_are_one_line(trained, tmp_path, image_dir):
    _, ckpt = trained
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a checkpoint\n")
    _one_line_error(run_cli("caption", image_dir, "--checkpoint", text, check=False), str(text), "not a loadable")
    assert "not a loadable" in cli_error("evaluate", "--checkpoint", text)
    good = torch.load(ckpt, weights_only=True)
    for key in ("config", "vocab", "encoder", "decoder", "backbone"):
        broken = {k: v for k, v in good.items() if k != key}
        torch.save(broken, tmp_path / f"no_{key}.ckpt")
        message = cli_error("caption", image_dir / "gray.png", "--checkpoint", tmp_path / f"no_{key}.ckpt")
        assert f"no_{key}.ckpt" in message and f"no '{key}' entry" in message, message
    torch.save({**good, "backbone": {k: v for k, v in good["backbone"].items() if k != "name"}}, tmp_path / "n.ckpt")
    assert "has no 'name'" in cli_error("caption", image_dir, "--checkpoint", tmp_path / "n.ckpt")
    # --weights for a checkpoint whose frozen backbone is rebuilt from its weights file
    torch.save(_head_only(ckpt), tmp_path / "head.ckpt")
    torch.save(5, tmp_path / "five.pth")
    for weights, words in ((text, "is not a weights file torch.load can read"),
                           (tmp_path / "five.pth", "does not hold a state_dict"),
                           (tmp_path / "missing.pth", "not found")):
        message = cli_error("caption", image_dir / "gray.png", "--checkpoint", tmp_path / "head.ckpt",
                                    "--weights", weights)
        assert str(weights) in message and words in message, message


def test_evaluate_checks_its_output_paths_before_the_work(trained, tmp_path, readonly_dir):
    _, ckpt = trained
    path = os.path.join(readonly_dir, "metrics.json")
    proc = run_cli("evaluate", "--checkpoint", ckpt, "--out", path, check=False)
    _one_line_error(proc, "--out", path, "cannot write there")
    assert "Bleu" not in proc.stdout                                   # found before the evaluation, not after
    message = cli_error("evaluate", "--checkpoint", ckpt, "--results", path)
    assert "--results" in message and "cannot write there" in message
    assert "--out" in cli_error("evaluate", "--checkpoint", ckpt, "--out", tmp_path)       # a folder
    assert not os.path.exists(path)


def test_a_first_weights_download_does_not_mix_into_json_output(trained, tmp_path, image_dir, monkeypatch, capsys):
    """torch.hub prints "Downloading: ..." to stdout; `caption --json` must still print only JSON there."""
    import torch.hub

    from captioning.__main__ import main

    _, ckpt = trained
    torch.save(_head_only(ckpt, weights="ResNet18_Weights.IMAGENET1K_V1"), tmp_path / "head.ckpt")

    def fake_download(url, dst, *args, **kwargs):      # no network: a random ResNet-18 as the "download"
        torch.save(torchvision.models.resnet18().state_dict(), dst)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    main(["caption", str(image_dir / "gray.png"), "--checkpoint", str(tmp_path / "head.ckpt"), "--json",
          "--beam", "1"])
    out, err = capsys.readouterr()
    assert [item["image"] for item in json.loads(out)] == [str(image_dir / "gray.png")]
    assert "Downloading: " in err and (tmp_path / "torch_home" / "hub" / "checkpoints").is_dir()


def test_16_and_32_bit_greyscale_get_the_8_bit_versions_caption(trained, tmp_path):
    """A 16-bit PNG or an I/F TIFF of a picture was clipped to white before captioning; now it is
    captioned as its 8-bit version is. The tiny checkpoint trained here is too short to caption each
    image differently, so the test compares what the encoder sees and makes of each file as well."""
    import numpy as np

    from captioning.data import eval_transform
    from captioning.images import load_image
    from captioning.inference import caption_images

    data, ckpt = trained
    encoder, decoder, vocab, config = load_captioner(ckpt)
    sources = sorted((data / "val2014").iterdir())[:3]
    paths = []
    for k, src in enumerate(sources):
        grey = np.asarray(Image.open(src).convert("L"))
        Image.fromarray(grey).save(tmp_path / f"{k}_8.png")
        Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / f"{k}_16.png")
        Image.fromarray(grey.astype(np.int32) * 257, "I").save(tmp_path / f"{k}_i.tif")
        Image.fromarray(grey.astype(np.float32) / 255, "F").save(tmp_path / f"{k}_f.tif")
        paths += [str(tmp_path / f"{k}_{kind}") for kind in ("8.png", "16.png", "i.tif", "f.tif")]
    captions = [c for _, c, err in caption_images(paths, encoder, decoder, vocab, config, "cpu", 1, 8, progress=False)
                if err is None]
    assert len(captions) == len(paths)
    for k in range(len(sources)):
        assert captions[4 * k + 1:4 * k + 4] == [captions[4 * k]] * 3, (k, captions[4 * k:4 * k + 4])
    transform = eval_transform(config.resize_size, config.crop_size)
    with torch.no_grad():
        seen = torch.stack([transform(load_image(p)) for p in paths])
        features = encoder(seen)
    for k in range(len(sources)):
        eight = slice(4 * k, 4 * k + 1)
        assert (seen[4 * k + 1:4 * k + 4] - seen[eight]).abs().max() < 1e-5, paths[4 * k + 1:4 * k + 4]
        assert torch.allclose(features[4 * k + 1:4 * k + 4], features[eight].expand(3, -1), atol=1e-4)


def _data_without(data, tmp_path, *parts):
    """A copy of the tiny data folder with `parts` (folders) left out."""
    folder = tmp_path / "data"
    shutil.copytree(data, folder, ignore=shutil.ignore_patterns("features", "resized_images", *parts))
    return folder


def test_evaluate_names_the_images_folder_that_lacks_the_split(trained, tmp_path, capsys):
    """No val2014/ gave a raw [Errno 2]; an empty one "nothing to score"."""
    data, ckpt = trained
    folder = _data_without(data, tmp_path, "val2014")
    captions = folder / "annotations" / "captions_val2014.json"
    message = cli_error("evaluate", "--checkpoint", ckpt, "--data-dir", folder, "--beam", 1)
    assert f"none of the 16 images in {captions} are in {folder / 'val2014'} (no such folder)" in message, message
    (folder / "val2014").mkdir()
    message = cli_error("evaluate", "--checkpoint", ckpt, "--data-dir", folder, "--beam", 1)
    assert f"none of the 16 images in {captions} are in {folder / 'val2014'}:" in message, message
    # some of them: scored, and the missing ones counted
    for src in sorted((data / "val2014").iterdir())[:6]:
        shutil.copy(src, folder / "val2014" / src.name)
    r = evaluate_checkpoint(ckpt, beam_size=1, progress=False, data_dir=str(folder))
    assert len(r["predictions"]) == 6
    assert f"warning: 10 of the 16 images in {captions} are not in {folder / 'val2014'}" in capsys.readouterr().out


def test_a_one_image_split_reports_cider_and_intervals_as_na(trained, tmp_path, capsys):
    """CIDEr on one image was 0.000 [0.000, 0.000] beside BLEU 1.0, with no warning."""
    from captioning.__main__ import main

    data, ckpt = trained
    folder = _data_without(data, tmp_path)
    path = folder / "annotations" / "captions_val2014.json"
    coco = json.loads(path.read_text())
    first = min(img["id"] for img in coco["images"])
    coco["images"] = [img for img in coco["images"] if img["id"] == first]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] == first]
    path.write_text(json.dumps(coco))
    out = tmp_path / "one.json"
    main(["evaluate", "--checkpoint", str(ckpt), "--data-dir", str(folder), "--beam", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["images"] == 1 and written["metrics"]["CIDEr"] is None and written["metrics"]["Bleu_1"] >= 0
    assert written["intervals"] == {"Bleu_4": None, "CIDEr": None}
    assert "warning: CIDEr is n/a on 1 image" in printed and "intervals need 5 and are n/a" in printed
    header, row = printed.split("greedy")[0].splitlines()[-1], printed.split("greedy")[1].splitlines()[0]
    assert header.split()[-1] == "CIDEr" and row.split()[-1] == "n/a", printed
    assert "CIDEr n/a [n/a]" in printed and "[0.000, 0.000]" not in printed


def test_evaluate_skips_counts_and_names_unreadable_images_and_refuses_above_one_percent(trained, tmp_path, capsys):
    from captioning.tinyset import make_tinyset

    _, ckpt = trained
    folder = tmp_path / "tiny"
    make_tinyset(str(folder), train=20, val=120, seed=5)
    names = sorted(os.listdir(folder / "val2014"))
    for name in names[10:12]:                                  # cut short: not decodable
        path = folder / "val2014" / name
        path.write_bytes(path.read_bytes()[:300])
    os.rename(folder / "val2014" / names[11], tmp_path / names[11])          # 1 of 118 unreadable: skipped
    os.rename(folder / "val2014" / names[12], tmp_path / names[12])          # (and one missing, as before)
    r = evaluate_checkpoint(ckpt, beam_size=1, progress=False, data_dir=str(folder))
    out = capsys.readouterr().out
    assert f"1 unreadable image skipped: {names[10]} ({folder / 'val2014'}: not scored)" in out
    assert r["skipped_images"] == [names[10]] and len(r["predictions"]) == 117
    assert r["metrics"]["Bleu_1"] > 0
    shutil.move(tmp_path / names[11], folder / "val2014" / names[11])        # 2 of 120: more than 1%
    shutil.move(tmp_path / names[12], folder / "val2014" / names[12])
    with pytest.raises(ValueError, match=rf"^2 of 120 images of val2014 \({folder / 'val2014'}\) are unreadable, "
                                         rf"more than 1%: {names[10]} \(.*\); {names[11]} \("):
        evaluate_checkpoint(ckpt, beam_size=1, progress=False, data_dir=str(folder))
