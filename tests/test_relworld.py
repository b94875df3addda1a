import json
import os
import re

import pytest
from conftest import cli_error, cli_main, tree_digest
from PIL import Image
from pycocotools.coco import COCO

from captioning.relworld import LEVEL_OFFSET, MARGIN, RELATION_OFFSET, make_relations_world
from captioning.semantics import load_ground_truth, parse_relations, semantic_accuracy
from captioning.tinyset import BACKGROUND, COLOURS, NAMED_COLOURS, RELATION_INVERSES, SHAPES

JPEG_TOLERANCE = 40  # per channel: JPEG, chroma subsampling and the blur move a shape's colour a little
SPLITS = (("train", 60, 1), ("val", 20, 100_001))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small relations world (60 train / 20 val images, three objects each), shared read-only."""
    out = tmp_path_factory.mktemp("data") / "relations"
    make_relations_world(str(out), train=60, val=20, seed=1)
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Two to four objects per image, a palette of its own."""
    out = tmp_path_factory.mktemp("data") / "mixed"
    colours = {"pink": NAMED_COLOURS["pink"], "navy": (31, 58, 147), "lime": NAMED_COLOURS["lime"]}
    make_relations_world(str(out), train=60, val=10, seed=2, colours=colours, shapes=("star", "hexagon"),
                         background=(30, 30, 30), objects=(2, 4))
    return out


def _raw(folder, split):
    return json.load(open(folder / "annotations" / f"captions_{split}2014.json"))


def _references(raw):
    refs = {}
    for a in raw["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    return refs


def test_layout_and_format_load_with_pycocotools(world):
    ann_ids = []
    for split, n, first_id in SPLITS:
        raw = _raw(world, split)
        assert set(raw) >= {"info", "licenses", "images", "annotations", "relations", "colours", "shapes",
                            "background", "world"}
        assert raw["world"] == "relations" and raw["relations"] == RELATION_INVERSES
        assert raw["colours"] == {name: list(rgb) for name, rgb in COLOURS.items()} and raw["shapes"] == list(SHAPES)
        coco = COCO(str(world / "annotations" / f"captions_{split}2014.json"))
        assert sorted(coco.imgs) == list(range(first_id, first_id + n))
        for img in coco.imgs.values():
            assert img["file_name"] == f"COCO_{split}2014_{img['id']:012d}.jpg"
            with Image.open(world / f"{split}2014" / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) and im.format == "JPEG"
            assert 96 <= img["width"] <= 128 and 88 <= img["height"] <= 120
            captions = [a["caption"] for a in coco.imgToAnns[img["id"]]]
            assert len(captions) == 5 and len({c.lower().rstrip(".") for c in captions}) == 5
            assert len(img["objects"]) == 3 and img["relation_count"] == 2 and img["relation"] is None
        assert len(os.listdir(world / f"{split}2014")) == n
        ann_ids += [a["id"] for a in raw["annotations"]]
    assert ann_ids == list(range(1, len(ann_ids) + 1))                 # one run of ids over both splits


def test_deterministic_per_seed(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        make_relations_world(str(tmp_path / name), train=6, val=2, seed=seed)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def _connected(pairs, n):
    """Whether the (i, j) pairs join all n objects into one group."""
    group = list(range(n))

    def root(k):
        while group[k] != k:
            k = group[k]
        return k

    for i, j in pairs:
        group[root(i)] = root(j)
    return len({root(k) for k in range(n)}) == 1


def _check_captions(folder, split):
    """Every caption names the image's objects and states relation_count true relations (each pair once)
    that connect all of them; returns how many captions were checked."""
    raw = _raw(folder, split)
    refs = _references(raw)
    colours, shapes = list(raw["colours"]), raw["shapes"]
    checked = 0
    for img in raw["images"]:
        objects = [(o["colour"], o["shape"]) for o in img["objects"]]
        true = {(objects[i], p, objects[j]) for i, p, j in img["relations"]}
        true |= {(o, RELATION_INVERSES[p], s) for s, p, o in true}
        for caption in refs[img["id"]]:
            named, stated = parse_relations(caption, colours, shapes, RELATION_INVERSES)
            assert set(named) == set(objects), caption
            assert set(stated) <= true, (caption, img["relations"])
            pairs = {frozenset((objects.index(s), objects.index(o))) for s, _, o in stated}
            assert len(stated) == len(pairs) == img["relation_count"] == len(objects) - 1, caption
            assert _connected([tuple(p) for p in pairs], len(objects)), caption
            checked += 1
    truth = load_ground_truth(folder / "annotations" / f"captions_{split}2014.json")
    for k in range(5):
        acc = semantic_accuracy({i: caps[k] for i, caps in refs.items()}, truth)
        assert [acc[key] for key in ("objects", "colours", "shapes", "relation", "all")] == [1.0] * 5
        assert acc["counts"]["relation_judged"] == len(refs)
    return checked


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_caption_states_true_relations_that_connect_all_objects(world, mixed, split):
    assert _check_captions(world, split) == 5 * dict((s, n) for s, n, _ in SPLITS)[split]
    assert _check_captions(mixed, split) > 0


def _mean_rgb(image, x, y, r=1):
    pixels = [image.getpixel((x + dx, y + dy)) for dx in range(-r, r + 1) for dy in range(-r, r + 1)]
    return tuple(sum(p[c] for p in pixels) / len(pixels) for c in range(3))


def _check_geometry(folder, split, colours, background, object_size=(0.22, 0.30)):
    """Boxes inside the margins, apart from each other, of the right size and colour; the truth's
    relations exactly those the centres show, each pair clearly offset on one axis at least."""
    raw = _raw(folder, split)
    for img in raw["images"]:
        image = Image.open(folder / f"{split}2014" / img["file_name"]).convert("RGB")
        width, height, boxes = img["width"], img["height"], [o["box"] for o in img["objects"]]
        assert all(abs(a - b) <= JPEG_TOLERANCE for a, b in zip(image.getpixel((0, 0)), background))
        short = min(width, height)
        for obj, (x0, y0, x1, y1) in zip(img["objects"], boxes):
            assert MARGIN * width - 1 <= x0 < x1 <= (1 - MARGIN) * width + 1
            assert MARGIN * height - 1 <= y0 < y1 <= (1 - MARGIN) * height + 1
            assert x1 - x0 == y1 - y0 and int(object_size[0] * short) <= x1 - x0 <= object_size[1] * short
            centre = ((x0 + x1) // 2, (y0 + y1) // 2)
            rgb = _mean_rgb(image, *centre)
            assert all(abs(a - b) <= JPEG_TOLERANCE for a, b in zip(rgb, colours[obj["colour"]])), obj
        expected = set()
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                apart = (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])
                assert apart, (img["file_name"], a, b)
                larger = max(a[2] - a[0], b[2] - b[0])
                clear = 0
                for axis, phrase in ((0, "to the left of"), (1, "above")):
                    offset = (b[axis] + b[axis + 2] - a[axis] - a[axis + 2]) / 2
                    if abs(offset) >= RELATION_OFFSET * larger:
                        expected.add((i, phrase, j) if offset > 0 else (j, phrase, i))
                        clear += 1
                    else:
                        assert abs(offset) <= LEVEL_OFFSET * larger, (img["file_name"], a, b, phrase)
                assert clear >= 1
        assert {tuple(r) for r in img["relations"]} == expected
        assert len(img["relations"]) == len(expected)
    return len(raw["images"])


def test_truth_relations_follow_the_boxes_and_the_pixels(world, mixed):
    for split, n, _ in SPLITS:
        assert _check_geometry(world, split, COLOURS, BACKGROUND) == n
    raw = _raw(mixed, "train")
    colours = {name: tuple(rgb) for name, rgb in raw["colours"].items()}
    assert _check_geometry(mixed, "train", colours, (30, 30, 30)) == 60
    both = [img for img in _raw(world, "train")["images"] if len(img["relations"]) > 2]
    assert both  # some pairs are offset on both axes: two true relations


def _form(caption, raw):
    """A caption's sentence form: each object name, relation phrase and article replaced by a placeholder."""
    text = caption.lower().rstrip(".")
    for phrase in sorted(RELATION_INVERSES, key=len, reverse=True):
        text = text.replace(phrase, "REL")
    names = "|".join(sorted(raw["colours"], key=len, reverse=True))
    text = re.sub(rf"\b(a|an|the) ({names}) ({'|'.join(raw['shapes'])})\b", "OBJ", text)
    return text


def test_captions_vary_like_human_ones(world):
    raw = _raw(world, "train")
    captions = [a["caption"] for a in raw["annotations"]]
    forms = {_form(c, raw) for c in captions}
    assert all("OBJ" in f and "REL" in f and not re.search(r"\b(red|circle|left|above)\b", f) for f in forms)
    assert len(forms) >= 6
    assert any(c.endswith(".") for c in captions) and any(not c.endswith(".") for c in captions)
    assert any(c[0].isupper() for c in captions) and any(c[0].islower() for c in captions)
    text = " ".join(captions).lower()
    assert all(phrase in text for phrase in RELATION_INVERSES) and " an orange " in text


def test_object_count_range(mixed):
    images = _raw(mixed, "train")["images"]
    assert {len(img["objects"]) for img in images} == {2, 3, 4}
    assert all(img["relation_count"] == len(img["objects"]) - 1 for img in images)
    assert all(len(set((o["colour"], o["shape"]) for o in img["objects"])) == len(img["objects"]) for img in images)


@pytest.mark.parametrize("options, message", [
    ({"train": 0}, "at least one image"),
    ({"objects": (1, 3)}, "2 <= fewest <= most <= 4"),
    ({"objects": (3, 5)}, "2 <= fewest <= most <= 4"),
    ({"objects": (3, 2)}, "2 <= fewest <= most <= 4"),
    ({"objects": (2.0, 3)}, "whole numbers"),
    ({"objects": 3}, "whole numbers"),
    ({"colours": {"red": (200, 0, 0)}, "shapes": ("circle", "square")}, "3 different .colour, shape. pairs.*gives 2"),
    ({"shapes": ("circle", "blob")}, "'blob'"),
    ({"object_size": (0.3, 0.9)}, "smallest <= largest"),
    ({"image_size": ((40, 40), (40, 40)), "object_size": (0.45, 0.45), "objects": (4, 4)}, "cannot place 4"),
])
def test_bad_input_is_an_error_before_anything_is_written(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        make_relations_world(str(tmp_path / "x"), **{"train": 1, "val": 1, **options})
    assert not (tmp_path / "x").exists()


def test_cli_writes_the_relations_world(tmp_path):
    out = tmp_path / "relations"
    cli_main("tinyset", "--world", "relations", "--out", out, "--train", 4, "--val", 2, "--seed", 3,
             "--colours", "pink,navy=#1f3a93", "--shapes", "star,hexagon")
    assert len(os.listdir(out / "train2014")) == 4 and len(os.listdir(out / "val2014")) == 2
    raw = _raw(out, "val")
    assert raw["world"] == "relations" and raw["shapes"] == ["star", "hexagon"]
    assert raw["colours"] == {"pink": list(NAMED_COLOURS["pink"]), "navy": [31, 58, 147]}
    message = cli_error("tinyset", "--world", "relations", "--out", tmp_path / "bad", "--colours", "pink",
                        "--shapes", "star,hexagon")
    assert "3 different (colour, shape) pairs" in message and not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        cli_main("tinyset", "--world", "cities", "--out", tmp_path / "bad")
