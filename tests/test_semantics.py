import json

import pytest

from captioning.semantics import (
    format_semantic,
    format_semantic_table,
    load_ground_truth,
    parse_caption,
    parse_relations,
    semantic_accuracy,
    semantic_intervals,
)
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
        assert (acc["objects"], acc["colours"], acc["shapes"], acc["relation"], acc["all"]) == (1.0,) * 5
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
    assert acc["per_image"][1] == {"objects": False, "colours": True, "shapes": False, "relation": None, "all": False}
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
    assert acc["per_image"][2] == {"objects": False, "colours": False, "shapes": False, "relation": None,
                                   "all": False}
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
    assert len(lines) == 6
    assert "50.0%" in lines[1] and "(1/2)" in lines[1]          # objects
    assert "100.0%" in lines[2] and "(2/2)" in lines[2]         # colours
    assert "100.0%" in lines[4] and "(1/1)" in lines[4]         # relation
    assert lines[5].split()[:3] == ["all", "50.0%", "(1/2)"]    # image 2 names a circle for the triangle
    text = format_semantic(semantic_accuracy({1: "a red circle", 2: "a green circle"}, truth))
    assert "n/a" in text.splitlines()[4]


# ---- several relations per image (captioning.relworld's files) ----------------------------------------

# a red circle top left, a blue square top right, a green triangle below them both, to the right of the circle
THREE = [RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE]
THREE_RELATIONS = [(0, "to the left of", 1), (0, "above", 2), (1, "above", 2), (0, "to the left of", 2)]


def _relations_truth(images):
    """A hand-written ground truth: {image_id: (objects, relations, relation_count)}."""
    return {"images": {i: {"objects": objects, "relation": None, "relations": relations, "relation_count": count,
                           "boxes": []} for i, (objects, relations, count) in images.items()},
            "relations": RELATION_INVERSES, "colours": tuple(COLOURS), "shapes": SHAPES}


def test_parse_relations_keeps_every_stated_triple_in_order():
    objects, triples = parse_relations("A red circle is to the left of a blue square which is above a Green Triangle;"
                                       " the red circle is above the green triangle", COLOURS, SHAPES,
                                       RELATION_INVERSES)
    assert objects == THREE
    assert triples == [(RED_CIRCLE, "to the left of", BLUE_SQUARE), (BLUE_SQUARE, "above", GREEN_TRIANGLE),
                       (RED_CIRCLE, "above", GREEN_TRIANGLE)]
    assert _parse("a red circle to the left of a blue square which is above a green triangle")[1] is None


def test_several_relations_right_only_when_all_true_and_enough():
    captions = {
        1: "a red circle to the left of a blue square, and a green triangle below the blue square",
        2: "there is a blue square to the right of a red circle; the red circle is above the green triangle",
        3: "a red circle is to the left of a blue square which is above a green triangle, and the red circle is "
           "above the green triangle",                                                   # three true: more is fine
        4: "a green triangle to the right of a red circle, and a blue square above the green triangle",
        5: "a red circle to the left of a blue square, and a green triangle above the blue square",   # one false
        6: "a red circle to the left of a blue square and a green triangle",                         # one only
        7: "a red circle to the left of a blue square, and the blue square is to the right of the red circle, "
           "and a green triangle",                                        # the same relation twice counts once
        8: "a red circle to the left of a blue square, and a green triangle below",     # no object after 'below'
        9: "a red circle to the left of a blue square, and a green circle below the blue square",  # wrong object
        10: "a red circle to the left of a green triangle, and the red circle is above the green triangle, and a "
            "blue square",                            # two true facts about one pair: the square is left unplaced
    }
    acc = semantic_accuracy(captions, _relations_truth({i: (THREE, THREE_RELATIONS, 2) for i in captions}))
    verdicts = acc["per_image"]
    assert {i: v["relation"] for i, v in verdicts.items()} == {
        1: True, 2: True, 3: True, 4: True, 5: False, 6: False, 7: False, 8: False, 9: None, 10: False}
    assert {i: v["all"] for i, v in verdicts.items()} == {i: i <= 4 for i in captions}
    assert acc["relation"] == 4 / 9 and acc["all"] == 4 / 10 and acc["objects"] == 9 / 10
    assert acc["counts"]["relation_images"] == acc["counts"]["two_object_images"] == 10
    assert (acc["counts"]["relation_judged"], acc["counts"]["relation"], acc["counts"]["all"]) == (9, 4, 4)


def test_all_is_the_objects_where_an_image_has_no_relation():
    truth = _relations_truth({1: ([RED_CIRCLE], [], 0), 2: ([RED_CIRCLE], [], 0),
                              3: (THREE[:2], THREE_RELATIONS[:1], 1)})
    acc = semantic_accuracy({1: "a red circle", 2: "a red square", 3: "a red circle above a blue square"}, truth)
    assert [v["all"] for v in acc["per_image"].values()] == [True, False, False]
    assert acc["per_image"][3]["objects"] is True and acc["per_image"][3]["relation"] is False


def _write(path, images, **top):
    path.write_text(json.dumps({"images": images, "annotations": [], "relations": RELATION_INVERSES, **top}))
    return path


def _entry(image_id, objects, **fields):
    return {"id": image_id, "file_name": f"{image_id}.jpg",
            "objects": [{"colour": c, "shape": s, "box": [0, 0, 1, 1]} for c, s in objects], **fields}


def test_old_style_files_score_as_before(tmp_path):
    """A file with one `relation` per image reads as relations=[it], relation_count=1, and scores as it did."""
    pair = [RED_CIRCLE, BLUE_SQUARE]
    old = load_ground_truth(_write(tmp_path / "old.json", [
        _entry(1, pair, relation=[0, "to the left of", 1]), _entry(2, [RED_CIRCLE], relation=None)]))
    new = load_ground_truth(_write(tmp_path / "new.json", [
        _entry(1, pair, relation=None, relations=[[0, "to the left of", 1]], relation_count=1),
        _entry(2, [RED_CIRCLE], relation=None, relations=[], relation_count=0)]))
    assert old["images"][1]["relation"] == (0, "to the left of", 1)
    assert (old["images"][1]["relations"], old["images"][1]["relation_count"]) == ([(0, "to the left of", 1)], 1)
    assert (old["images"][2]["relations"], old["images"][2]["relation_count"]) == ([], 0)
    cases = {"a red circle to the left of a blue square": True, "a blue square to the right of a red circle": True,
             "a blue square to the left of a red circle": False, "a red circle and a blue square": False,
             "a red circle to the left of a blue square, the blue square is to the left of the red circle": False}
    for caption, right in cases.items():
        for truth in (old, new):
            acc = semantic_accuracy({1: caption, 2: "a red circle"}, truth)
            assert acc["per_image"][1]["relation"] is right and acc["per_image"][1]["all"] is right, caption
            assert acc["per_image"][2] == {"objects": True, "colours": True, "shapes": True, "relation": None,
                                           "all": True}


@pytest.mark.parametrize("fields, named", [
    ({"relation": [0, "near", 1]}, "bad relation"),
    ({"relation": [0, "above", 2]}, "bad relation"),
    ({"relation": [0, "above"]}, "bad relation"),
    ({"relations": "above"}, "not a list"),
    ({"relations": [[0, "above", 0]]}, "bad relation"),
    ({"relations": [[0, "above", 1], [1, "below", 0]], "relation_count": 2}, "relation_count 2"),
    ({"relations": [[0, "above", 1]], "relation_count": -1}, "relation_count -1"),
    ({"relations": [[0, "above", 1]], "relation_count": True}, "relation_count True"),
    ({"relations": [], "relation_count": 1}, "relation_count 1"),
])
def test_bad_relation_entries_are_errors(tmp_path, fields, named):
    path = _write(tmp_path / "bad.json", [_entry(1, [RED_CIRCLE, BLUE_SQUARE], **fields)])
    with pytest.raises(ValueError, match=f"bad.json: image 1 has .*{named}"):
        load_ground_truth(path)


def _scored(n, intervals=True):
    """n images, a third of them with two relations: about 80% named right, the relations right on 3 of 4."""
    images, captions = {}, {}
    for i in range(n):
        if i % 3:
            images[i] = ([RED_CIRCLE], [], 0)
            captions[i] = "a red circle" if i % 5 else "a red square"
        else:
            images[i] = (THREE, THREE_RELATIONS, 2)
            relation = "to the left of" if i % 4 else "above"
            captions[i] = f"a red circle {relation} a blue square, and a green triangle below the blue square"
    return semantic_accuracy(captions, _relations_truth(images), intervals=intervals)


def test_bootstrap_intervals_hold_the_estimate_and_narrow_with_more_images():
    small, large = _scored(30), _scored(600)
    for acc in (small, large):
        for key in ("objects", "colours", "shapes", "relation", "all"):
            low, high = acc["intervals"][key]
            assert 0 <= low <= acc[key] <= high <= 1, (key, acc[key], low, high)
    for key in ("objects", "relation", "all"):
        width = {n: acc["intervals"][key][1] - acc["intervals"][key][0] for n, acc in ((30, small), (600, large))}
        assert 0 < width[600] < width[30] / 2, (key, width)
    assert _scored(30)["intervals"] == small["intervals"]              # the same seed, the same resamples
    assert "intervals" not in _scored(30, intervals=False)


def test_too_few_images_for_intervals_are_na():
    acc = _scored(4)
    assert acc["intervals"] == dict.fromkeys(("objects", "colours", "shapes", "relation", "all"))
    assert all("[n/a]" in line for line in format_semantic(acc).splitlines()[1:6] if "%" in line)
    few_judged = semantic_intervals({i: {"objects": True, "colours": True, "shapes": True, "all": True,
                                         "relation": True if i < 4 else None} for i in range(10)})
    assert few_judged["relation"] is None and few_judged["objects"] == (1.0, 1.0)


def test_format_semantic_shows_all_and_the_intervals():
    acc = _scored(30)
    lines = format_semantic(acc).splitlines()
    assert len(lines) == 7 and "bootstrap" in lines[6]
    low, high = acc["intervals"]["all"]
    assert lines[5].split()[:4] == ["all", f"{100 * acc['all']:.1f}%", f"[{100 * low:.1f},", f"{100 * high:.1f}]"]
    assert len({line.index("(") for line in lines[1:6]}) == 1             # the counts line up


def test_format_semantic_table_with_intervals_and_old_summaries():
    acc = _scored(30)
    table = format_semantic_table({"attention": acc, "pooled": {k: acc[k] for k in ("objects", "colours",
                                                                                     "shapes", "relation")}})
    header, attention, pooled = table.splitlines()
    assert header.split() == ["objects", "colours", "shapes", "relation", "all"]
    assert attention.count("[") == 5 and "n/a" in pooled.split()[-1] and "[" not in pooled
    assert [k for k, c in enumerate(attention) if c == "%"][:4] == [k for k, c in enumerate(pooled) if c == "%"]
    old = format_semantic_table({"beam 3": {"objects": 0.5, "colours": 1.0, "shapes": 0.5, "relation": None}})
    assert old.splitlines()[0].split() == ["objects", "colours", "shapes", "relation"]
    assert old.splitlines()[1].split() == ["beam", "3", "50.0%", "100.0%", "50.0%", "n/a"]
