"""The bundled tiny dataset: coloured shapes, written in the exact COCO 2014 layout.

    DIR/train2014/COCO_train2014_000000000001.jpg ...
    DIR/val2014/COCO_val2014_000000100001.jpg ...
    DIR/annotations/captions_{train,val}2014.json

Every image holds one or two shapes; two shapes stand in a spatial relation
("to the left of", "above", ...). Each image gets 5 captions written from a
pool of phrasings, with the case and the final period varied the way people
write COCO captions. The captions can only be right if the model looks at the
image: colour, shape and relation are all drawn at random.

Generation is deterministic for a given seed and takes a few seconds.
"""
import json
import os
import random

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
# initialised CNN's features and slows down learning the shapes' colours (measured).
BACKGROUND = (236, 236, 232)
RELATIONS = {  # relation of the first object to the second, and its inverse
    "to the left of": "to the right of",
    "above": "below",
}

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


def _draw_shape(draw, shape, box, colour):
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _make_example(rng):
    """Return (PIL image, 5 captions) for one random scene."""
    width, height = rng.randint(88, 128), rng.randint(72, 104)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)

    n_objects = 1 if rng.random() < 0.3 else 2
    objects = []
    while len(objects) < n_objects:
        obj = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
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
            boxes = [place(cx + jitter(12), height // 4 + jitter(3)), place(cx + jitter(12), 3 * height // 4 + jitter(3))]
    for (colour, shape), box in zip(objects, boxes):
        _draw_shape(draw, shape, box, COLOURS[colour])
    image = image.filter(ImageFilter.GaussianBlur(0.6))

    names = [f"{c} {s}" for c, s in objects]
    if relation is None:
        templates = rng.sample(ONE_OBJECT, 5)
        captions = [t.format(a=names[0]) for t in templates]
    else:
        templates = rng.sample(TWO_OBJECTS, 5)
        captions = [t.format(a=names[0], b=names[1], rel=relation, inv=RELATIONS[relation]) for t in templates]
    return image, [_vary_case(c, rng) for c in captions]


def _write_split(out, split, count, rng, first_image_id, first_ann_id):
    image_dir = os.path.join(out, f"{split}2014")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    ann_id = first_ann_id
    for image_id in range(first_image_id, first_image_id + count):
        image, captions = _make_example(rng)
        file_name = f"COCO_{split}2014_{image_id:012d}.jpg"
        image.save(os.path.join(image_dir, file_name), quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for caption in captions:
            annotations.append({"id": ann_id, "image_id": image_id, "caption": caption})
            ann_id += 1
    coco = {
        "info": {"description": "Tiny synthetic captioning set (coloured shapes) in COCO 2014 format",
                 "version": "1.0", "year": 2014},
        "licenses": [{"id": 1, "name": "CC0", "url": ""}],
        "images": images,
        "annotations": annotations,
    }
    with open(os.path.join(out, "annotations", f"captions_{split}2014.json"), "w") as f:
        json.dump(coco, f)
    return ann_id


def make_tinyset(out, train=3000, val=250, seed=0):
    """Write the tiny dataset to `out` in COCO 2014 layout; returns `out`."""
    if train < 1 or val < 1:
        raise ValueError(f"tinyset needs at least one image per split, got train={train}, val={val}")
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    rng = random.Random(seed)
    next_ann = _write_split(out, "train", train, rng, first_image_id=1, first_ann_id=1)
    _write_split(out, "val", val, rng, first_image_id=100_001, first_ann_id=next_ann)
    return out
