import json
import os

import pytest
from conftest import cli_main, run_cli, tree_digest
from PIL import Image, ImageDraw
from pycocotools.coco import COCO

from captioning.semantics import load_ground_truth, semantic_accuracy
from captioning.tinyset import (
    BACKGROUND,
    COLOURS,
    DRAWABLE_SHAPES,
    NAMED_COLOURS,
    ONE_OBJECT,
    RELATION_INVERSES,
    SHAPES,
    TWO_OBJECTS,
    draw_shape,
    make_tinyset,
)
from captioning.vocabulary import tokenize

JPEG_TOLERANCE = 40  # per channel: JPEG, chroma subsampling and the blur move a shape's colour a little


def test_layout_and_format_load_with_pycocotools(tiny_data):
    for split, n in (("train", 60), ("val", 16)):
        raw = json.load(open(tiny_data / "annotations" / f"captions_{split}2014.json"))
        assert set(raw) >= {"info", "licenses", "images", "annotations"}
        coco = COCO(str(tiny_data / "annotations" / f"captions_{split}2014.json"))
        assert len(coco.imgs) == n
        for img in coco.imgs.values():
            assert set(img) >= {"id", "file_name", "width", "height"}
            assert img["file_name"].startswith(f"COCO_{split}2014_")
            with Image.open(tiny_data / f"{split}2014" / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) and im.format == "JPEG"
            assert len(coco.imgToAnns[img["id"]]) == 5
    train_ids = set(COCO(str(tiny_data / "annotations" / "captions_train2014.json")).imgs)
    val_ids = set(COCO(str(tiny_data / "annotations" / "captions_val2014.json")).imgs)
    assert not train_ids & val_ids


def test_captions_vary_like_human_ones(tiny_data):
    caps = [a["caption"] for a in json.load(open(tiny_data / "annotations" / "captions_train2014.json"))["annotations"]]
    assert any(c.endswith(".") for c in caps) and any(not c.endswith(".") for c in caps)
    assert any(c[0].isupper() for c in caps) and any(c[0].islower() for c in caps)
    text = " ".join(caps).lower()
    assert sum(c in text for c in COLOURS) >= 5 and all(s in text for s in SHAPES)
    assert "to the left of" in text or "to the right of" in text
    per_image = {}
    for a in json.load(open(tiny_data / "annotations" / "captions_train2014.json"))["annotations"]:
        per_image.setdefault(a["image_id"], set()).add(a["caption"].lower().rstrip("."))
    assert all(len(v) == 5 for v in per_image.values())  # five different phrasings per image
    sizes = {Image.open(p).size for p in (tiny_data / "train2014").iterdir()}
    assert len(sizes) > 1 and any(w != h for w, h in sizes)


def test_deterministic_per_seed(tmp_path):
    make_tinyset(str(tmp_path / "a"), train=8, val=3, seed=5)
    make_tinyset(str(tmp_path / "b"), train=8, val=3, seed=5)
    make_tinyset(str(tmp_path / "c"), train=8, val=3, seed=6)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_bad_sizes_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="at least one image"):
        make_tinyset(str(tmp_path / "x"), train=0, val=1)


def test_cli(tmp_path):
    run_cli("tinyset", "--out", tmp_path / "t", "--train", 4, "--val", 2, "--seed", 3)
    assert len(os.listdir(tmp_path / "t" / "train2014")) == 4
    assert len(os.listdir(tmp_path / "t" / "val2014")) == 2


def test_cli_world_shapes_is_the_tiny_set(tmp_path):
    """--world shapes, the default, writes what make_tinyset writes; --world relations something else."""
    make_tinyset(str(tmp_path / "lib"), train=3, val=2, seed=4)
    for world in ("shapes", "relations"):
        cli_main("tinyset", "--world", world, "--out", tmp_path / world, "--train", 3, "--val", 2, "--seed", 4)
    assert tree_digest(tmp_path / "shapes") == tree_digest(tmp_path / "lib") != tree_digest(tmp_path / "relations")
    assert "world" not in json.load(open(tmp_path / "shapes" / "annotations" / "captions_val2014.json"))


def test_default_generation_is_unchanged(tmp_path):
    """The draws behind the bundled set are pinned: the same seed gives the same scenes and captions."""
    make_tinyset(str(tmp_path / "t"), train=2, val=1, seed=0)
    raw = json.load(open(tmp_path / "t" / "annotations" / "captions_train2014.json"))
    first = raw["images"][0]
    assert (first["width"], first["height"]) == (112, 98)
    assert first["objects"] == [{"colour": "purple", "shape": "square", "box": [38, 34, 74, 70]}]
    assert first["relation"] is None
    assert [a["caption"] for a in raw["annotations"][:5]] == [
        "There is a purple square in the picture.", "one purple square on a plain background",
        "a purple square on a plain background", "a picture of a purple square.", "A single purple square."]


def _mean_rgb(image, x, y, r=1):
    pixels = [image.getpixel((x + dx, y + dy)) for dx in range(-r, r + 1) for dy in range(-r, r + 1)]
    return tuple(sum(p[c] for p in pixels) / len(pixels) for c in range(3))


def _close(a, b, tolerance=JPEG_TOLERANCE):
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


def _check_pixels(folder, split, colours, background):
    """Every ground-truth box lies in its image, shows its object's colour at the centre, and the
    boxes stand where the relation says."""
    raw = json.load(open(folder / "annotations" / f"captions_{split}2014.json"))
    checked = 0
    for img in raw["images"]:
        image = Image.open(folder / f"{split}2014" / img["file_name"]).convert("RGB")
        assert _close(image.getpixel((0, 0)), background)
        centres = []
        for obj in img["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 < img["width"] and 0 <= y0 < y1 < img["height"]
            centre = ((x0 + x1) // 2, (y0 + y1) // 2)
            assert _close(_mean_rgb(image, *centre), colours[obj["colour"]]), (img["file_name"], obj)
            centres.append(centre)
            checked += 1
        if img["relation"] is not None:
            i, phrase, j = img["relation"]
            axis, sign = {"to the left of": (0, 1), "to the right of": (0, -1), "above": (1, 1),
                          "below": (1, -1)}[phrase]
            assert sign * (centres[j][axis] - centres[i][axis]) > 0, (img["file_name"], phrase)
    return checked


def test_ground_truth_matches_the_pixels(tiny_data):
    for split in ("train", "val"):
        assert _check_pixels(tiny_data, split, COLOURS, BACKGROUND) > 0
    raw = json.load(open(tiny_data / "annotations" / "captions_val2014.json"))
    assert raw["relations"] == RELATION_INVERSES and raw["shapes"] == list(SHAPES)
    assert {len(img["objects"]) for img in raw["images"]} == {1, 2}
    assert all((img["relation"] is None) == (len(img["objects"]) == 1) for img in raw["images"])


def _template_words():
    words = {"an"}                                   # 'a {a}' becomes 'an {a}' before a vowel sound
    for template in ONE_OBJECT + TWO_OBJECTS:
        words |= set(tokenize(template.format(a="", b="", rel="", inv="")))
    for phrase in RELATION_INVERSES:
        words |= set(tokenize(phrase))
    return words


def test_own_colours_shapes_and_background(tmp_path):
    colours = {"pink": NAMED_COLOURS["pink"], "navy": (31, 58, 147), "lime": NAMED_COLOURS["lime"]}
    shapes = ("star", "hexagon", "cross", "heart")
    background = (30, 30, 30)
    out = tmp_path / "own"
    make_tinyset(str(out), train=20, val=10, seed=2, colours=colours, shapes=shapes, background=background)
    for split in ("train", "val"):
        path = out / "annotations" / f"captions_{split}2014.json"
        refs = {}
        for a in json.load(open(path))["annotations"]:
            refs.setdefault(a["image_id"], []).append(a["caption"])
        words = {w for caps in refs.values() for c in caps for w in tokenize(c)}
        assert words - _template_words() <= set(colours) | set(shapes)
        assert words & set(colours) and words & set(shapes) and not words & (set(COLOURS) | set(SHAPES))
        truth = load_ground_truth(path)
        assert truth["colours"] == tuple(colours) and truth["shapes"] == shapes
        for k in range(5):
            acc = semantic_accuracy({i: caps[k] for i, caps in refs.items()}, truth)
            assert (acc["objects"], acc["colours"], acc["shapes"], acc["relation"]) == (1.0, 1.0, 1.0, 1.0)
        assert _check_pixels(out, split, colours, background) > 0


@pytest.mark.parametrize("shape", DRAWABLE_SHAPES)
def test_draw_shape_fills_its_box_in_its_colour(shape):
    colour, box = (200, 30, 40), (10, 10, 50, 50)
    for rotation in (0.0, 37.0):
        image = Image.new("RGB", (60, 60), BACKGROUND)
        draw_shape(ImageDraw.Draw(image), shape, box, colour, rotation=rotation)
        centre, corner = image.getpixel((30, 30)), image.getpixel((2, 2))
        assert corner == BACKGROUND
        if shape == "ring":
            assert centre == BACKGROUND and image.getpixel((30, 11)) == colour
        elif shape == "crescent":                      # hollow in the middle
            assert centre == BACKGROUND and colour in {c for _, c in image.getcolors()}
        elif shape == "chevron":                       # its inner corner sits at the middle
            assert colour in {c for _, c in image.getcolors()}
        else:
            assert centre == colour
    turned, upright = Image.new("RGB", (60, 60), BACKGROUND), Image.new("RGB", (60, 60), BACKGROUND)
    draw_shape(ImageDraw.Draw(turned), shape, box, colour, rotation=20)
    draw_shape(ImageDraw.Draw(upright), shape, box, colour)
    assert (turned.tobytes() == upright.tobytes()) == (shape in ("circle", "ring"))


def test_non_square_images_and_object_sizes_of_your_own(tmp_path):
    out = tmp_path / "wide"
    make_tinyset(str(out), train=30, val=4, seed=3, shapes=("bar", "kite"), image_size=((150, 180), (60, 70)),
                 object_size=(0.3, 0.3))
    images = json.load(open(out / "annotations" / "captions_train2014.json"))["images"]
    assert all(150 <= i["width"] <= 180 and 60 <= i["height"] <= 70 for i in images)
    assert {Image.open(out / "train2014" / i["file_name"]).size for i in images} == {(i["width"], i["height"])
                                                                                   for i in images}
    sides = {round((o["box"][2] - o["box"][0]) / min(i["width"], i["height"]), 1) for i in images
             for o in i["objects"]}
    assert sides == {0.3}
    for bad in ({"image_size": ((90, 80), (60, 70))}, {"image_size": ((10, 20), (60, 70))},
                {"object_size": (0.3, 0.9)}, {"object_size": "big"}):
        with pytest.raises(ValueError, match="smallest <= largest"):
            make_tinyset(str(tmp_path / "bad"), train=1, val=1, **bad)
    assert not (tmp_path / "bad").exists()


def test_bad_names_are_errors(tmp_path):
    image = Image.new("RGB", (20, 20))
    with pytest.raises(ValueError, match="'blob'.*circle, square, triangle"):
        draw_shape(ImageDraw.Draw(image), "blob", (2, 2, 18, 18), (0, 0, 0))
    with pytest.raises(ValueError, match="'blob'"):
        make_tinyset(str(tmp_path / "x"), train=1, val=1, shapes=("star", "blob"))
    with pytest.raises(ValueError, match="lowercase words"):
        make_tinyset(str(tmp_path / "x"), train=1, val=1, colours={"Dark-Red": (90, 0, 0), "red": (9, 0, 0)})
    with pytest.raises(ValueError, match="0..255"):
        make_tinyset(str(tmp_path / "x"), train=1, val=1, colours={"red": (300, 0, 0), "blue": (0, 0, 200)})
    with pytest.raises(ValueError, match="two different"):
        make_tinyset(str(tmp_path / "x"), train=1, val=1, colours={"red": (200, 0, 0)}, shapes=("star",))
    assert not (tmp_path / "x").exists()  # checked before anything is written


def test_cli_own_palette_and_bad_names(tmp_path):
    out = tmp_path / "t"
    run_cli("tinyset", "--out", out, "--train", 3, "--val", 2, "--colours", "pink, navy=#1f3a93",
            "--shapes", "star,hexagon", "--background", "#101010")
    raw = json.load(open(out / "annotations" / "captions_train2014.json"))
    assert raw["colours"] == {"pink": list(NAMED_COLOURS["pink"]), "navy": [31, 58, 147]}
    assert raw["shapes"] == ["star", "hexagon"] and raw["background"] == [16, 16, 16]
    bad = (("--shapes", "star,blob", "'blob'"), ("--colours", "pink,chartreuse", "chartreuse"),
           ("--colours", "navy=#12345", "#12345"), ("--background", "nope", "nope"))
    for option, value, named in bad:
        proc = run_cli("tinyset", "--out", tmp_path / "bad", option, value, check=False)
        assert proc.returncode != 0, (option, value)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], proc.stderr
    assert not (tmp_path / "bad").exists()
