import inspect
import json
import os
import random

import numpy as np
import pytest
import torch
import torchvision
from conftest import SMALL

from captioning.backbone import build_resnet
from captioning.checkpoint import load_captioner
from captioning.config import get_config
from captioning.data import _to_normalized_tensor
from captioning.standin import (
    PRETRAINING_SHAPES,
    SHIPPED_DIR,
    ensure_standin,
    find_standin,
    pretrain_standin,
    probe_objects,
    recorded_objects,
    resolution_schedule,
    scene_targets,
    ship_standin,
    standin_path,
    synthetic_scene,
)
from captioning.tinyset import DRAWABLE_SHAPES
from captioning.training import train


def test_scene_targets_order_objects_left_to_right_and_top_to_bottom():
    n = len(DRAWABLE_SHAPES)
    red, blue = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)
    # shape 4 at the right and top, shape 7 at the left and bottom
    shape, colour, mask, present = scene_targets([(4, red, 0.8, 0.2), (7, blue, 0.2, 0.9)], n)
    assert shape.tolist() == [7, 4, n, 4, 7, n]           # left..right, then top..bottom; n = no object
    assert torch.equal(colour[0], torch.tensor(blue)) and torch.equal(colour[3], torch.tensor(red))
    assert mask.tolist() == [1, 1, 0, 1, 1, 0]
    assert present.nonzero().flatten().tolist() == [4, 7]
    # side by side at the same height: top-to-bottom order is ambiguous, so those slots are ignored
    shape, _, mask, _ = scene_targets([(1, red, 0.2, 0.5), (2, blue, 0.8, 0.52)], n)
    assert shape.tolist()[:3] == [1, 2, n] and shape.tolist()[3:] == [-100] * 3 and mask.tolist()[3:] == [0] * 3


def test_synthetic_scenes_are_deterministic_and_report_centres_inside_the_crop():
    a = [synthetic_scene(random.Random(5), DRAWABLE_SHAPES, 64, 56) for _ in range(2)]
    assert a[0][0].size == (56, 56) and np.array_equal(np.asarray(a[0][0]), np.asarray(a[1][0]))
    objects = [o for _ in range(30) for o in synthetic_scene(random.Random(_), DRAWABLE_SHAPES, 64, 56)[1]]
    assert {len(o) for o in objects} == {4}
    assert all(-0.2 < x < 1.2 and -0.2 < y < 1.2 for _, _, x, y in objects)   # a crop may cut an edge off
    assert len({s for s, *_ in objects}) > 5                                       # many shapes, not three


def test_standin_pretraining_is_deterministic_and_learns():
    kwargs = dict(resize_size=36, crop_size=32, batch_size=64, lr=3e-3, progress=False)
    state_a, report = pretrain_standin("resnet18", steps=3, seed=3, **kwargs)
    state_b, _ = pretrain_standin("resnet18", steps=3, seed=3, **kwargs)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not any(k.startswith("fc.") for k in state_a)
    assert 0 <= report["heldout_shape_accuracy"] <= 1 and report["heldout_scenes"] == 512
    assert 0 <= report["heldout_single_shape_accuracy"] <= 1 and report["shapes"] == list(PRETRAINING_SHAPES)
    state_c, _ = pretrain_standin("resnet18", steps=3, seed=3, workers=1, **kwargs)   # scenes drawn in a worker
    assert all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    _, longer = pretrain_standin("resnet18", steps=40, seed=3, **kwargs)
    # colours are learned first: after 40 steps the held-out colour error has clearly fallen
    assert longer["heldout_colour_error"] < report["heldout_colour_error"] - 0.05


def test_the_standin_is_pretrained_without_the_heldout_shapes_and_named_by_its_recipe(tmp_path, monkeypatch):
    import captioning.standin as standin
    from captioning.tinyset import HELDOUT_SHAPES

    assert set(HELDOUT_SHAPES) <= set(DRAWABLE_SHAPES) and not set(HELDOUT_SHAPES) & set(PRETRAINING_SHAPES)
    config = get_config("tiny", models_dir=str(tmp_path / "m"))
    name = os.path.basename(standin_path(config))
    assert name.startswith(f"standin-resnet18-64to56px-{config.standin_steps}steps-seed0-")
    names = list(inspect.signature(standin.pretrain_standin).parameters)
    for parameter, value in (("lr", 9e-3), ("radius", (0.1, 0.3)), ("shapes", PRETRAINING_SHAPES[:-1]),
                             ("label_smoothing", 0.1), ("bf16", True), ("workers", 1)):
        defaults = list(standin.pretrain_standin.__defaults__)
        defaults[names.index(parameter)] = value
        with monkeypatch.context() as m:
            m.setattr(standin.pretrain_standin, "__defaults__", tuple(defaults))
            renamed = os.path.basename(standin_path(config)) != name
            assert renamed == (parameter != "workers"), f"{parameter}: the recipe renames the file; drawing in a " \
                                                         f"worker does not"
    assert os.path.basename(standin_path(config)) == name


def test_the_shipped_standin_is_the_current_recipes_and_sees_shapes(tmp_path, monkeypatch):
    """A change to the recipe or the preset's step count renames the stand-in; the file that ships must be
    made again (python -m captioning standin --ship), or make demo would pretrain for half an hour."""
    import captioning.standin as standin

    config = get_config("tiny", models_dir=str(tmp_path / "m"))
    shipped = os.path.join(SHIPPED_DIR, os.path.basename(standin_path(config)))
    assert os.path.isfile(shipped), f"no stand-in ships for this recipe: {os.path.basename(shipped)} " \
                                    f"(in {SHIPPED_DIR}: {sorted(os.listdir(SHIPPED_DIR))})"
    report = json.load(open(shipped + ".json"))
    assert report["steps"] == config.standin_steps and report["shapes"] == list(PRETRAINING_SHAPES)
    assert (report["resize_size"], report["crop_size"], report["seed"]) == (64, 56, 0)
    # found without pretraining, by ensure_standin and by everything that builds the model
    # (pretrain_standin itself stays: its defaults are the recipe, and so the file's name)
    monkeypatch.setattr(standin, "StandinHead", lambda *a, **k: pytest.fail("pretrained again"))
    assert ensure_standin(config, log=lambda *a: None) == shipped == find_standin(config)
    resnet = build_resnet("resnet18", shipped)
    assert all(p.dtype == torch.float32 for p in resnet.state_dict().values() if p.is_floating_point())
    # it sees: a linear read of its pooled features names the shape of lone objects in scenes it never saw
    rng = random.Random(123)
    scenes = [synthetic_scene(rng, PRETRAINING_SHAPES, 64, 56) for _ in range(900)]
    lone = [(image, objects[0][0]) for image, objects in scenes if len(objects) == 1][:300]
    resnet.fc = torch.nn.Identity()
    resnet.eval()
    with torch.no_grad():
        features = resnet(torch.stack([_to_normalized_tensor(image) for image, _ in lone]))
    shapes = [[s] for _, s in lone]
    right = probe_objects(features[:200], shapes[:200], features[200:], shapes[200:])
    # (a random ResNet-18 names 11%, a stand-in pretrained for 1,400 steps 67%, for 2,800 steps 91%)
    assert right > 0.8, f"the shipped stand-in names {right:.0%} of lone shapes"
    # a stand-in built under models_dir with the same name is used before the shipped one
    local = standin_path(config)
    os.makedirs(os.path.dirname(local))
    open(local, "wb").close()
    assert find_standin(config) == ensure_standin(config, log=lambda *a: None) == local


def test_ship_standin_halves_the_convolutions_and_keeps_the_statistics(tmp_path):
    state, report = pretrain_standin("resnet18", 36, 32, steps=2, batch_size=4, progress=False)
    path = str(tmp_path / "standin-x.pth")
    torch.save(state, path)
    json.dump(report, open(path + ".json", "w"))
    out = ship_standin(path, str(tmp_path / "shipped"))
    assert out == str(tmp_path / "shipped" / "standin-x.pth")
    half = torch.load(out, weights_only=True)
    assert half["layer4.1.conv2.weight"].dtype == torch.float16
    assert half["layer4.1.bn2.running_var"].dtype == torch.float32
    assert half["bn1.num_batches_tracked"].dtype == torch.long
    assert os.path.getsize(out) < 0.6 * os.path.getsize(path)
    resnet = build_resnet("resnet18", out)                    # loaded back in single precision
    assert torch.equal(resnet.layer4[1].conv2.weight, state["layer4.1.conv2.weight"].half().float())
    assert torch.equal(resnet.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert json.load(open(out + ".json"))["steps"] == 2


def test_the_standin_command_pretrains_and_ships(tmp_path, monkeypatch, capsys):
    import captioning.standin as standin
    from captioning.__main__ import main

    monkeypatch.setattr(standin, "SHIPPED_DIR", str(tmp_path / "shipped"))
    main(["standin", "--steps", "2", "--models-dir", str(tmp_path / "m"), "--ship"])
    built = next((tmp_path / "pretrained").glob("standin-resnet18-64to56px-2steps-seed0-*.pth"))
    shipped = tmp_path / "shipped" / built.name
    out = capsys.readouterr().out
    assert f"the stand-in backbone: {built}" in out and f"shipped: {shipped}" in out
    assert torch.load(shipped, weights_only=True)["conv1.weight"].dtype == torch.float16
    built.unlink()                                        # now the shipped one is found, and not copied onto itself
    main(["standin", "--steps", "2", "--models-dir", str(tmp_path / "m"), "--ship"])
    assert "it is the one that ships already" in capsys.readouterr().out and not built.exists()


def test_weights_files_load_whatever_their_classifier(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=7)            # a classifier of another size
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "w.pth")
    resnet = build_resnet("resnet18", str(tmp_path / "w.pth"))
    assert torch.equal(resnet.layer4[1].conv2.weight, net.layer4[1].conv2.weight)
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match="does not fit a resnet18"):
        build_resnet("resnet18", str(tmp_path / "r34.pth"))
    torch.save({"epoch": 3}, tmp_path / "not_weights.pth")
    with pytest.raises(ValueError, match="state_dict"):
        build_resnet("resnet18", str(tmp_path / "not_weights.pth"))


def test_training_builds_the_standin_once_and_checkpoints_carry_it(tiny_copy, tmp_path):
    config = get_config("tiny", data_dir=str(tiny_copy), models_dir=str(tmp_path / "runs" / "a"), epochs=1, **SMALL)
    assert config.weights == "standin"
    path = standin_path(config)
    assert os.path.dirname(path) == str(tmp_path / "runs" / "pretrained")    # shared by the runs beside it
    summary = train(config)
    assert os.path.isfile(path)
    report = json.load(open(path + ".json"))
    assert report["steps"] == 2 and report["crop_size"] == 32 and "heldout_shape_accuracy" in report
    built = os.path.getmtime(path)
    other = get_config("tiny", data_dir=str(tiny_copy), models_dir=str(tmp_path / "runs" / "b"), epochs=1, **SMALL)
    assert ensure_standin(other, log=lambda *a: None) == path and os.path.getmtime(path) == built   # reused
    ckpt = torch.load(summary["best"], weights_only=True)
    assert ckpt["backbone"]["included"] and any(k.startswith("resnet_module.") for k in ckpt["encoder"])
    pretrained = torch.load(path, weights_only=True)
    os.remove(path)                                  # the checkpoint alone is enough to caption
    encoder, _, _, _ = load_captioner(summary["best"])
    assert torch.equal(encoder.resnet_module[0].weight, pretrained["conv1.weight"])
    assert torch.equal(encoder.resnet_module[7][1].bn2.running_var, pretrained["layer4.1.bn2.running_var"])


def test_resolution_schedule_ends_at_the_captioners_size():
    assert resolution_schedule(1400, 64, 56, 64) == [(600, 36, 32, 128), (800, 64, 56, 64)]
    assert resolution_schedule(800, 64, 56, 64, low_share=0.7) == [(560, 36, 32, 128), (240, 64, 56, 64)]
    assert resolution_schedule(700, 256, 224, 32) == [(300, 146, 128, 64), (400, 256, 224, 32)]
    assert resolution_schedule(7, 36, 32, 64) == [(7, 36, 32, 64)]           # already small: one phase
    assert sum(s for s, *_ in resolution_schedule(5, 64, 56, 64)) == 5


def test_the_object_probe_reads_objects_that_features_hold_and_not_others():
    rng = random.Random(0)
    kinds = [(c, s) for c in ("red", "blue", "green") for s in ("circle", "square", "star")]
    objects = [rng.sample(kinds, rng.choice((1, 2))) for _ in range(400)]
    hot = torch.tensor([[float(k in o) for k in kinds] for o in objects])
    torch.manual_seed(0)
    telling = hot @ torch.randn(len(kinds), 32) + 0.05 * torch.randn(400, 32)   # features that hold the objects
    blind = torch.randn(400, 32)                                                 # features that do not
    assert probe_objects(telling[:300], objects[:300], telling[300:], objects[300:]) >= 0.95
    assert probe_objects(blind[:300], objects[:300], blind[300:], objects[300:]) <= 0.3


def test_recorded_objects_reads_the_generators_record_and_is_none_without_one(tiny_data, tmp_path):
    from captioning.data import eval_transform

    captions = tiny_data / "annotations" / "captions_val2014.json"
    images, objects = recorded_objects(str(captions), str(tiny_data / "val2014"), eval_transform(64, 56),
                                       limit=5, resize=64)
    record = json.loads(captions.read_text())["images"][:5]
    assert images.shape == (5, 3, 56, 56)
    assert objects == [[(o["colour"], o["shape"]) for o in im["objects"]] for im in record]
    coco = {k: v for k, v in json.loads(captions.read_text()).items()}
    coco["images"] = [{k: v for k, v in im.items() if k != "objects"} for im in coco["images"]]
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    assert recorded_objects(str(tmp_path / "coco.json"), str(tiny_data / "val2014"), eval_transform(64, 56)) is None
