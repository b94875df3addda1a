"""Export: the folder's files, loading it back with torch and with ONNX Runtime (captions equal to the
checkpoint's), int8, the CLI's --model / --runtime, and refusals that name the file."""
import json
import os
import shutil
import sys

import pytest
import torch
from conftest import SMALL, cli_error, run_cli
from safetensors import safe_open

from captioning import export as export_module
from captioning.checkpoint import load_captioner
from captioning.config import get_config
from captioning.data import eval_transform
from captioning.evaluation import heldout_split
from captioning.export import ExportError, export_model, load_exported, load_model, read_export
from captioning.images import load_image
from captioning.inference import caption_images
from captioning.training import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """A small trained checkpoint of each decoder (random ResNet-18 backbone, carried in the checkpoint)."""
    root = tmp_path_factory.mktemp("export")
    data = root / "tiny"
    shutil.copytree(tiny_data, data)
    out = {}
    for kind in ("lstm", "attention"):
        config = get_config("tiny", data_dir=str(data), models_dir=str(root / kind), decoder=kind,
                            **{**SMALL, "weights": None, "epochs": 3, "cache_views": 2, "lr": 0.01})
        out[kind] = train(config)["best"]
    return out


def _val_paths(checkpoint):
    config = load_captioner(checkpoint)[3]
    folder, coco, ids = heldout_split(config)
    return [os.path.join(folder, coco.imgs[i]["file_name"]) for i in ids]


@pytest.mark.parametrize("kind", ["lstm", "attention"])
def test_an_export_loads_back_and_onnx_captions_as_the_checkpoint_does(trained, tmp_path, kind):
    checkpoint, out = trained[kind], str(tmp_path / "export")
    paths = export_model(checkpoint, out, log=lambda *a: None)
    assert set(export_module.FILES) <= set(paths) and all(os.path.isfile(p) for p in paths.values())
    meta, vocab, config = read_export(out)
    assert meta["decoder"] == kind and meta["vocab_size"] == len(vocab) and config.decoder == kind
    with open(os.path.join(out, "model.safetensors"), "rb") as f:     # safetensors: a JSON header, then raw data
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["decoder.linear_layer.weight"]["shape"] == [len(vocab), config.hidden_layer_size]
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("encoder.resnet_module.") for k in keys) and "decoder.linear_layer.weight" in keys
    images = _val_paths(checkpoint)
    eager = load_captioner(checkpoint)
    for runtime in ("torch", "onnx"):
        model = load_exported(out, runtime)
        for beam in (1, 3):
            want = [c for _, c, _ in caption_images(images, *eager, beam_size=beam)]
            got = [c for _, c, _ in caption_images(images, *model, beam_size=beam)]
            assert sum(a == b for a, b in zip(want, got)) >= 0.99 * len(want), (runtime, beam, want, got)
    # the decoder step really is the graph: its log-probabilities match the eager decoder's
    encoder, decoder, _, _ = load_exported(out, "onnx")
    transform = eval_transform(config.resize_size, config.crop_size)
    x = torch.stack([transform(load_image(p)) for p in images[:3]])
    log_probs, state = decoder.init_state(encoder(x))
    with torch.no_grad():
        eager_lp, eager_state = eager[1].init_state(eager[0](x))
        eager_lp2, _ = eager[1].step(torch.ones(3, dtype=torch.long), eager_state)
    lp2, _ = decoder.step(torch.ones(3, dtype=torch.long), state)
    assert torch.allclose(log_probs, eager_lp, atol=1e-4) and torch.allclose(lp2, eager_lp2, atol=1e-4)


def test_int8_encoder_and_the_cli(trained, tmp_path, tiny_data):
    checkpoint, out = trained["lstm"], str(tmp_path / "export")
    run_cli("export", "--checkpoint", checkpoint, "--out", out, "--int8", tiny_data / "train2014")
    assert os.path.isfile(os.path.join(out, "encoder.int8.onnx"))
    assert os.path.getsize(os.path.join(out, "encoder.int8.onnx")) < os.path.getsize(os.path.join(out, "encoder.onnx"))
    images = sorted(_val_paths(checkpoint))[:6]
    eager = run_cli("caption", *images, "--checkpoint", checkpoint, "--json").stdout
    onnx = run_cli("caption", *images, "--model", out, "--runtime", "onnx", "--json").stdout
    assert json.loads(onnx) == json.loads(eager)
    int8 = json.loads(run_cli("caption", *images, "--model", out, "--runtime", "onnx-int8", "--json").stdout)
    assert [r["image"] for r in int8] == images and all(r["caption"] for r in int8)
    # evaluate --model scores the export; it needs --data-dir, since an export holds no data paths
    data_dir = os.path.dirname(os.path.dirname(images[0])).replace("/resized_images", "")
    result = run_cli("evaluate", "--model", out, "--runtime", "onnx", "--data-dir", data_dir, "--beam", "1",
                     "--out", tmp_path / "onnx.json")
    assert "CIDEr" in result.stdout and json.load(open(tmp_path / "onnx.json"))["checkpoint"] == out
    assert "needs --data-dir" in cli_error("evaluate", "--model", out)
    assert "export the checkpoint first" in cli_error("caption", images[0], "--checkpoint", checkpoint,
                                                      "--runtime", "onnx")
    assert "--explain" in cli_error("caption", images[0], "--model", out, "--runtime", "onnx", "--explain", tmp_path)
    both = run_cli("caption", images[0], "--checkpoint", checkpoint, "--model", out, check=False)
    assert both.returncode == 2 and "not allowed with" in both.stderr
    # an existing export is not replaced without --overwrite, and is moved aside with it
    assert "already holds an export" in cli_error("export", "--checkpoint", checkpoint, "--out", out)
    run_cli("export", "--checkpoint", checkpoint, "--out", out, "--overwrite")
    assert any(n.startswith("previous-") for n in os.listdir(out)) and os.path.isfile(os.path.join(out, "config.json"))


def test_a_broken_export_is_refused_naming_the_file(trained, tmp_path, monkeypatch):
    out = tmp_path / "export"
    export_model(trained["lstm"], str(out), log=lambda *a: None)

    def broken(change):
        copy = tmp_path / f"broken{len(os.listdir(tmp_path))}"
        shutil.copytree(out, copy)
        change(copy)
        return copy

    missing = broken(lambda d: os.remove(d / "decoder_step.onnx"))
    with pytest.raises(ExportError, match="decoder_step.onnx is missing"):
        load_exported(str(missing))
    words = json.load(open(out / "vocab.json"))
    short = broken(lambda d: json.dump(words[:-1], open(d / "vocab.json", "w")))
    with pytest.raises(ExportError, match=r"vocab.json holds \d+ words, but config.json says"):
        load_exported(str(short))
    meta = json.load(open(out / "config.json"))
    meta["config"]["hidden_layer_size"] += 8
    other = broken(lambda d: json.dump(meta, open(d / "config.json", "w")))
    with pytest.raises(ExportError, match="model.safetensors does not match config.json"):
        load_exported(str(other), "torch")
    garbage = broken(lambda d: open(d / "encoder.onnx", "wb").write(b"not a graph"))
    with pytest.raises(ExportError, match="encoder.onnx cannot be loaded by ONNX Runtime"):
        load_exported(str(garbage), "onnx")
    with pytest.raises(ExportError, match=r"encoder.int8.onnx is missing: export with --int8"):
        load_exported(str(out), "onnx-int8")
    message = cli_error("caption", "x.png", "--model", missing)
    assert "decoder_step.onnx is missing" in message
    monkeypatch.setitem(sys.modules, "onnxruntime", None)            # ONNX Runtime not installed
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        load_exported(str(out), "onnx")
    with pytest.raises(ValueError, match="exactly one of --checkpoint"):
        load_model(None, None)


def test_the_clis_runtimes_are_the_librarys():
    from captioning.__main__ import RUNTIMES

    assert RUNTIMES == export_module.RUNTIMES


def test_the_exports_model_card(trained, tmp_path):
    """The export's README.md is the run's card with the export's files and loading code; one is made from a
    bare checkpoint; another checkpoint's scores are left out."""
    from test_modelcard import front_matter

    from captioning.modelcard import read_card_info, write_card

    checkpoint = trained["lstm"]
    run = os.path.dirname(checkpoint)
    card = read_card_info(os.path.join(run, "README.md"))      # training wrote it beside best.ckpt
    assert card is not None and card["training"]["device"] == "cpu"
    paths = export_model(checkpoint, str(tmp_path / "a"), log=lambda *a: None)
    text = open(paths["README.md"]).read()
    matter = front_matter(text)
    assert matter["pipeline_tag"] == "image-to-text" and "cider" in matter["metrics"]
    info = read_card_info(paths["README.md"])
    assert info["training"] == card["training"] and "evaluation" not in info
    assert info["export"]["checkpoint"] == "best.ckpt" and "decoder_step.onnx" in info["export"]["files"]
    assert 'load_exported("THIS_FOLDER", runtime="onnx")' in text and "--model THIS_FOLDER" in text

    # scores of another checkpoint file do not travel with this one
    write_card(run, {**card, "evaluation": {"checkpoint": "last.ckpt", "split": "val", "beam": 3, "images": 40,
                                            "data": "tiny", "metrics": {"CIDEr": 1.5}}})
    logged = []
    paths = export_model(checkpoint, str(tmp_path / "b"), log=logged.append)
    assert "evaluation" not in read_card_info(paths["README.md"])
    assert any("last.ckpt's, not best.ckpt's" in line for line in logged)
    write_card(run, card)                                        # as training left it, for the other tests

    # a checkpoint moved on its own: the card comes from the checkpoint, the hardware unknown
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(checkpoint, lone / "best.ckpt")
    paths = export_model(str(lone / "best.ckpt"), str(tmp_path / "c"), log=lambda *a: None)
    info = read_card_info(paths["README.md"])
    assert info["training"]["device"] is None and info["training"]["step"] == info["export"]["step"] > 0
    text = open(paths["README.md"]).read()
    assert "hardware not recorded" in text and "only knows coloured shapes" in text
