"""Attention maps as explanations (captioning.saliency): the attention decoder's own weights, one map per
word, and the pointing game that judges them and the other methods alike."""
import os

import pytest
import torch
from conftest import SMALL, cli_error, cli_main

from captioning.checkpoint import atomic_save, build_models, checkpoint_state, load_captioner
from captioning.config import get_config
from captioning.data import eval_transform
from captioning.decoding import beam_search, greedy_search
from captioning.images import load_image
from captioning.saliency import (
    METHODS,
    attention_maps,
    decode_with_attention,
    explain_image,
    named_objects,
    pick_method,
    pointing_game,
    replay_attention,
    word_saliency,
)
from captioning.vocabulary import END

COLOURS, SHAPES = ("red", "green", "blue"), ("circle", "square", "triangle")


def _checkpoint(folder, data, vocab, decoder):
    """An untrained checkpoint of the given decoder at the tests' small sizes (32 px, layer2: a 4 x 4 grid)."""
    torch.manual_seed(0)
    config = get_config("tiny", data_dir=str(data), models_dir=str(folder), weights=None, decoder=decoder,
                        attention_size=16, max_seq_len=8, grid_layer=2, **SMALL)
    encoder, model = build_models(config, len(vocab))
    path = folder / f"{decoder}.ckpt"
    atomic_save(checkpoint_state(config, vocab, encoder, model), str(path))
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tiny_data, tiny_vocab, tmp_path_factory):
    folder = tmp_path_factory.mktemp("explain")
    return {kind: _checkpoint(folder, tiny_data, tiny_vocab, kind) for kind in ("attention", "lstm")}


@pytest.fixture(scope="module")
def attention_model(checkpoints):
    return load_captioner(checkpoints["attention"], "cpu")


@pytest.fixture(scope="module")
def val_images(tiny_data):
    folder = tiny_data / "val2014"
    return [str(folder / name) for name in sorted(os.listdir(folder))[:3]]


def _image(path, config):
    return eval_transform(config.resize_size, config.crop_size)(load_image(path))


def test_each_word_gets_its_attention_over_the_grid_upsampled_to_the_crop(attention_model, val_images):
    encoder, decoder, vocab, config = attention_model
    image, words, maps, note = explain_image(val_images[0], encoder, decoder, vocab, config)   # attention: the default
    grid = tuple(encoder.extract(image[None]).shape[-2:])
    assert grid == (4, 4) and note == "attention over a 4x4 grid"
    assert words and END not in words and maps.shape == (len(words), config.crop_size, config.crop_size)
    ids, weights, decoded_grid = decode_with_attention(encoder, decoder, image)
    assert decoded_grid == grid and weights.shape == (len(ids), 16)
    assert torch.allclose(weights.sum(1), torch.ones(len(ids)), atol=1e-5)       # a distribution over the cells
    assert [vocab.i2w[i] for i in ids[1:len(words) + 1]] == words
    upsampled = attention_maps(weights[1:len(words) + 1], grid, (config.crop_size, config.crop_size))
    assert torch.allclose(maps, upsampled / upsampled.flatten(1).max(1).values[:, None, None], atol=1e-6)
    assert float(maps.min()) >= 0 and torch.allclose(maps.flatten(1).max(1).values, torch.ones(len(words)))


def test_attention_maps_lay_the_weights_out_in_reading_order():
    weights = torch.zeros(3, 12)
    weights[0, 0], weights[1, 5], weights[2, 11] = 1, 1, 1         # cells (0, 0), (1, 1), (2, 3) of a 3 x 4 grid
    maps = attention_maps(weights, (3, 4), (30, 40))
    assert maps.shape == (3, 30, 40)
    peaks = [divmod(int(m.argmax()), 40) for m in maps]              # (row, column) in pixels: 10 x 10 per cell
    assert [(row // 10, col // 10) for row, col in peaks] == [(0, 0), (1, 1), (2, 3)]
    with pytest.raises(ValueError, match="3x3 grid"):
        attention_maps(weights, (3, 3), (30, 30))


def test_greedy_and_beam_1_give_the_same_maps_and_every_decode_its_own_weights(attention_model, val_images):
    encoder, decoder, vocab, config = attention_model
    for path in val_images:
        image = _image(path, config)
        features = encoder(image[None])
        greedy_ids, greedy_weights = greedy_search(decoder, features, return_weights=True)
        beam_ids, beam_weights = beam_search(decoder, features, 1, return_weights=True)
        assert greedy_ids == beam_ids and torch.allclose(greedy_weights[0], beam_weights[0])
        _, words, maps, _ = explain_image(path, encoder, decoder, vocab, config, beam_size=1)
        beam_maps = attention_maps(beam_weights[0][1:len(words) + 1], (4, 4), (config.crop_size, config.crop_size))
        assert torch.allclose(maps, beam_maps / beam_maps.flatten(1).max(1).values[:, None, None], atol=1e-6)
        # beam 3's weights are those of the caption it returns: replaying its ids reads the same cells
        ids, weights, _ = decode_with_attention(encoder, decoder, image, beam_size=3)
        assert torch.allclose(replay_attention(encoder, decoder, image, ids)[0], weights, atol=1e-6)
        maps, note = word_saliency(encoder, decoder, image, greedy_ids[0])
        assert note.startswith("attention") and maps.shape[0] == len(greedy_ids[0]) - 1


def test_attention_is_refused_for_the_pooled_model_saying_why(checkpoints, val_images):
    encoder, decoder, vocab, config = load_captioner(checkpoints["lstm"], "cpu")
    assert pick_method(decoder) == "occlusion"
    for explain in (lambda: explain_image(val_images[0], encoder, decoder, vocab, config, method="attention"),
                    lambda: word_saliency(encoder, decoder, _image(val_images[0], config), [1, 4, 2], "attention")):
        with pytest.raises(ValueError, match="has no attention to show; use occlusion or gradcam"):
            explain()
    with pytest.raises(ValueError, match="saliency method must be one of"):
        pick_method(decoder, "lime")


def test_occlusion_and_gradcam_explain_the_attention_model_too(attention_model, val_images):
    encoder, decoder, vocab, config = attention_model
    words = None
    for method, expected in (("occlusion", "occlusion, 11 px patches"), ("gradcam", "Grad-CAM on a 4x4 feature map")):
        _, found, maps, note = explain_image(val_images[1], encoder, decoder, vocab, config, method=method)
        assert note == expected and maps.shape == (len(found), config.crop_size, config.crop_size)
        assert 0 <= float(maps.min()) and float(maps.max()) <= 1
        assert words is None or found == words                                 # the same greedy caption
        words = found


def _box_map(box, value=1.0, size=20):
    """A (size, size) map that is `value` inside box (x0, y0, x1, y1) and 0 elsewhere."""
    heat = torch.zeros(size, size)
    x0, y0, x1, y1 = box
    heat[y0:y1, x0:x1] = value
    return heat


OBJECTS = [{"colour": "red", "shape": "circle", "box": [0, 0, 8, 8]},
           {"colour": "blue", "shape": "square", "box": [12, 12, 20, 20]},
           {"colour": "green", "shape": "triangle", "box": [12, 0, 20, 8]}]


def _play(words, maps, objects=OBJECTS, image_size=(20, 20), resize_size=20, crop_size=20):
    return pointing_game(words, maps, objects, COLOURS, SHAPES, image_size, resize_size, crop_size)


def test_pointing_game_hits_when_the_peak_of_colour_plus_shape_is_in_the_box():
    words = "a red circle and a blue square".split()
    red, blue, elsewhere = _box_map([1, 1, 4, 4]), _box_map([14, 14, 16, 16]), _box_map([0, 15, 3, 18])
    blank = torch.zeros(20, 20)
    maps = [blank, red, red, blank, blank, elsewhere, elsewhere]
    assert _play(words, maps) == [("red circle", True), ("blue square", False)]
    # the sum decides: the shape word's own peak is elsewhere, but colour + shape peak inside the box
    maps = [blank, blue * 0.6 + red * 0.6, red * 0.6 + elsewhere, blank, blank, blue, blank]
    assert _play(words, maps) == [("red circle", True), ("blue square", True)]
    # a flat map points nowhere
    assert _play(words, [blank] * 7) == [("red circle", False), ("blue square", False)]


def test_pointing_game_judges_only_first_mentions_of_rightly_named_objects():
    blank, red = torch.zeros(20, 20), _box_map([1, 1, 4, 4])
    # green is a triangle, not a circle; purple is no colour of the data; "red circle" again: judged once
    words = "a green circle a purple square a red circle the red circle".split()
    maps = [blank] * 7 + [red, red] + [blank] * 3
    assert _play(words, maps) == [("red circle", True)]
    assert named_objects(words, OBJECTS, COLOURS, SHAPES) == [(7, 0)]
    # two red circles: "red circle" names neither, so neither is judged
    twins = OBJECTS + [{"colour": "red", "shape": "circle", "box": [0, 12, 8, 20]}]
    assert _play("a red circle".split(), [blank, red, red], twins) == []
    # an object the centre crop cuts away is not judged: at 40 px cropped to 20, [0, 0, 4, 4] is in the margin
    corner = [{"colour": "red", "shape": "circle", "box": [0, 0, 4, 4]}]
    assert _play("a red circle".split(), [blank, red, red], corner, resize_size=40, crop_size=20) == []
    assert _play("a red circle".split(), [blank, red, red], corner, resize_size=40, crop_size=40) != []


def test_pointing_game_maps_the_box_into_the_crop():
    # a 100 x 50 image squashed to 64 x 64 and cropped to 56: the box [50, 25, 75, 50] lands at [28, 28, 44, 56]
    objects = [{"colour": "red", "shape": "circle", "box": [50, 25, 75, 50]}]
    inside, outside = _box_map([30, 30, 32, 32], size=56), _box_map([20, 30, 22, 32], size=56)
    for heat, hit in ((inside, True), (outside, False)):
        assert _play(["red", "circle"], [heat, heat], objects, (100, 50), 64, 56) == [("red circle", hit)]


def test_caption_explain_draws_an_attention_checkpoints_own_attention(checkpoints, val_images, tmp_path, capsys):
    out = tmp_path / "why"
    cli_main("caption", *val_images[:2], "--checkpoint", checkpoints["attention"], "--explain", out, "--beam", "1")
    names = sorted(os.path.basename(p).replace(".jpg", ".png") for p in val_images[:2])
    assert sorted(os.listdir(out)) == names
    assert "wrote" in capsys.readouterr().err
    from PIL import Image

    with Image.open(out / names[0]) as png:
        assert png.size[0] > 300
    cli_main("caption", val_images[0], "--checkpoint", checkpoints["attention"], "--explain", tmp_path / "occ",
             "--explain-method", "occlusion")
    assert os.listdir(tmp_path / "occ") == [names[0]]


def test_caption_explain_method_attention_on_the_pooled_model_is_a_one_line_error(checkpoints, val_images, tmp_path):
    error = cli_error("caption", val_images[0], "--checkpoint", checkpoints["lstm"], "--explain", tmp_path / "x",
                      "--explain-method", "attention")
    assert "no attention to show; use occlusion or gradcam" in error and not (tmp_path / "x").exists()
    error = cli_error("caption", val_images[0], "--checkpoint", checkpoints["lstm"], "--explain-method", "gradcam")
    assert "give --explain too" in error


def test_the_cli_offers_the_librarys_methods():
    from captioning.__main__ import EXPLAIN_METHODS

    assert EXPLAIN_METHODS == METHODS
