"""The relations world: scenes of several coloured shapes where *where* each one stands is the point.

    DIR/train2014/COCO_train2014_000000000001.jpg ...
    DIR/val2014/COCO_val2014_000000100001.jpg ...
    DIR/annotations/captions_{train,val}2014.json

The tiny set (captioning.tinyset) has one or two shapes and at most one relation, so a single
pooled image vector can carry all a caption needs. Here every image holds N objects (3 by
default), each in its own cell of a 3x3 layout with jitter, and each caption states N-1
relations that connect them all: "A red circle to the left of a blue square, and a green
triangle below the blue square." A caption is right only if the model knows where each object
is relative to the others, which is what an attention decoder is meant to be better at than a
pooled one. The conventional folder is data_dir/relations.

Every pair of objects is clearly offset on at least one axis (centres at least RELATION_OFFSET of
the larger object's side apart); on the other axis it is either offset as clearly or about level
(within LEVEL_OFFSET), never in between, so each relation a person would read off the image is in
the truth and no other is. Objects never overlap and stay clear of the outer MARGIN of each side, so
that the training crop (64 px images cropped to 56) seldom cuts one.

Each image entry carries the truth in fields that COCO tools ignore: `objects` [{"colour", "shape",
"box"}], `relations` (every true relation, [i, "to the left of" | "above", j]; the inverses follow
from the file's top-level `relations` map), `relation_count` (how many relations each caption
states: N-1) and `relation`: null, so that a reader of the tiny set's single relation sees none.
The top level holds `relations`, `colours`, `shapes`, `background` as the tiny set's files do, and
"world": "relations".

Captions are longer than the tiny set's: 14 to 24 words with three objects (20 to 35 with four),
so a model trained on them needs max_seq_len of at least 26 (words, <start> and <end>), not 20.
Flipped images would contradict "to the left of", so train without horizontal flips (hflip=False).

Generation is deterministic for a given seed: a few seconds for 3,250 images.
"""
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFilter

from .tinyset import (
    BACKGROUND,
    RELATION_INVERSES,
    RELATIONS,
    RGB,
    _palette,
    _vary_case,
    draw_shape,
    with_articles,
    write_split,
)

IMAGE_SIZE = ((96, 128), (88, 120))   # (width range, height range) in pixels
OBJECT_SIZE = (0.22, 0.30)            # each object's side, as a fraction of the image's shorter side
OBJECTS = (3, 3)                      # (fewest, most) objects per image
OBJECTS_RANGE = (2, 4)                # what `objects` may ask for
MARGIN = 0.08                         # objects stay clear of this share of each side (the training crop)
RELATION_OFFSET = 0.6                 # centres this far apart on an axis (x the larger side) stand in a relation
LEVEL_OFFSET = 0.3                    # ... and at most this far apart are level on it; nothing in between
DESCRIPTION = "Synthetic captioning set of spatial relations between coloured shapes, in COCO 2014 format"
GAP = 0.04                            # the least space between two objects, as a fraction of the shorter side
JITTER = 0.2                          # how far an object strays from its cell's centre, as a share of a cell
PLACEMENT_TRIES = 2000                # random layouts tried for one image before giving up
LEFT_OF, ABOVE = RELATIONS            # the canonical phrases the truth uses ("to the left of", "above")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}

Box = tuple[int, int, int, int]
Statement = tuple[int, str, int]      # (subject index, phrase, object index), as a caption says it


# ---- layout ---------------------------------------------------------------------------------------

def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _axis_relation(a: Box, b: Box, axis: int) -> int | None:
    """+1: a's centre clearly before b's on `axis` (left of / above), -1: clearly after, 0: level,
    None: in between (neither clearly offset nor level, which a person might read either way)."""
    larger = max(a[2] - a[0], b[2] - b[0])
    offset = _centre(b)[axis] - _centre(a)[axis]
    if abs(offset) >= RELATION_OFFSET * larger:
        return 1 if offset > 0 else -1
    return 0 if abs(offset) <= LEVEL_OFFSET * larger else None


def _apart(a: Box, b: Box, gap: float) -> bool:
    """True when the boxes leave at least `gap` pixels between them on some axis."""
    return (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _clear_layout(boxes: Sequence[Box], gap: float) -> bool:
    """Every pair apart, in a clear relation on one axis at least, and nowhere in between on either."""
    for k, a in enumerate(boxes):
        for b in boxes[k + 1:]:
            sides = [_axis_relation(a, b, axis) for axis in (0, 1)]
            if not _apart(a, b, gap) or None in sides or sides == [0, 0]:
                return False
    return True


def _cell_position(rng: random.Random, index: int, low: float, high: float) -> float:
    """A centre in column (row) `index` of 3 between `low` and `high`, jittered about the cell's centre."""
    step = (high - low) / 2
    return min(max(low + index * step + rng.uniform(-JITTER, JITTER) * step, low), high)


def _layout(rng: random.Random, width: int, height: int, count: int,
            object_size: tuple[float, float]) -> list[Box] | None:
    """`count` boxes in distinct cells of a 3x3 layout with a clear relation between every pair, or None
    when PLACEMENT_TRIES random layouts all failed (objects too large for the image)."""
    short = min(width, height)
    smallest, largest = int(object_size[0] * short), int(object_size[1] * short)
    gap = max(2.0, GAP * short)
    for _ in range(PLACEMENT_TRIES):
        boxes = []
        for cell in rng.sample(range(9), count):
            side = rng.randint(smallest, largest)
            x = _cell_position(rng, cell % 3, MARGIN * width + side / 2, (1 - MARGIN) * width - side / 2)
            y = _cell_position(rng, cell // 3, MARGIN * height + side / 2, (1 - MARGIN) * height - side / 2)
            x0, y0 = round(x - side / 2), round(y - side / 2)
            boxes.append((x0, y0, x0 + side, y0 + side))
        if _clear_layout(boxes, gap):
            return boxes
    return None


def true_relations(boxes: Sequence[Box]) -> list[list[Any]]:
    """Every relation that holds between the boxes, as [i, "to the left of" | "above", j]."""
    found: list[list[Any]] = []
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            for axis, phrase in ((0, LEFT_OF), (1, ABOVE)):
                side = _axis_relation(boxes[i], boxes[j], axis)
                if side:
                    found.append([i, phrase, j] if side > 0 else [j, phrase, i])
    return found


# ---- captions -------------------------------------------------------------------------------------

def _phrases(relations: Sequence[Sequence[Any]], subject: int, obj: int) -> list[str]:
    """The phrases that are true with `subject` first and `obj` second."""
    said = [phrase for i, phrase, j in relations if (i, j) == (subject, obj)]
    return said + [RELATION_INVERSES[phrase] for i, phrase, j in relations if (i, j) == (obj, subject)]


def _chain(rng: random.Random, relations: Sequence[Sequence[Any]], count: int) -> list[Statement]:
    """The objects in a random order, each related to the next: A p B, B p C, ..."""
    order = rng.sample(range(count), count)
    return [(a, rng.choice(_phrases(relations, a, b)), b) for a, b in zip(order, order[1:])]


def _star(rng: random.Random, relations: Sequence[Sequence[Any]], count: int) -> list[Statement]:
    """One object related to each of the others, each relation said from either side."""
    centre, *others = rng.sample(range(count), count)
    statements = []
    for other in others:
        subject, obj = (centre, other) if rng.random() < 0.5 else (other, centre)
        statements.append((subject, rng.choice(_phrases(relations, subject, obj)), obj))
    return statements


def _spanning(rng: random.Random, relations: Sequence[Sequence[Any]], count: int) -> list[Statement]:
    """count-1 true statements that connect every object: a chain or a star, each side said at random."""
    if rng.random() < 0.5:
        return [(a, p, b) if rng.random() < 0.5 else (b, RELATION_INVERSES[p], a)
                for a, p, b in _chain(rng, relations, count)]
    return _star(rng, relations, count)


class _Names:
    """Object names with their article: 'a red circle' the first time, 'the red circle' after."""

    def __init__(self, names: Sequence[str], definite: bool = False) -> None:
        self.names, self.seen = names, set() if not definite else set(range(len(names)))

    def __call__(self, k: int) -> str:
        article = "the" if k in self.seen else "a"
        self.seen.add(k)
        return f"{article} {self.names[k]}"


def _join(clauses: Sequence[str], last: str = ", and ") -> str:
    """'x', 'x and y', 'x, y and z' with `last` before the final clause."""
    return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + last + clauses[-1]


def _listed(statements: Sequence[Statement], names: Sequence[str]) -> str:
    """A red circle to the left of a blue square, and a green triangle below the blue square."""
    name = _Names(names)
    return _join([f"{name(s)} {p} {name(o)}" for s, p, o in statements])


def _there_is(statements: Sequence[Statement], names: Sequence[str]) -> str:
    """There is a red circle above a green triangle; the blue square is to the right of the green triangle."""
    name = _Names(names)
    (s, p, o), *rest = statements
    return "; ".join([f"there is {name(s)} {p} {name(o)}"] + [f"{name(s)} is {p} {name(o)}" for s, p, o in rest])


def _definite(statements: Sequence[Statement], names: Sequence[str]) -> str:
    """The red circle is above the green triangle, and the blue square is to the right of the green triangle."""
    name = _Names(names, definite=True)
    return _join([f"{name(s)} is {p} {name(o)}" for s, p, o in statements])


def _picture(statements: Sequence[Statement], names: Sequence[str]) -> str:
    """a picture of a red circle above a green triangle, with a blue square to the right of the green triangle"""
    name = _Names(names)
    (s, p, o), *rest = statements
    text = f"a picture of {name(s)} {p} {name(o)}"
    return text + (", with " + _join([f"{name(s)} {p} {name(o)}" for s, p, o in rest], " and ") if rest else "")


def _counted(statements: Sequence[Statement], names: Sequence[str]) -> str:
    """three shapes: a red circle above a green triangle, and a blue square below the red circle"""
    return f"{COUNT_WORDS.get(len(statements) + 1, str(len(statements) + 1))} shapes: {_listed(statements, names)}"


def _which_is(statements: Sequence[Statement], names: Sequence[str]) -> str:
    """a blue square is to the right of a red circle which is above a green triangle (a chain only)."""
    name = _Names(names)
    text = f"{name(statements[0][0])} is {statements[0][1]} {name(statements[0][2])}"
    return text + "".join(f" which is {p} {name(o)}" for _, p, o in statements[1:])


def _sits(statements: Sequence[Statement], names: Sequence[str]) -> str:
    """A red circle sits above a green triangle, which sits to the left of a blue square (a chain only)."""
    name = _Names(names)
    text = f"{name(statements[0][0])} sits {statements[0][1]} {name(statements[0][2])}"
    return text + "".join(f", which sits {p} {name(o)}" for _, p, o in statements[1:])


# (template, whether it needs a chain: each statement's subject the previous statement's object)
TEMPLATES = ((_listed, False), (_there_is, False), (_definite, False), (_picture, False), (_counted, False),
             (_which_is, True), (_sits, True))


def _captions(rng: random.Random, names: Sequence[str], relations: Sequence[Sequence[Any]]) -> list[str]:
    """Five captions in five different sentence forms, each over its own spanning set of true relations.

    Each relation phrase stands between its subject and its object, both named in full, so that
    captioning.semantics reads every one back as the triple it is.
    """
    captions = []
    for template, needs_chain in rng.sample(TEMPLATES, 5):
        statements = _chain(rng, relations, len(names)) if needs_chain else _spanning(rng, relations, len(names))
        captions.append(_vary_case(with_articles(template(statements, names)), rng))
    return captions


# ---- images and files -----------------------------------------------------------------------------

def _make_example(rng: random.Random, colours: Mapping[str, RGB], shapes: Sequence[str], background: RGB,
                  image_size: tuple[tuple[int, int], tuple[int, int]], object_size: tuple[float, float],
                  objects: tuple[int, int]) -> tuple[Image.Image, list[str], dict[str, Any]]:
    """Return (PIL image, 5 captions, ground truth) for one random scene."""
    (w_lo, w_hi), (h_lo, h_hi) = image_size
    width, height = rng.randint(w_lo, w_hi), rng.randint(h_lo, h_hi)
    count = rng.randint(*objects)
    drawn = rng.sample([(c, s) for c in colours for s in shapes], count)
    boxes = _layout(rng, width, height, count, object_size)
    if boxes is None:
        raise ValueError(f"cannot place {count} objects of {object_size[0]:g}..{object_size[1]:g} of the shorter "
                         f"side apart in a {width}x{height} image: use smaller objects or larger images")
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for (colour, shape), box in zip(drawn, boxes):
        draw_shape(draw, shape, box, colours[colour])
    image = image.filter(ImageFilter.GaussianBlur(0.6))
    relations = true_relations(boxes)
    captions = _captions(rng, [f"{c} {s}" for c, s in drawn], relations)
    truth = {"objects": [{"colour": c, "shape": s, "box": list(box)} for (c, s), box in zip(drawn, boxes)],
             "relation": None, "relations": relations, "relation_count": count - 1}
    return image, captions, truth


def _check_objects(objects: Any, pairs: int) -> tuple[int, int]:
    """A valid (fewest, most) objects per image, with enough (colour, shape) pairs for the most."""
    low, high = OBJECTS_RANGE
    if not (isinstance(objects, (tuple, list)) and len(objects) == 2 and all(type(n) is int for n in objects)
            and low <= objects[0] <= objects[1] <= high):
        raise ValueError(f"objects must be (fewest, most) whole numbers with {low} <= fewest <= most <= {high}, "
                         f"got {objects!r}")
    if pairs < objects[1]:
        raise ValueError(f"{objects[1]}-object scenes need {objects[1]} different (colour, shape) pairs: "
                         f"the palette gives {pairs}; add colours or shapes")
    return objects[0], objects[1]


def _check_fits(options: Mapping[str, Any]) -> None:
    """ValueError, before anything is written, when the most objects at their largest cannot be placed in the
    smallest image."""
    (width, _), (height, _) = options["image_size"]
    largest = options["object_size"][1]
    count = options["objects"][1]
    if _layout(random.Random(0), width, height, count, (largest, largest)) is None:
        raise ValueError(f"cannot place {count} objects of {largest:g} of the shorter side apart in a "
                         f"{width}x{height} image: use a smaller object_size or a larger image_size")


def make_relations_world(out: str, train: int = 3000, val: int = 250, seed: int = 0,
                         colours: Mapping[str, RGB] | None = None, shapes: Iterable[str] | None = None,
                         background: RGB = BACKGROUND,
                         image_size: tuple[tuple[int, int], tuple[int, int]] = IMAGE_SIZE,
                         object_size: tuple[float, float] = OBJECT_SIZE,
                         objects: tuple[int, int] = OBJECTS) -> str:
    """Write the relations world to `out` in COCO 2014 layout; returns `out`.

    `colours`, `shapes` and `background` are as for captioning.tinyset.make_tinyset (the defaults are
    the tiny set's, so both sets share their words); `image_size` is ((min, max) width, (min, max)
    height) in pixels, `object_size` each object's side as a fraction of the image's shorter side,
    `objects` the (fewest, most) objects per image, 2..4. Everything is checked before anything is
    written; the same seed gives the same images and captions.
    """
    if train < 1 or val < 1:
        raise ValueError(f"the relations world needs at least one image per split, got train={train}, val={val}")
    options = _palette(colours, shapes, background, image_size, object_size)
    options["objects"] = _check_objects(objects, len(options["colours"]) * len(options["shapes"]))
    _check_fits(options)
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    rng = random.Random(seed)
    write: dict[str, Any] = dict(palette=options, make_example=_make_example, description=DESCRIPTION,
                                 extra={"world": "relations"})
    next_ann = write_split(out, "train", train, rng, first_image_id=1, first_ann_id=1, **write)
    write_split(out, "val", val, rng, first_image_id=100_001, first_ann_id=next_ann, **write)
    return out
