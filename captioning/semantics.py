"""Semantic accuracy: whether a caption names the right objects (colour + shape) and their relation.

BLEU and CIDEr reward n-gram overlap, so "a green square" for a green circle still scores well.
A synthetic set knows the truth (captioning.tinyset writes it into the captions file), so here
each caption is parsed back into objects and a relation and compared with it:

- objects right: the set of (colour, shape) named equals the truth's (no missing, no extra object);
- colours right / shapes right: the multiset of colours (shapes) named equals the truth's;
- relation right: over two-object images whose objects are right, the stated relation is the
  true one, said either way round ("a circle left of a square" = "a square right of a circle").

A colour named without a shape, or a shape without a colour, is an object with a missing part,
so it is never right.
"""
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

from .vocabulary import tokenize

Object = tuple[str | None, str | None]                     # (colour, shape) as a caption names it
Relation = tuple[Object | None, str, Object | None]        # (subject, phrase, object)


class Verdict(TypedDict):
    """One caption judged: each part right or not (relation None where it is not judged)."""
    objects: bool
    colours: bool
    shapes: bool
    relation: bool | None


def ground_truth_from_coco(data: Mapping[str, Any], source: str = "captions file") -> dict[str, Any] | None:
    """A loaded COCO captions dict -> the ground truth (see load_ground_truth), or None without one."""
    images = [img for img in data.get("images", []) if "objects" in img]
    if not images:
        return None
    relations = data.get("relations")
    if relations is None:
        raise ValueError(f"{source}: images have 'objects' but the file has no top-level 'relations' map")
    truth: dict[int, dict[str, Any]] = {}
    for img in images:
        objects = [(o["colour"], o["shape"]) for o in img["objects"]]
        relation = img.get("relation")
        if relation is not None:
            i, phrase, j = relation
            if phrase not in relations or not (0 <= i < len(objects) and 0 <= j < len(objects)):
                raise ValueError(f"{source}: image {img['id']} has a bad relation {relation!r}")
            relation = (i, phrase, j)
        truth[img["id"]] = {"objects": objects, "relation": relation, "file_name": img.get("file_name"),
                            "boxes": [tuple(o["box"]) for o in img["objects"]]}
    colours = data.get("colours") or sorted({c for t in truth.values() for c, _ in t["objects"]})
    shapes = data.get("shapes") or sorted({s for t in truth.values() for _, s in t["objects"]})
    return {"images": truth, "relations": dict(relations), "colours": tuple(colours), "shapes": tuple(shapes)}


def load_ground_truth(coco_json_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """COCO captions JSON -> {"images": {image_id: {"objects": [(colour, shape)], "relation": (i, phrase, j)
    or None, "boxes": [(x0, y0, x1, y1)], "file_name"}}, "relations": {phrase: inverse}, "colours", "shapes"}.

    None when the file holds no ground truth (real COCO, or a tiny set written before it had one).
    """
    with open(coco_json_path) as f:
        return ground_truth_from_coco(json.load(f), source=str(coco_json_path))


def _lexicon(colours: Iterable[str], shapes: Iterable[str],
             relations: Mapping[str, str]) -> dict[tuple[str, ...], tuple[str, str]]:
    """Phrase (tuple of tokens) -> (kind, name), for every colour, shape and relation phrase."""
    lexicon: dict[tuple[str, ...], tuple[str, str]] = {}
    for kind, names in (("colour", colours), ("shape", shapes),
                        ("relation", set(relations) | set(relations.values()))):
        for name in names:
            lexicon[tuple(tokenize(name))] = (kind, name)
    return lexicon


def _mentions(tokens: Sequence[str], lexicon: Mapping[tuple[str, ...], tuple[str, str]]) -> list[tuple[str, str]]:
    """The caption's colour, shape and relation mentions in order; the longest phrase wins at each word."""
    longest = max(len(p) for p in lexicon)
    found: list[tuple[str, str]] = []
    k = 0
    while k < len(tokens):
        for n in range(min(longest, len(tokens) - k), 0, -1):
            if tuple(tokens[k:k + n]) in lexicon:
                found.append(lexicon[tuple(tokens[k:k + n])])
                k += n
                break
        else:
            k += 1
    return found


def _same_relation(a: Relation | None, b: Relation | None, relations: Mapping[str, str]) -> bool:
    """True when triples a and b say the same thing: equal, or b is a said the other way round."""
    if a is None or b is None or None in (a[0], a[2]):
        return False
    subject, phrase, obj = a
    return a == b or (obj, relations.get(phrase), subject) == b


def parse_caption(caption: str, colours: Iterable[str], shapes: Iterable[str],
                  relations: Mapping[str, str]) -> tuple[list[Object], Relation | None]:
    """caption -> (objects, relation) as the caption states them.

    objects: the distinct (colour, shape) pairs named, in order of first mention; a colour named
    without a shape is (colour, None), a shape without a colour (None, shape).
    relation: ((colour, shape), phrase, (colour, shape)) linking the object named just before the
    relation phrase to the one just after it (None on a side with no object), or None when the
    caption states no relation, or states several that contradict each other.
    """
    objects: list[Object] = []
    triples: list[Relation] = []
    pending_colour: str | None = None
    pending_relation: tuple[Object | None, str] | None = None

    def add(obj: Object) -> None:
        nonlocal pending_relation
        if pending_relation is not None:
            triples.append((pending_relation[0], pending_relation[1], obj))
            pending_relation = None
        objects.append(obj)

    for kind, name in _mentions(tokenize(caption), _lexicon(colours, shapes, relations)):
        if kind == "shape":
            add((pending_colour, name))
            pending_colour = None
            continue
        if pending_colour is not None:
            add((pending_colour, None))
            pending_colour = None
        if kind == "colour":
            pending_colour = name
        else:
            if pending_relation is not None:
                triples.append((pending_relation[0], pending_relation[1], None))
            pending_relation = (objects[-1] if objects else None, name)
    if pending_colour is not None:
        add((pending_colour, None))
    if pending_relation is not None:
        triples.append((pending_relation[0], pending_relation[1], None))

    relation = triples[0] if triples else None
    if any(t != relation and not _same_relation(t, relation, relations) for t in triples[1:]):
        relation = None
    return list(dict.fromkeys(objects)), relation


def _judge(caption: str, truth: Mapping[str, Any], ground_truth: Mapping[str, Any]) -> Verdict:
    """One image: {"objects", "colours", "shapes", "relation"} booleans (relation None where not judged)."""
    named, stated = parse_caption(caption, ground_truth["colours"], ground_truth["shapes"],
                                  ground_truth["relations"])
    true_objects = truth["objects"]
    verdict: Verdict = {
        "objects": set(named) == set(true_objects),
        "colours": Counter(c for c, _ in named) == Counter(c for c, _ in true_objects),
        "shapes": Counter(s for _, s in named) == Counter(s for _, s in true_objects),
        "relation": None,
    }
    if truth["relation"] is not None and verdict["objects"]:
        i, phrase, j = truth["relation"]
        verdict["relation"] = _same_relation(stated, (true_objects[i], phrase, true_objects[j]),
                                             ground_truth["relations"])
    return verdict


def semantic_accuracy(predictions: Mapping[int, str], ground_truth: Mapping[str, Any]) -> dict[str, Any]:
    """predictions {image_id: caption}, ground truth from load_ground_truth -> a dict:

    "objects", "colours", "shapes", "relation": fractions right (relation None when no two-object
    image has its objects right); "counts": the numbers behind them; "per_image" {image_id:
    {"objects", "colours", "shapes", "relation"}} booleans, relation None where it is not judged.
    """
    if not predictions:
        raise ValueError("nothing to score: no predictions")
    missing = [i for i in predictions if i not in ground_truth["images"]]
    if missing:
        raise ValueError(f"no ground truth for image ids {sorted(missing)[:5]}")
    truths = ground_truth["images"]
    per_image = {i: _judge(caption, truths[i], ground_truth) for i, caption in sorted(predictions.items())}
    n = len(per_image)
    judged = [v["relation"] for v in per_image.values() if v["relation"] is not None]
    counts = {"images": n, "two_object_images": sum(ground_truth["images"][i]["relation"] is not None
                                                    for i in per_image),
              "relation_judged": len(judged), "relation": sum(judged)}
    result: dict[str, float | None] = {}
    for key in ("objects", "colours", "shapes"):
        counts[key] = sum(v[key] for v in per_image.values())
        result[key] = counts[key] / n
    result["relation"] = counts["relation"] / len(judged) if judged else None
    return {**result, "counts": counts, "per_image": per_image}


def objects_right_by_file(captions: Mapping[str, str], ground_truth: Mapping[str, Any]) -> dict[str, bool]:
    """{image file name: caption} -> {file name: whether the caption names the right objects}.

    For figures that colour captions by correctness; files the truth does not know are left out.
    """
    ids = {t["file_name"]: i for i, t in ground_truth["images"].items()}
    return {name: _judge(caption, ground_truth["images"][ids[name]], ground_truth)["objects"]
            for name, caption in captions.items() if name in ids}


def format_semantic(acc: Mapping[str, Any]) -> str:
    """The summary of semantic_accuracy() as a short block of text for printing."""
    c = acc["counts"]
    lines = [f"semantic accuracy ({c['images']} images, captions parsed against the generator's truth)"]
    for key, what in (("objects", "every object's colour and shape, no extra object"),
                      ("colours", "the colours named"), ("shapes", "the shapes named")):
        lines.append(f"  {key:<9}{100 * acc[key]:6.1f}%  ({c[key]}/{c['images']})  {what}")
    if acc["relation"] is None:
        lines.append(f"  relation      n/a  (no two-object image with its objects right, "
                     f"of {c['two_object_images']})")
    else:
        lines.append(f"  relation {100 * acc['relation']:6.1f}%  ({c['relation']}/{c['relation_judged']})  "
                     f"of the {c['relation_judged']} two-object images with their objects right")
    return "\n".join(lines)


def format_semantic_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """rows {name: semantic_accuracy() result or its summary} -> a fixed-width table, one row per name."""
    keys = ("objects", "colours", "shapes", "relation")
    width = max(len(n) for n in rows) + 2
    lines = [" " * width + "".join(f"{k:>10}" for k in keys)]
    for name, acc in rows.items():
        cells = ["n/a" if acc.get(k) is None else f"{100 * acc[k]:.1f}%" for k in keys]
        lines.append(f"{name:<{width}}" + "".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)
