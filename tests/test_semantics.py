import json

import pytest

from captioning.semantics import format_semantic, load_ground_truth, parse_caption, semantic_accuracy
from captioning.tinyset import COLOURS, ONE_OBJECT, RELATION_INVERSES, RELATIONS, SHAPES, TWO_OBJECTS

RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE = ("red", "circle"), ("blue", "square"), ("green", "triangle")


def _captions_json(tiny_data, split="val"):
    return tiny_data / "annotations" / f"captions_{split}2014.json"


def _references(path):
    refs = {}
    for a in json.load(open(path))["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    return refs


def _truth(images):
    """A hand-written ground truth: {image_id: (objects, relation)}."""
    return {"images": {i: {"objects": objects, "relation": relation, "boxes": []}
                       for i, (objects, relation) in images.items()},
            "relations": RELATION_INVERSES, "colours": tuple(COLOURS), "shapes": SHAPES}


def _parse(caption):
    return parse_caption(caption, COLOURS, SHAPES, RELATION_INVERSES)


@pytest.mark.parametrize("split", ["train", "val"])
def test_references_score_full_marks(tiny_data, split):
    path = _captions_json(tiny_data, split)
    truth = load_ground_truth(path)
    refs = _references(path)
    assert set(truth["images"]) == set(refs)
    phrases = set()
    for k in range(5):  # every image's k-th reference: all the templates get their turn
        acc = semantic_accuracy({i: caps[k] for i, caps in refs.items()}, truth)
        assert (acc["objects"], acc["colours"], acc["shapes"], acc["relation"]) == (1.0, 1.0, 1.0, 1.0)
        assert acc["counts"]["images"] == len(refs)
        assert acc["counts"]["relation_judged"] == acc["counts"]["two_object_images"] > 0
        assert all(v["objects"] and v["colours"] and v["shapes"] for v in acc["per_image"].values())
        phrases |= {p for caps in refs.values() for p in RELATION_INVERSES if p in caps[k].lower()}
    assert phrases == set(RELATION_INVERSES)  # inverse phrasings were among those scored


@pytest.mark.parametrize("template", TWO_OBJECTS)
@pytest.mark.parametrize("relation", list(RELATIONS))
def test_every_two_object_template_parses(template, relation):
    inverse = RELATIONS[relation]
    caption = template.format(a="red circle", b="blue square", rel=relation, inv=inverse)
    for variant in (caption, caption.lower(), caption.title(), caption.rstrip(".") + "."):
        objects, stated = _parse(variant)
        assert sorted(objects) == sorted([RED_CIRCLE, BLUE_SQUARE]), variant
        if "{inv}" in template:
            assert stated == (BLUE_SQUARE, inverse, RED_CIRCLE), variant
        else:
            assert stated == (RED_CIRCLE, relation, BLUE_SQUARE), variant


@pytest.mark.parametrize("template", ONE_OBJECT)
def test_every_one_object_template_parses(template):
    caption = template.format(a="yellow triangle")
    assert _parse(caption.title()) == ([("yellow", "triangle")], None)


def test_the_object_named_first_comes_first():
    objects, _ = _parse("a blue square to the right of a red circle")
    assert objects == [BLUE_SQUARE, RED_CIRCLE]


def test_multi_word_names_match_as_phrases_the_longest_first():
    colours, shapes = ("red", "dark red"), ("star",)
    objects, stated = parse_caption("A Dark Red star to the right of a red star", colours, shapes, RELATION_INVERSES)
    assert objects == [("dark red", "star"), ("red", "star")]
    assert stated == (("dark red", "star"), "to the right of", ("red", "star"))


def test_a_colour_or_shape_alone_is_an_object_with_a_missing_part():
    assert _parse("a red thing to the left of a square") == (
        [("red", None), (None, "square")], (("red", None), "to the left of", (None, "square")))
    truth = _truth({1: ([RED_CIRCLE, BLUE_SQUARE], (0, "to the left of", 1))})
    acc = semantic_accuracy({1: "a red circle to the left of a blue"}, truth)
    assert acc["per_image"][1] == {"objects": False, "colours": True, "shapes": False, "relation": None}
    extra = {2: "a red circle to the left of a blue square and a green one",
             3: "a red circle to the left of a blue square near a triangle"}
    truth = _truth({i: ([RED_CIRCLE, BLUE_SQUARE], (0, "to the left of", 1)) for i in extra})
    acc = semantic_accuracy(extra, truth)
    assert [v["objects"] for v in acc["per_image"].values()] == [False, False]
    assert not any(v["colours"] or v["shapes"] for v in acc["per_image"].values())


def test_one_wrong_shape_loses_exactly_those_images(tiny_data):
    path = _captions_json(tiny_data)
    truth = load_ground_truth(path)
    predictions = {i: caps[0] for i, caps in _references(path).items()}
    changed = sorted(predictions)[::5]
    for i in changed:
        objects = truth["images"][i]["objects"]
        colour, shape = objects[0]
        other = next(s for s in SHAPES if s != shape and (colour, s) not in objects)
        predictions[i] = predictions[i].lower().replace(f"{colour} {shape}", f"{colour} {other}")
    acc = semantic_accuracy(predictions, truth)
    n = len(predictions)
    assert acc["counts"]["objects"] == acc["counts"]["shapes"] == n - len(changed)
    assert acc["shapes"] == acc["objects"] == (n - len(changed)) / n
    assert acc["colours"] == 1.0 and acc["relation"] == 1.0
    assert sorted(i for i, v in acc["per_image"].items() if not v["shapes"]) == changed
    assert all(acc["per_image"][i]["relation"] is None for i in changed)  # not judged: objects wrong


def test_the_wrong_number_of_objects_is_wrong():
    truth = _truth({1: ([RED_CIRCLE, BLUE_SQUARE], (0, "to the left of", 1)), 2: ([RED_CIRCLE], None)})
    three = "a red circle to the left of a blue square and a green triangle"
    acc = semantic_accuracy({1: three, 2: "a red circle and a blue square"}, truth)
    assert acc["per_image"][1]["objects"] is False and acc["per_image"][1]["shapes"] is False
    assert acc["per_image"][2] == {"objects": False, "colours": False, "shapes": False, "relation": None}
    one = semantic_accuracy({1: "a red circle", 2: "a red circle"}, truth)
    assert one["per_image"][1]["objects"] is False and one["per_image"][2]["objects"] is True
    assert one["objects"] == 0.5 and one["relation"] is None


def test_relation_said_either_way_round_is_right_and_swapped_is_wrong():
    left_of = ([RED_CIRCLE, BLUE_SQUARE], (0, "to the left of", 1))
    captions = {
        1: "a red circle to the left of a blue square",
        2: "A blue square to the right of a red circle.",
        3: "a red circle and a blue square, the red circle is to the left of the blue square",
        4: "a blue square to the left of a red circle",                  # swapped
        5: "a red circle to the right of a blue square",                 # swapped, said the other way
        6: "a red circle above a blue square",                           # another relation
        7: "a red circle and a blue square",                             # none stated
        8: "a red circle to the left of a blue square, the blue square is to the left of the red circle",
    }
    acc = semantic_accuracy(captions, _truth({i: left_of for i in captions}))
    assert {i: v["relation"] for i, v in acc["per_image"].items()} == {
        1: True, 2: True, 3: True, 4: False, 5: False, 6: False, 7: False, 8: False}
    assert all(v["objects"] for v in acc["per_image"].values())
    assert acc["relation"] == 3 / 8 and acc["counts"]["relation"] == 3


def test_no_ground_truth_and_bad_input(tmp_path):
    plain = tmp_path / "coco.json"
    plain.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": []}))
    assert load_ground_truth(plain) is None
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"images": [{"id": 1, "objects": [], "relation": None}]}))
    with pytest.raises(ValueError, match="broken.json.*relations"):
        load_ground_truth(broken)
    truth = _truth({1: ([RED_CIRCLE], None)})
    with pytest.raises(ValueError, match="no ground truth for image ids \\[7\\]"):
        semantic_accuracy({7: "a red circle"}, truth)
    with pytest.raises(ValueError, match="nothing to score"):
        semantic_accuracy({}, truth)


def test_format_semantic_shows_the_numbers():
    truth = _truth({1: ([RED_CIRCLE, BLUE_SQUARE], (0, "above", 1)), 2: ([GREEN_TRIANGLE], None)})
    acc = semantic_accuracy({1: "a red circle above a blue square", 2: "a green circle"}, truth)
    text = format_semantic(acc)
    lines = text.splitlines()
    assert len(lines) == 5
    assert "50.0%" in lines[1] and "(1/2)" in lines[1]          # objects
    assert "100.0%" in lines[2] and "(2/2)" in lines[2]         # colours
    assert "100.0%" in lines[4] and "(1/1)" in lines[4]         # relation
    text = format_semantic(semantic_accuracy({1: "a red circle", 2: "a green circle"}, truth))
    assert "n/a" in text.splitlines()[4]
