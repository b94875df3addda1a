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

from PIL import Image, ImageDraw, ImageFilter

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
DRAWABLE_SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "octagon",
                   "star", "cross", "heart", "ring")

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


def with_articles(caption):
    """'a' becomes 'an' before a vowel sound: 'a orange circle' -> 'an orange circle'.

    The templates say 'a {a}'; the colour (or shape) filled in decides the article, as a person
    writing the caption would.
    """
    def article(match):
        word = match.group(2).lower()
        vowel = word[0] in "aeiou" and not word.startswith(_CONSONANT_SOUND)
        return f"{match.group(1)}{'n' if vowel else ''} {match.group(2)}"

    return _ARTICLE.sub(article, caption)


def _vary_case(caption, rng):
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


def _heart_outline(n=48):
    """The classic parametric heart, scaled to the square [-1, 1]^2 (y down, tip at the bottom)."""
    points = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x, y))
    top, bottom = max(y for _, y in points), min(y for _, y in points)
    return [(x, (top + bottom - 2 * y) / (top - bottom)) for x, y in points]


def _regular(n, inner=None):
    """A regular n-gon (or an n-pointed star with radius ratio `inner`) in [-1, 1]^2, a vertex on top."""
    corners = 2 * n if inner else n
    radii = [1.0 if k % 2 == 0 or not inner else inner for k in range(corners)]
    angles = [math.radians(-90 + 360 * k / corners) for k in range(corners)]
    return [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles)]


_ARM = 1 / 3  # half the width of a cross's arms, as a fraction of half the box
_UNIT_OUTLINES = {  # polygons in box units: (-1, -1) is the box's top-left corner, (1, 1) its bottom-right
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
}


def _outline(shape, box, rotation):
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


def check_shapes(shapes):
    """Raise ValueError unless every name in `shapes` is one of DRAWABLE_SHAPES."""
    unknown = [s for s in shapes if s not in DRAWABLE_SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(DRAWABLE_SHAPES)}")


def draw_shape(draw, shape, box, colour, rotation=0.0):
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


def _make_example(rng, colours, shapes, background):
    """Return (PIL image, 5 captions, ground truth) for one random scene.

    The ground truth is {"objects": [{"colour", "shape", "box"}], "relation": [0, phrase, 1] or None}.
    """
    width, height = rng.randint(88, 128), rng.randint(72, 104)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)

    n_objects = 1 if rng.random() < 0.3 else 2
    objects = []
    while len(objects) < n_objects:
        obj = (rng.choice(list(colours)), rng.choice(shapes))
        if obj not in objects:
            objects.append(obj)
    size = rng.randint(int(0.32 * min(width, height)), int(0.42 * min(width, height)))

    def place(cx, cy):
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


def _write_split(out, split, count, rng, first_image_id, first_ann_id, palette):
    image_dir = os.path.join(out, f"{split}2014")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    ann_id = first_ann_id
    for image_id in range(first_image_id, first_image_id + count):
        image, captions, truth = _make_example(rng, **palette)
        file_name = f"COCO_{split}2014_{image_id:012d}.jpg"
        image.save(os.path.join(image_dir, file_name), quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height,
                       **truth})
        for caption in captions:
            annotations.append({"id": ann_id, "image_id": image_id, "caption": caption})
            ann_id += 1
    coco = {
        "info": {"description": "Tiny synthetic captioning set (coloured shapes) in COCO 2014 format",
                 "version": "1.0", "year": 2014},
        "licenses": [{"id": 1, "name": "CC0", "url": ""}],
        "images": images,
        "annotations": annotations,
        # the generator's vocabulary of truth, for captioning.semantics (COCO tools ignore these keys)
        "relations": RELATION_INVERSES,
        "colours": {name: list(rgb) for name, rgb in palette["colours"].items()},
        "shapes": list(palette["shapes"]),
        "background": list(palette["background"]),
    }
    with open(os.path.join(out, "annotations", f"captions_{split}2014.json"), "w") as f:
        json.dump(coco, f)
    return ann_id


def _check_rgb(what, rgb):
    if not (isinstance(rgb, (tuple, list)) and len(rgb) == 3
            and all(isinstance(v, numbers.Integral) and 0 <= v <= 255 for v in rgb)):
        raise ValueError(f"{what} must be three integers 0..255 (R, G, B), got {rgb!r}")
    return tuple(int(v) for v in rgb)


def _check_name(kind, name):
    """A colour or shape name must be what the tokenizer gives back, or captions could not be scored."""
    from .vocabulary import tokenize

    if not isinstance(name, str) or not name or " ".join(tokenize(name)) != name:
        raise ValueError(f"{kind} name {name!r} must be lowercase words (letters only, single spaces)")


def _palette(colours, shapes, background):
    """Validated {"colours", "shapes", "background"} for make_tinyset; ValueError says what is wrong."""
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
    return {"colours": colours, "shapes": shapes, "background": _check_rgb("background", background)}


def make_tinyset(out, train=3000, val=250, seed=0, colours=None, shapes=None, background=BACKGROUND):
    """Write the tiny dataset to `out` in COCO 2014 layout; returns `out`.

    `colours` ({name: (R, G, B)}, default COLOURS), `shapes` (names from DRAWABLE_SHAPES, default
    SHAPES) and `background` (R, G, B) make a set of your own; the defaults give the bundled set,
    the same images and captions for the same seed.
    """
    if train < 1 or val < 1:
        raise ValueError(f"tinyset needs at least one image per split, got train={train}, val={val}")
    palette = _palette(colours, shapes, background)
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    rng = random.Random(seed)
    next_ann = _write_split(out, "train", train, rng, first_image_id=1, first_ann_id=1, palette=palette)
    _write_split(out, "val", val, rng, first_image_id=100_001, first_ann_id=next_ann, palette=palette)
    return out


# ---- the CLI's spellings: `--colours pink,cyan,navy=#1f3a93 --shapes star,hexagon --background white`

def parse_rgb(text):
    """'white' (a name in NAMED_COLOURS) or '#RRGGBB' -> (R, G, B)."""
    text = text.strip().lower()
    if text in NAMED_COLOURS:
        return NAMED_COLOURS[text]
    digits = text[1:] if text.startswith("#") else ""
    if len(digits) != 6 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError(f"unknown colour {text!r}: use #RRGGBB or one of {', '.join(NAMED_COLOURS)}")
    return tuple(int(digits[k:k + 2], 16) for k in (0, 2, 4))


def parse_colours(text):
    """'pink,cyan,navy=#1f3a93' -> {name: (R, G, B)}: known names, or NAME=#RRGGBB for any other."""
    colours = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        colours[name] = parse_rgb(value if sep else name)
    if not colours:
        raise ValueError(f"no colours in {text!r}")
    return colours


def parse_shapes(text):
    """'star,hexagon' -> ('star', 'hexagon'), each checked against DRAWABLE_SHAPES."""
    shapes = tuple(filter(None, (part.strip().lower() for part in text.split(","))))
    if not shapes:
        raise ValueError(f"no shapes in {text!r}")
    check_shapes(shapes)
    return shapes
