"""Semantic accuracy: whether a caption names the right objects (colour + shape) and their relations.

BLEU and CIDEr reward n-gram overlap, so "a green square" for a green circle still scores well.
A synthetic set knows the truth (captioning.tinyset and captioning.relworld write it into the
captions file), so here each caption is parsed back into objects and relations and compared with it:

- objects right: the set of (colour, shape) named equals the truth's (no missing, no extra object);
- colours right / shapes right: the multiset of colours (shapes) named equals the truth's;
- relation right: over images with relations whose objects are right, the caption states at least
  the image's `relation_count` distinct relations, and every relation it states is true, said
  either way round ("a circle left of a square" = "a square right of a circle", and the two count
  once). A tiny-set image has one relation and a count of 1: the stated relation must be the true one.
- all right: the objects right, and the relations too where the image has any.

A colour named without a shape, or a shape without a colour, is an object with a missing part,
so it is never right. A relation phrase links the object named just before it to the one named
just after it.

semantic_accuracy(..., intervals=True) adds 95% bootstrap intervals over images
(captioning.diagnostics' resampling), n/a below INTERVAL_MIN_IMAGES images.
"""
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

import numpy as np

from .diagnostics import INTERVAL_MIN_IMAGES, _resample_weights
from .vocabulary import tokenize

Object = tuple[str | None, str | None]                     # (colour, shape) as a caption names it
Relation = tuple[Object | None, str, Object | None]        # (subject, phrase, object)
Fact = tuple[int, str, int]                                # (subject index, phrase, object index) in the truth
KEYS = ("objects", "colours", "shapes", "relation", "all")


class Verdict(TypedDict):
    """One caption judged: each part right or not (relation None where it is not judged)."""
    objects: bool
    colours: bool
    shapes: bool
    relation: bool | None
    all: bool


# ---- ground truth ---------------------------------------------------------------------------------

def _fact(relation: Any, relations: Mapping[str, str], n_objects: int, where: str) -> Fact:
    """A checked [i, phrase, j] from a captions file -> (i, phrase, j); ValueError naming `where` if bad."""
    if not (isinstance(relation, (list, tuple)) and len(relation) == 3):
        raise ValueError(f"{where} has a bad relation {relation!r}")
    i, phrase, j = relation
    indices = [isinstance(k, int) and not isinstance(k, bool) and 0 <= k < n_objects for k in (i, j)]
    if phrase not in relations or not all(indices) or i == j:
        raise ValueError(f"{where} has a bad relation {relation!r}")
    return int(i), phrase, int(j)


def _fact_key(fact: tuple[Any, str, Any], relations: Mapping[str, str]) -> tuple[Any, str, Any]:
    """The same key for a triple and for it said the other way round, so that the two count once."""
    subject, phrase, obj = fact
    return min(fact, (obj, relations[phrase], subject), key=repr)


def _image_relations(img: Mapping[str, Any], relations: Mapping[str, str], n_objects: int,
                     where: str) -> tuple[Fact | None, list[Fact], int]:
    """A captions file's image entry -> (relation, relations, relation_count), each checked.

    `relations` and `relation_count` where the entry has them; an older entry's single `relation`
    (or null) stands for relations=[it], relation_count=1 (none, 0).
    """
    single = img.get("relation")
    single = None if single is None else _fact(single, relations, n_objects, where)
    if img.get("relations") is None:
        return single, [single] if single else [], 1 if single else 0
    if not isinstance(img["relations"], (list, tuple)):
        raise ValueError(f"{where} has 'relations' {img['relations']!r}, not a list of [i, phrase, j]")
    facts = [_fact(r, relations, n_objects, where) for r in img["relations"]]
    count = img.get("relation_count", 1 if facts else 0)
    distinct = len({_fact_key(f, relations) for f in facts})
    if not (isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= distinct):
        raise ValueError(f"{where} has relation_count {count!r}: it must be a whole number from 0 to the "
                         f"{distinct} distinct relations it lists")
    return single, facts, int(count)


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
        relation, facts, count = _image_relations(img, relations, len(objects), f"{source}: image {img['id']}")
        truth[img["id"]] = {"objects": objects, "relation": relation, "relations": facts, "relation_count": count,
                            "file_name": img.get("file_name"), "boxes": [tuple(o["box"]) for o in img["objects"]]}
    colours = data.get("colours") or sorted({c for t in truth.values() for c, _ in t["objects"]})
    shapes = data.get("shapes") or sorted({s for t in truth.values() for _, s in t["objects"]})
    return {"images": truth, "relations": dict(relations), "colours": tuple(colours), "shapes": tuple(shapes)}


def load_ground_truth(coco_json_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """COCO captions JSON -> {"images": {image_id: {"objects": [(colour, shape)], "relations": [(i, phrase, j)],
    "relation_count": k, "relation": (i, phrase, j) or None, "boxes": [(x0, y0, x1, y1)], "file_name"}},
    "relations": {phrase: inverse}, "colours", "shapes"}.

    `relations` lists every true relation and `relation_count` how many a caption must state; a file
    written with one `relation` per image (the tiny set) gives relations=[it], relation_count=1, and
    `relation` keeps the file's own field. None when the file holds no ground truth (real COCO, or a
    tiny set written before it had one).
    """
    with open(coco_json_path) as f:
        return ground_truth_from_coco(json.load(f), source=str(coco_json_path))


def _truth_relations(truth: Mapping[str, Any]) -> tuple[list[Fact], int]:
    """An image's true relations and how many a caption must state. A truth written by hand may hold
    only the old single `relation`."""
    if truth.get("relations") is not None:
        facts = [(i, phrase, j) for i, phrase, j in truth["relations"]]
        return facts, int(truth.get("relation_count", 1 if facts else 0))
    if truth.get("relation") is None:
        return [], 0
    i, phrase, j = truth["relation"]
    return [(i, phrase, j)], 1


# ---- parsing --------------------------------------------------------------------------------------

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


def parse_relations(caption: str, colours: Iterable[str], shapes: Iterable[str],
                    relations: Mapping[str, str]) -> tuple[list[Object], list[Relation]]:
    """caption -> (objects, triples): every object and every relation the caption states.

    objects: the distinct (colour, shape) pairs named, in order of first mention; a colour named
    without a shape is (colour, None), a shape without a colour (None, shape).
    triples: ((colour, shape), phrase, (colour, shape)) for each relation phrase in order, linking
    the object named just before the phrase to the one named just after it (None on a side with
    no object); repeats and contradictions are kept, for the judge to see.
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
    return list(dict.fromkeys(objects)), triples


def parse_caption(caption: str, colours: Iterable[str], shapes: Iterable[str],
                  relations: Mapping[str, str]) -> tuple[list[Object], Relation | None]:
    """caption -> (objects, relation) as the caption states them, for captions with one relation.

    objects as parse_relations gives them; relation: the first stated triple, or None when the
    caption states no relation, or states several that are not all the same one.
    """
    objects, triples = parse_relations(caption, colours, shapes, relations)
    relation = triples[0] if triples else None
    if any(t != relation and not _same_relation(t, relation, relations) for t in triples[1:]):
        relation = None
    return objects, relation


# ---- judging --------------------------------------------------------------------------------------

def _relations_right(stated: Sequence[Relation], true: Sequence[Relation], count: int,
                     relations: Mapping[str, str], objects: Sequence[Object] = ()) -> bool:
    """Every stated triple true (either way round), about at least `count` distinct pairs of objects,
    and, when `count` is enough to link every object (N - 1 of them), linking them all: two facts
    about one pair do not stand in for the third object's place."""
    pairs: set[frozenset[Object | None]] = set()
    for triple in stated:
        if not any(_same_relation(triple, t, relations) for t in true):
            return False
        pairs.add(frozenset((triple[0], triple[2])))
    if len(pairs) < count:
        return False
    if objects and count >= len(objects) - 1:
        linked: set[Object | None] = {objects[0]}
        for _ in objects:                              # grow the linked set until it stops changing
            linked |= {o for pair in pairs if pair & linked for o in pair}
        return linked >= set(objects)
    return True


def _judge(caption: str, truth: Mapping[str, Any], ground_truth: Mapping[str, Any]) -> Verdict:
    """One image: {"objects", "colours", "shapes", "relation", "all"} booleans (relation None where not judged)."""
    named, stated = parse_relations(caption, ground_truth["colours"], ground_truth["shapes"],
                                    ground_truth["relations"])
    true_objects = truth["objects"]
    objects_right = set(named) == set(true_objects)
    facts, count = _truth_relations(truth)
    relation = None
    if count and objects_right:
        true = [(true_objects[i], phrase, true_objects[j]) for i, phrase, j in facts]
        relation = _relations_right(stated, true, count, ground_truth["relations"], true_objects)
    return {
        "objects": objects_right,
        "colours": Counter(c for c, _ in named) == Counter(c for c, _ in true_objects),
        "shapes": Counter(s for _, s in named) == Counter(s for _, s in true_objects),
        "relation": relation,
        "all": objects_right and (not count or bool(relation)),
    }


def semantic_intervals(per_image: Mapping[Any, Mapping[str, Any]], resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> dict[str, tuple[float, float] | None]:
    """Percentile bootstrap intervals over images: {"objects", "colours", "shapes", "relation", "all": (low, high)}.

    per_image as semantic_accuracy gives it. Each resample draws the images again
    (captioning.diagnostics' resampling); relation is the share right of the judged images drawn.
    An interval is None on fewer than INTERVAL_MIN_IMAGES images (judged images, for relation), or
    for a key the verdicts lack ("all" in a result written before it existed).
    """
    verdicts = list(per_image.values())
    out: dict[str, tuple[float, float] | None] = dict.fromkeys(KEYS)
    if len(verdicts) < INTERVAL_MIN_IMAGES:
        return out
    weights = _resample_weights(len(verdicts), resamples, seed)
    tail = (1 - level) / 2 * 100

    def interval(values: np.ndarray) -> tuple[float, float]:
        low, high = np.percentile(values, [tail, 100 - tail])
        return float(low), float(high)

    for key in ("objects", "colours", "shapes", "all"):
        if all(key in v for v in verdicts):
            right = np.array([bool(v[key]) for v in verdicts], dtype=np.float64)
            out[key] = interval(weights @ right / len(verdicts))
    judged = np.array([v["relation"] is not None for v in verdicts], dtype=np.float64)
    if judged.sum() >= INTERVAL_MIN_IMAGES:
        right = np.array([v["relation"] is True for v in verdicts], dtype=np.float64)
        drawn = weights @ judged
        out["relation"] = interval((weights @ right)[drawn > 0] / drawn[drawn > 0])
    return out


def semantic_accuracy(predictions: Mapping[int, str], ground_truth: Mapping[str, Any], intervals: bool = False,
                      resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """predictions {image_id: caption}, ground truth from load_ground_truth -> a dict:

    "objects", "colours", "shapes", "relation", "all": fractions right (relation over the images with
    relations whose objects are right, None when there is none; the rest over all images);
    "counts": the numbers behind them ("two_object_images", the tiny set's name, and
    "relation_images" both count the images with relations to judge); "per_image" {image_id:
    {"objects", "colours", "shapes", "relation", "all"}} booleans, relation None where it is not
    judged; with `intervals`, "intervals" {key: (low, high) or None} from semantic_intervals.
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
    with_relations = sum(_truth_relations(truths[i])[1] > 0 for i in per_image)
    counts = {"images": n, "two_object_images": with_relations, "relation_images": with_relations,
              "relation_judged": len(judged), "relation": sum(judged)}
    result: dict[str, Any] = {}
    for key in ("objects", "colours", "shapes", "all"):
        counts[key] = sum(v[key] for v in per_image.values())
        result[key] = counts[key] / n
    result["relation"] = counts["relation"] / len(judged) if judged else None
    if intervals:
        result["intervals"] = semantic_intervals(per_image, resamples, seed)
    return {**result, "counts": counts, "per_image": per_image}


def objects_right_by_file(captions: Mapping[str, str], ground_truth: Mapping[str, Any]) -> dict[str, bool]:
    """{image file name: caption} -> {file name: whether the caption names the right objects}.

    For figures that colour captions by correctness; files the truth does not know are left out.
    """
    ids = {t["file_name"]: i for i, t in ground_truth["images"].items()}
    return {name: _judge(caption, ground_truth["images"][ids[name]], ground_truth)["objects"]
            for name, caption in captions.items() if name in ids}


# ---- printing -------------------------------------------------------------------------------------

def _cell(acc: Mapping[str, Any], key: str, interval_width: int) -> str:
    """' 93.2%', then '[90.1, 95.8]' where acc has an interval for key ('[n/a]' where that is None),
    padded to interval_width so that the numbers line up; 'n/a' for a score that is None or missing."""
    value = "n/a" if acc.get(key) is None else f"{100 * acc[key]:.1f}%"
    if not interval_width:
        return f"{value:>7}"
    return f"{value:>7} {_interval(acc, key):<{interval_width}}"


def _interval(acc: Mapping[str, Any], key: str) -> str:
    """'[90.1, 95.8]' for acc's interval on key, '[n/a]' where it is None, '' where acc has none or no score."""
    if "intervals" not in acc or acc.get(key) is None:
        return ""
    span = acc["intervals"].get(key)
    return "[n/a]" if span is None else f"[{100 * span[0]:.1f}, {100 * span[1]:.1f}]"


def format_semantic(acc: Mapping[str, Any]) -> str:
    """The summary of semantic_accuracy() as a short block of text for printing."""
    c = acc["counts"]
    with_relations = c.get("relation_images", c["two_object_images"])
    spans = max(len(_interval(acc, k)) for k in KEYS)

    def line(key: str, rest: str) -> str:
        return f"  {key:<9}{_cell(acc, key, spans)}  {rest}"

    lines = [f"semantic accuracy ({c['images']} images, captions parsed against the generator's truth)"]
    for key, what in (("objects", "every object's colour and shape, no extra object"),
                      ("colours", "the colours named"), ("shapes", "the shapes named")):
        lines.append(line(key, f"({c[key]}/{c['images']})  {what}"))
    if acc["relation"] is None:
        lines.append(line("relation", f"(no image with relations has its objects right, of {with_relations})"))
    else:
        lines.append(line("relation", f"({c['relation']}/{c['relation_judged']})  of the {c['relation_judged']} "
                                      "images with relations and their objects right"))
    if "all" in acc:
        lines.append(line("all", f"({c['all']}/{c['images']})  objects right, and their relations where the "
                                 "image has any"))
    if "intervals" in acc:
        lines.append(f"  [95% bootstrap intervals over images; n/a below {INTERVAL_MIN_IMAGES} images]")
    return "\n".join(lines)


def format_semantic_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """rows {name: semantic_accuracy() result or its summary} -> a fixed-width table, one row per name.

    The "all" column appears when a row has it; a row with intervals shows them beside its numbers.
    """
    keys = KEYS if any("all" in acc for acc in rows.values()) else KEYS[:-1]
    spans = [max(len(_interval(acc, k)) for acc in rows.values()) for k in keys]
    cells = {name: [_cell(acc, k, w) for k, w in zip(keys, spans)] for name, acc in rows.items()}
    widths = [max(8, len(k), *(len(row[col]) for row in cells.values())) + 2 for col, k in enumerate(keys)]
    width = max(len(n) for n in rows) + 2
    lines = [" " * width + "".join(f"{k:>{w}}" for k, w in zip(keys, widths))]
    for name, row in cells.items():
        lines.append((f"{name:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(row, widths))).rstrip())
    return "\n".join(lines)
