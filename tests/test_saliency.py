"""Per-word saliency (captioning.saliency): the map for a colour word must point at that object."""
import json
import os

import pytest
from conftest import run_cli

from captioning.checkpoint import load_captioner
from captioning.config import get_config
from captioning.saliency import crop_box, explain_image, points_at_objects, word_saliency
from captioning.tinyset import make_tinyset
from captioning.training import train


@pytest.fixture(scope="module")
def seeing_model(tmp_path_factory):
    """A small model trained long enough to name colours (a random backbone carries colour well)."""
    root = tmp_path_factory.mktemp("saliency")
    data = root / "tiny"
    make_tinyset(str(data), train=400, val=40, seed=5)
    config = get_config("tiny", data_dir=str(data), models_dir=str(root / "models"), weights=None,
                        embedding_size=64, hidden_layer_size=128, batch_size=64, epochs=6, cache_views=2,
                        vocab_threshold=1, progress=False, val_max_captions=50)
    summary = train(config)
    return data, summary["last"]


def test_crop_box_maps_original_pixels_into_the_centre_crop():
    assert crop_box([0, 0, 100, 50], (100, 50), 64, 56) == [0, 0, 56, 56]
    assert crop_box([50, 25, 75, 50], (100, 50), 64, 56) == [28, 28, 44, 56]


def test_colour_words_point_at_their_objects(seeing_model):
    data, checkpoint = seeing_model
    encoder, decoder, vocab, config = load_captioner(checkpoint, "cpu")
    meta = json.load(open(data / "annotations" / "captions_val2014.json"))
    pairs = [im for im in meta["images"] if len(im["objects"]) == 2
             and im["objects"][0]["colour"] != im["objects"][1]["colour"]]
    judged = []
    for im in pairs[:14]:
        image, words, maps, note = explain_image(str(data / "val2014" / im["file_name"]), encoder, decoder, vocab,
                                                 config)
        assert maps.shape == (len(words), config.crop_size, config.crop_size) and note.startswith("occlusion")
        assert 0 <= float(maps.min()) and float(maps.max()) <= 1
        judged += points_at_objects(words, maps, im["objects"], (im["width"], im["height"]), config.resize_size,
                                    config.crop_size)
    assert len(judged) >= 8, f"the model named too few colours to judge: {judged}"
    right = sum(ok for _, ok in judged) / len(judged)
    print(f"pointing: {right:.0%} of {len(judged)}")
    assert right >= 0.75, f"colour words point at their own object only {right:.0%} of the time: {judged}"


def test_gradcam_gives_one_map_per_word_and_rejects_unknown_methods(seeing_model):
    data, checkpoint = seeing_model
    encoder, decoder, vocab, config = load_captioner(checkpoint, "cpu")
    path = str(data / "val2014" / sorted(os.listdir(data / "val2014"))[0])
    image, words, maps, note = explain_image(path, encoder, decoder, vocab, config, method="gradcam")
    assert maps.shape[0] == len(words) and "4x4 feature map" in note          # 56 px: layer3's map, not the 2x2
    with pytest.raises(ValueError, match="saliency method"):
        word_saliency(encoder, decoder, image, [1, 4, 2], method="attention")


def test_cli_writes_one_png_per_image(seeing_model, tmp_path):
    data, checkpoint = seeing_model
    images = sorted(os.listdir(data / "val2014"))[:2]
    out = tmp_path / "why"
    proc = run_cli("caption", *[data / "val2014" / n for n in images], "--checkpoint", checkpoint,
                   "--explain", out, "--json")
    assert sorted(os.listdir(out)) == sorted(n.replace(".jpg", ".png") for n in images)
    assert json.loads(proc.stdout)[0]["caption"]                                # stdout stays clean JSON
    from PIL import Image

    with Image.open(out / images[0].replace(".jpg", ".png")) as png:
        assert png.size[0] > 300
