"""The bundled tiny dataset: coloured shapes, written in the exact COCO 2014 layout.

    DIR/train2014/COCO_train2014_000000000001.jpg ...
    DIR/val2014/COCO_val2014_000000100001.jpg ...
    DIR/annotations/captions_{train,val}2014.json

Every image holds one or two shapes; two shapes stand in a spatial relation
("to the left of", "above", ...). Each image gets 5 captions written from a
pool of phrasings, with the case and the final period varied the way people
write COCO captions. The captions can only be right if the model looks at the
image: colour, shape and relation are all drawn at random.

The generator knows the truth, so each image entry also carries it, in fields that COCO
tools ignore: `objects` [{"colour", "shape", "box"}] in drawing order and `relation`
[subject index, phrase, object index] (or null); the file's top level holds `relations`
(phrase -> inverse phrase), `colours`, `shapes` and `background`, everything a scorer
(`captioning.semantics`) needs to check what a caption says.

`make_tinyset(..., colours=, shapes=, background=)` writes the same kind of set with your
own palette and shapes; `draw_shape` draws any of `DRAWABLE_SHAPES` for other modules.

Generation is deterministic for a given seed and takes a few seconds.
"""
import json
import math
import numbers
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFilter

from .vocabulary import tokenize

RGB = tuple[int, int, int]
Box = Sequence[float]                 # (x0, y0, x1, y1) in pixels

COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 160, 50),
    "blue": (35, 70, 215),
    "yellow": (235, 210, 25),
    "purple": (135, 45, 175),
    "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle")
# One plain background: a tint that varies per image would be the loudest signal in a randomly
# initialised CNN's features and slows down learning the shapes' colours.
BACKGROUND = (236, 236, 232)
RELATIONS = {  # relation of the first object to the second, and its inverse
    "to the left of": "to the right of",
    "above": "below",
}
# every phrase a caption may use -> the phrase that says the same with subject and object swapped
RELATION_INVERSES = {**RELATIONS, **{inverse: phrase for phrase, inverse in RELATIONS.items()}}

# colours the CLI knows by name (`--colours pink,cyan`); the default palette keeps its exact values
NAMED_COLOURS = {
    **COLOURS,
    "pink": (240, 120, 180),
    "cyan": (30, 195, 215),
    "brown": (125, 75, 35),
    "grey": (125, 125, 125),
    "black": (25, 25, 25),
    "white": (252, 252, 252),
    "magenta": (215, 30, 195),
    "teal": (0, 125, 125),
    "navy": (20, 30, 110),
    "lime": (150, 220, 40),
}
# the stand-in backbone (captioning.standin) is pretrained on eleven of these and never sees
# HELDOUT_SHAPES, which measure how well its features carry over to shapes it never saw
DRAWABLE_SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "octagon",
                   "star", "cross", "heart", "ring", "bar", "ellipse", "semicircle", "trapezoid",
                   "parallelogram", "chevron", "arrow", "crescent", "kite", "hexagram")
HELDOUT_SHAPES = ("arrow", "crescent", "kite", "hexagram")

ONE_OBJECT = (
    "A {a}.",
    "a {a} on a plain background",
    "There is a {a} in the picture.",
    "A single {a}",
    "One {a} on a plain background.",
    "a picture of a {a}",
    "The image shows a {a}.",
)
TWO_OBJECTS = (
    "A {a} {rel} a {b}.",
    "a {b} {inv} a {a}",
    "There is a {a} {rel} a {b}.",
    "The {a} is {rel} the {b}",
    "The {b} is {inv} the {a}.",
    "a {a} and a {b}, the {a} is {rel} the {b}",
)


_ARTICLE = re.compile(r"\b([Aa]) (\w+)")
# words that start with a vowel letter but a consonant sound ("a unicorn", "a one-eyed ...")
_CONSONANT_SOUND = ("uni", "use", "usu", "uti", "eu", "one", "once")


def with_articles(caption: str) -> str:
    """'a' becomes 'an' before a vowel sound: 'a orange circle' -> 'an orange circle'.

    The templates say 'a {a}'; the colour (or shape) filled in decides the article, as a person
    writing the caption would.
    """
    def article(match: re.Match[str]) -> str:
        word = match.group(2).lower()
        vowel = word[0] in "aeiou" and not word.startswith(_CONSONANT_SOUND)
        return f"{match.group(1)}{'n' if vowel else ''} {match.group(2)}"

    return _ARTICLE.sub(article, caption)


def _vary_case(caption: str, rng: random.Random) -> str:
    """People write 'A red circle.', 'a red circle' and 'A Red Circle'."""
    r = rng.random()
    if r < 0.45:
        caption = caption[0].upper() + caption[1:]
    elif r < 0.9:
        caption = caption[0].lower() + caption[1:]
    else:
        caption = caption.title()
    caption = caption.rstrip(".")
    return caption + "." if rng.random() < 0.4 else caption


def _heart_outline(n: int = 48) -> list[tuple[float, float]]:
    """The classic parametric heart, scaled to the square [-1, 1]^2 (y down, tip at the bottom)."""
    points = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x, y))
    top, bottom = max(y for _, y in points), min(y for _, y in points)
    return [(x, (top + bottom - 2 * y) / (top - bottom)) for x, y in points]


def _regular(n: int, inner: float | None = None) -> list[tuple[float, float]]:
    """A regular n-gon (or an n-pointed star with radius ratio `inner`) in [-1, 1]^2, a vertex on top."""
    corners = 2 * n if inner else n
    radii = [1.0 if k % 2 == 0 or not inner else inner for k in range(corners)]
    angles = [math.radians(-90 + 360 * k / corners) for k in range(corners)]
    return [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles)]


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, stop: float,
         n: int = 24) -> list[tuple[float, float]]:
    """Points on an ellipse from angle `start` to `stop` (degrees, y down), both ends included."""
    return [(cx + rx * math.cos(math.radians(start + (stop - start) * k / n)),
             cy + ry * math.sin(math.radians(start + (stop - start) * k / n))) for k in range(n + 1)]


def _crescent(offset: float = 0.5, inner: float = 0.8) -> list[tuple[float, float]]:
    """The unit circle less a circle of radius `inner` moved `offset` to the right: horns to the right."""
    x = (1 - inner ** 2 + offset ** 2) / (2 * offset)          # where the two circles cross
    outer_angle = math.degrees(math.atan2(math.sqrt(1 - x * x), x))
    inner_angle = math.degrees(math.atan2(math.sqrt(1 - x * x), x - offset))
    return (_arc(0, 0, 1, 1, outer_angle, 360 - outer_angle)
            + _arc(offset, 0, inner, inner, 360 - inner_angle, inner_angle)[1:-1])


_ARM = 1 / 3  # half the width of a cross's arms, as a fraction of half the box
# polygons in box units: (-1, -1) is the box's top-left corner, (1, 1) its bottom-right
_UNIT_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
    "pentagon": _regular(5),
    "hexagon": _regular(6),
    "octagon": _regular(8),
    "star": _regular(5, inner=0.45),
    "cross": [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM),
              (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)],
    "heart": _heart_outline(),
    "bar": [(-1, -0.28), (1, -0.28), (1, 0.28), (-1, 0.28)],          # thin shapes: a bar, an ellipse
    "ellipse": _arc(0, 0, 1, 0.5, 0, 360, n=40)[:-1],
    "semicircle": _arc(0, 0.45, 1, 1.45, 180, 360),
    "trapezoid": [(-0.5, -0.7), (0.5, -0.7), (1, 0.7), (-1, 0.7)],
    "parallelogram": [(-0.45, -0.6), (1, -0.6), (0.45, 0.6), (-1, 0.6)],
    "chevron": [(-1, -0.75), (0, 0.05), (1, -0.75), (1, -0.15), (0, 0.75), (-1, -0.15)],
    "arrow": [(-1, -0.22), (0.15, -0.22), (0.15, -0.7), (1, 0), (0.15, 0.7), (0.15, 0.22), (-1, 0.22)],
    "crescent": _crescent(),
    "kite": [(0, -1), (0.62, -0.35), (0, 1), (-0.62, -0.35)],
    "hexagram": _regular(6, inner=0.58),
}


def _outline(shape: str, box: Box, rotation: float) -> list[tuple[float, float]]:
    """The polygon's vertices in pixels: box units stretched to the box, turned about its centre."""
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    cos, sin = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    points = []
    for u, v in _UNIT_OUTLINES[shape]:
        dx, dy = u * rx, v * ry
        # counter-clockwise on screen, where y points down
        points.append((cx + dx * cos + dy * sin, cy - dx * sin + dy * cos))
    return points


def check_shapes(shapes: Iterable[str]) -> None:
    """Raise ValueError unless every name in `shapes` is one of DRAWABLE_SHAPES."""
    unknown = [s for s in shapes if s not in DRAWABLE_SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(DRAWABLE_SHAPES)}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, colour: Any, rotation: float = 0.0) -> None:
    """Fill `shape` (one of DRAWABLE_SHAPES) into `box` (x0, y0, x1, y1) on a PIL ImageDraw.

    `rotation` turns a polygon by that many degrees, counter-clockwise about the box's centre
    (a turned square or cross may reach past the box's corners); circles and rings ignore it.
    Unturned circles, squares and triangles come out exactly as the tiny set has always drawn them.
    """
    check_shapes([shape])
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, round(min(x1 - x0, y1 - y0) / 5)))
    elif shape == "square" and rotation % 360 == 0:
        draw.rectangle(box, fill=colour)
    elif shape == "triangle" and rotation % 360 == 0:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        draw.polygon(_outline(shape, box, rotation), fill=colour)


IMAGE_SIZE = ((88, 128), (72, 104))   # (width range, height range) in pixels
OBJECT_SIZE = (0.32, 0.42)            # an object's box side, as a fraction of the image's shorter side


def _make_example(rng: random.Random, colours: Mapping[str, RGB], shapes: Sequence[str], background: RGB,
                  image_size: tuple[tuple[int, int], tuple[int, int]] = IMAGE_SIZE,
                  object_size: tuple[float, float] = OBJECT_SIZE) -> tuple[Image.Image, list[str], dict[str, Any]]:
    """Return (PIL image, 5 captions, ground truth) for one random scene.

    The ground truth is {"objects": [{"colour", "shape", "box"}], "relation": [0, phrase, 1] or None}.
    """
    (w_lo, w_hi), (h_lo, h_hi) = image_size
    width, height = rng.randint(w_lo, w_hi), rng.randint(h_lo, h_hi)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)

    n_objects = 1 if rng.random() < 0.3 else 2
    objects: list[tuple[str, str]] = []
    while len(objects) < n_objects:
        obj = (rng.choice(list(colours)), rng.choice(shapes))
        if obj not in objects:
            objects.append(obj)
    size = rng.randint(int(object_size[0] * min(width, height)), int(object_size[1] * min(width, height)))

    def place(cx: int, cy: int) -> tuple[int, int, int, int]:
        cx = min(max(cx, size // 2 + 2), width - size // 2 - 2)
        cy = min(max(cy, size // 2 + 2), height - size // 2 - 2)
        return (cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2)

    if n_objects == 1:
        boxes = [place(rng.randint(size, width - size), rng.randint(size, height - size))]
        relation = None
    else:
        relation = rng.choice(list(RELATIONS))
        jitter = lambda n: rng.randint(-n, n)  # noqa: E731
        if relation == "to the left of":
            cy = height // 2
            boxes = [place(width // 4 + jitter(4), cy + jitter(8)), place(3 * width // 4 + jitter(4), cy + jitter(8))]
        else:
            cx = width // 2
            boxes = [place(cx + jitter(12), height // 4 + jitter(3)),
                     place(cx + jitter(12), 3 * height // 4 + jitter(3))]
    for (colour, shape), box in zip(objects, boxes):
        draw_shape(draw, shape, box, colours[colour])
    image = image.filter(ImageFilter.GaussianBlur(0.6))

    names = [f"{c} {s}" for c, s in objects]
    if relation is None:
        templates = rng.sample(ONE_OBJECT, 5)
        captions = [with_articles(t.format(a=names[0])) for t in templates]
    else:
        templates = rng.sample(TWO_OBJECTS, 5)
        captions = [with_articles(t.format(a=names[0], b=names[1], rel=relation, inv=RELATIONS[relation]))
                    for t in templates]
    truth = {"objects": [{"colour": c, "shape": s, "box": list(box)} for (c, s), box in zip(objects, boxes)],
             "relation": None if relation is None else [0, relation, 1]}
    return image, [_vary_case(c, rng) for c in captions], truth


DESCRIPTION = "Tiny synthetic captioning set (coloured shapes) in COCO 2014 format"


def write_split(out: str, split: str, count: int, rng: random.Random, first_image_id: int, first_ann_id: int,
                palette: Mapping[str, Any], make_example: Any = None, description: str = DESCRIPTION,
                extra: Mapping[str, Any] | None = None) -> int:
    """Write one split's images and captions file in COCO 2014 layout; returns the next free annotation id.

    `make_example(rng, **palette)` -> (image, captions, truth) draws each scene (default: the tiny set's);
    the truth goes into the image's entry, and `extra` keys after the file's usual ones (relworld's "world")."""
    make_example = make_example or _make_example
    image_dir = os.path.join(out, f"{split}2014")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    ann_id = first_ann_id
    for image_id in range(first_image_id, first_image_id + count):
        image, captions, truth = make_example(rng, **palette)
        file_name = f"COCO_{split}2014_{image_id:012d}.jpg"
        image.save(os.path.join(image_dir, file_name), quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height,
                       **truth})
        for caption in captions:
            annotations.append({"id": ann_id, "image_id": image_id, "caption": caption})
            ann_id += 1
    coco = {
        "info": {"description": description, "version": "1.0", "year": 2014},
        "licenses": [{"id": 1, "name": "CC0", "url": ""}],
        "images": images,
        "annotations": annotations,
        # the generator's vocabulary of truth, for captioning.semantics (COCO tools ignore these keys)
        "relations": RELATION_INVERSES,
        "colours": {name: list(rgb) for name, rgb in palette["colours"].items()},
        "shapes": list(palette["shapes"]),
        "background": list(palette["background"]),
        **(extra or {}),
    }
    with open(os.path.join(out, "annotations", f"captions_{split}2014.json"), "w") as f:
        json.dump(coco, f)
    return ann_id


def _check_rgb(what: str, rgb: Any) -> RGB:
    if not (isinstance(rgb, (tuple, list)) and len(rgb) == 3
            and all(isinstance(v, numbers.Integral) and 0 <= int(v) <= 255 for v in rgb)):
        raise ValueError(f"{what} must be three integers 0..255 (R, G, B), got {rgb!r}")
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


def _check_name(kind: str, name: Any) -> None:
    """A colour or shape name must be what the tokenizer gives back, or captions could not be scored."""
    if not isinstance(name, str) or not name or " ".join(tokenize(name)) != name:
        raise ValueError(f"{kind} name {name!r} must be lowercase words (letters only, single spaces)")


def _check_range(what: str, pair: Any, low: float, high: float) -> tuple[Any, ...]:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(v, numbers.Real) for v in pair)
            and low <= pair[0] <= pair[1] <= high):
        raise ValueError(f"{what} must be (smallest, largest) with {low} <= smallest <= largest <= {high}, "
                         f"got {pair!r}")
    return tuple(pair)


def _palette(colours: Mapping[str, Any] | None, shapes: Iterable[str] | None, background: Any,
             image_size: Any = IMAGE_SIZE, object_size: Any = OBJECT_SIZE) -> dict[str, Any]:
    """Validated make_tinyset options (colours, shapes, background, sizes); ValueError says what is wrong."""
    colours = dict(COLOURS if colours is None else colours)
    shapes = tuple(SHAPES if shapes is None else shapes)
    for name, rgb in colours.items():
        _check_name("colour", name)
        colours[name] = _check_rgb(f"colour {name!r}", rgb)
    check_shapes(shapes)
    if len(set(shapes)) != len(shapes):
        raise ValueError(f"shapes repeat a name: {', '.join(shapes)}")
    clash = sorted(set(colours) & set(shapes))
    if clash:
        raise ValueError(f"{', '.join(clash)} cannot be both a colour and a shape")
    if len(colours) * len(shapes) < 2:
        raise ValueError("two-object scenes need two different (colour, shape) pairs: "
                         f"give more than {len(colours)} colour(s) x {len(shapes)} shape(s)")
    widths, heights = (_check_range(f"image_size {name}s", pair, 32, 4096)
                       for name, pair in zip(("width", "height"), image_size))
    object_size = _check_range("object_size", object_size, 0.1, 0.45)
    return {"colours": colours, "shapes": shapes, "background": _check_rgb("background", background),
            "image_size": (widths, heights), "object_size": object_size}


def make_tinyset(out: str, train: int = 3000, val: int = 250, seed: int = 0, colours: Mapping[str, RGB] | None = None,
                 shapes: Iterable[str] | None = None, background: RGB = BACKGROUND,
                 image_size: tuple[tuple[int, int], tuple[int, int]] = IMAGE_SIZE,
                 object_size: tuple[float, float] = OBJECT_SIZE) -> str:
    """Write the tiny dataset to `out` in COCO 2014 layout; returns `out`.

    `colours` ({name: (R, G, B)}, default COLOURS), `shapes` (names from DRAWABLE_SHAPES, default
    SHAPES), `background` (R, G, B), `image_size` ((min, max) width, (min, max) height in pixels:
    unequal ranges give landscape and portrait images) and `object_size` (an object's side as a
    fraction of the image's shorter side) make a set of your own; the defaults give the bundled
    set, the same images and captions for the same seed.
    """
    if train < 1 or val < 1:
        raise ValueError(f"tinyset needs at least one image per split, got train={train}, val={val}")
    palette = _palette(colours, shapes, background, image_size, object_size)
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    rng = random.Random(seed)
    next_ann = write_split(out, "train", train, rng, first_image_id=1, first_ann_id=1, palette=palette)
    write_split(out, "val", val, rng, first_image_id=100_001, first_ann_id=next_ann, palette=palette)
    return out


# ---- the CLI's spellings: `--colours pink,cyan,navy=#1f3a93 --shapes star,hexagon --background white`

def parse_rgb(text: str) -> RGB:
    """'white' (a name in NAMED_COLOURS) or '#RRGGBB' -> (R, G, B)."""
    text = text.strip().lower()
    if text in NAMED_COLOURS:
        return NAMED_COLOURS[text]
    digits = text[1:] if text.startswith("#") else ""
    if len(digits) != 6 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError(f"unknown colour {text!r}: use #RRGGBB or one of {', '.join(NAMED_COLOURS)}")
    return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)


def parse_colours(text: str) -> dict[str, RGB]:
    """'pink,cyan,navy=#1f3a93' -> {name: (R, G, B)}: known names, or NAME=#RRGGBB for any other."""
    colours: dict[str, RGB] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        colours[name] = parse_rgb(value if sep else name)
    if not colours:
        raise ValueError(f"no colours in {text!r}")
    return colours


def parse_shapes(text: str) -> tuple[str, ...]:
    """'star,hexagon' -> ('star', 'hexagon'), each checked against DRAWABLE_SHAPES."""
    shapes = tuple(filter(None, (part.strip().lower() for part in text.split(","))))
    if not shapes:
        raise ValueError(f"no shapes in {text!r}")
    check_shapes(shapes)
    return shapes
