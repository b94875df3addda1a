"""The tiny preset's stand-in for ImageNet: a ResNet pretrained from scratch on synthetic scenes.

On COCO the chapter's frozen encoder works because ImageNet taught it to see. The tiny world has
no ImageNet, so this module makes one:

- `synthetic_scene`: one to three shapes of any colour on a light, dark, coloured or graded
  background, drawn at aspect ratios from 3:4 to 9:5 and squashed to a square, as
  `resize_images` squashes a photo, then cropped like a training image;
- `scene_targets` / `StandinHead` / `standin_loss`: from the pooled features alone, a linear head
  says which shapes are present, and the shape and colour of each object from left to right and
  from top to bottom;
- `pretrain_standin`: the training loop, small images first (`resolution_schedule`);
- `ensure_standin(config)`: the stand-in that ships with the project (`SHIPPED_DIR`) when it was
  made by this very recipe, else pretrain once and save an ordinary weights file under
  `models_dir/pretrained/`; either is loaded through the same `weights=<path>` route as a user's
  own ImageNet file;
- `ship_standin`: the half-precision copy of a stand-in that goes into `SHIPPED_DIR`
  (`python -m captioning standin --ship`).

It pretrains on eleven of tinyset's shapes and never on `tinyset.HELDOUT_SHAPES`, which stay
unseen so that benchmarks can measure how well the features carry over to a user's own shapes.
The file name carries a fingerprint of the recipe, so a changed recipe never loads an old file.
"""
import colorsys
import hashlib
import inspect
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.utils.data
import torchvision.models as models
from PIL import Image, ImageDraw, ImageFilter

from .atomic import atomic_write
from .config import Config
from .data import _to_normalized_tensor
from .derived import build_lock
from .images import load_image
from .progress import tqdm
from .tinyset import DRAWABLE_SHAPES, HELDOUT_SHAPES, draw_shape

# the eleven shapes it is pretrained on: wider families (tinyset's thin shapes, 17 in all) and a
# wider range of sizes gave worse features at the same number of steps (benchmarks/README.md)
PRETRAINING_SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "octagon", "star", "cross",
                      "heart", "ring")
assert not set(PRETRAINING_SHAPES) & set(HELDOUT_SHAPES) and set(PRETRAINING_SHAPES) <= set(DRAWABLE_SHAPES)
MAX_OBJECTS = 3
ORDER_SLOTS = 2 * MAX_OBJECTS  # the objects from left to right, then from top to bottom
OBJECT_COUNTS = (1, 1, 2, 2, 2, 3)   # drawn uniformly: one scene in three has a single object
RADIUS = (0.15, 0.23)              # an object's radius, as a fraction of the image's shorter side
ROTATION = 20                      # polygons are turned by up to this many degrees either way
ASPECT = (0.75, 1.8)               # width / height before the squash to a square, as photos and the tiny set
LABEL_SMOOTHING = 0.0
# these ranges (through pretrain_standin's defaults) and the loop's defaults go into the stand-in's
# file name (recipe_fingerprint)
RECIPE_VERSION = 3


# ---- synthetic scenes -----------------------------------------------------------------------------

def _random_colour(rng):
    """Any colour: a grey in one draw of eight, else a random hue at a random saturation and value."""
    if rng.random() < 0.125:
        return (rng.random(),) * 3
    return colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))


def _background(rng, width, height):
    """A light, dark or random solid background, sometimes a two-colour gradient."""
    kind = rng.random()
    if kind < 0.5:
        colour = tuple(rng.uniform(0.75, 1.0) for _ in range(3))
    elif kind < 0.65:
        colour = tuple(rng.uniform(0.0, 0.2) for _ in range(3))
    else:
        colour = _random_colour(rng)
    image = Image.new("RGB", (width, height), tuple(round(255 * c) for c in colour))
    if rng.random() < 0.25:
        other = Image.new("RGB", (width, height), tuple(round(255 * c) for c in _random_colour(rng)))
        mask = Image.linear_gradient("L").rotate(rng.choice((0, 90, 180, 270))).resize((width, height))
        image = Image.composite(other, image, mask.point(lambda v: v // 2))
    return image, colour


def synthetic_scene(rng: random.Random, shapes: Sequence[str], resize_size: int, crop_size: int,
                    radius: tuple[float, float] = RADIUS, aspect: tuple[float, float] = ASPECT
                    ) -> tuple[Image.Image, list[tuple[int, tuple[float, float, float], float, float]]]:
    """One random scene, squashed to resize_size and cropped to crop_size like a training image.

    `radius`: the objects' radius range as a fraction of the picture's shorter side; `aspect`: the
    range of its width / height before the squash.

    Returns (PIL image, objects): objects are (shape index, colour (r, g, b) in 0..1, centre x, centre y),
    with the centre in the crop's coordinates (0..1).
    """
    width = rng.randint(64, 140)
    height = max(48, round(width / rng.uniform(*aspect)))
    image, background = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    count = rng.choice(OBJECT_COUNTS)
    size = rng.uniform(*radius) * min(width, height)
    objects: list[tuple[int, tuple[float, float, float], float, float, float]] = []
    tries = 0
    while len(objects) < count and tries < 40:
        tries += 1
        r = size * rng.uniform(0.85, 1.15)
        cx, cy = rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, height - r - 1)
        if any(math.hypot(cx - x, cy - y) < 1.1 * (r + other) for _, _, x, y, other in objects):
            continue
        colour = _random_colour(rng)
        if sum((a - b) ** 2 for a, b in zip(colour, background)) < 0.1:  # invisible on this background
            continue
        shape = rng.randrange(len(shapes))
        draw_shape(draw, shapes[shape], (cx - r, cy - r, cx + r, cy + r), tuple(round(255 * c) for c in colour),
                   rotation=rng.uniform(-ROTATION, ROTATION))
        objects.append((shape, colour, cx, cy, r))
    blur = rng.uniform(0.2, 1.0) if rng.random() < 0.7 else 0.0   # in the drawing's pixels
    image = image.resize((resize_size, resize_size), resample=2)        # bilinear, as resize_images
    if blur:  # blurred after the resize, at the radius that scale gives: the same look, a fraction of the work
        image = image.filter(ImageFilter.GaussianBlur(blur * resize_size / max(width, height)))
    left, top = rng.randint(0, resize_size - crop_size), rng.randint(0, resize_size - crop_size)
    image = image.crop((left, top, left + crop_size, top + crop_size))
    scale_x, scale_y = resize_size / width, resize_size / height
    return image, [(s, c, (x * scale_x - left) / crop_size, (y * scale_y - top) / crop_size)
                   for s, c, x, y, _ in objects]


def scene_targets(objects: Sequence[tuple], n_shapes: int, min_gap: float = 0.08) -> tuple[torch.Tensor, ...]:
    """The pretraining targets of one scene.

    - order slots: the shape (n_shapes = none) and colour of the objects sorted left to right,
      then top to bottom; an axis whose order is ambiguous (centres closer than min_gap) is masked;
    - present: which shapes are in the scene (multi-hot).
    """
    shape = torch.full((ORDER_SLOTS,), n_shapes, dtype=torch.long)
    colour = torch.zeros(ORDER_SLOTS, 3)
    mask = torch.zeros(ORDER_SLOTS)
    for axis in (0, 1):
        ordered = sorted(objects, key=lambda o: o[2 + axis])
        gaps = [b[2 + axis] - a[2 + axis] for a, b in zip(ordered, ordered[1:])]
        if any(g < min_gap for g in gaps):
            shape[axis * MAX_OBJECTS: (axis + 1) * MAX_OBJECTS] = -100   # ignored by cross_entropy
            continue
        for k, (s, c, _, _) in enumerate(ordered):
            shape[axis * MAX_OBJECTS + k] = s
            colour[axis * MAX_OBJECTS + k] = torch.tensor(c)
            mask[axis * MAX_OBJECTS + k] = 1
    present = torch.zeros(n_shapes)
    for s, *_ in objects:
        present[s] = 1
    return shape, colour, mask, present


def scene_batch(rng: random.Random, n: int, shapes: Sequence[str], resize_size: int, crop_size: int,
                **scene: Any) -> tuple[torch.Tensor, ...]:
    """n scenes as normalised (n, 3, crop, crop) images and their stacked targets; `scene`: synthetic_scene's ranges."""
    images, targets = [], []
    for _ in range(n):
        image, objects = synthetic_scene(rng, shapes, resize_size, crop_size, **scene)
        images.append(_to_normalized_tensor(image))
        targets.append(scene_targets(objects, len(shapes)))
    return (torch.stack(images), *(torch.stack(t) for t in zip(*targets)))


class SceneBatches(torch.utils.data.IterableDataset):
    """The batches of a resolution schedule, in order, from one random.Random(seed).

    Iterated in one DataLoader worker process, the scenes of the next steps are drawn while the
    network trains on this one; the sequence is the same as drawing them in the loop.
    """

    def __init__(self, schedule, shapes, seed, **scene):
        self.schedule, self.shapes, self.seed, self.scene = schedule, shapes, seed, scene

    def __iter__(self):
        rng = random.Random(self.seed)
        for steps, resize_size, crop_size, batch_size in self.schedule:
            for _ in range(steps):
                yield crop_size, scene_batch(rng, batch_size, self.shapes, resize_size, crop_size, **self.scene)


# ---- the readout and its loss -------------------------------------------------------------------

class StandinHead(nn.Module):
    """Linear readouts from the pooled features: per order slot, shape logits and colour; shapes present.

    Linear on purpose: what the captioner's encoder reads is the same pooled vector through a
    Linear layer, so whatever this head can read, the captioner can too.
    """

    def __init__(self, feature_size, n_shapes):
        super().__init__()
        self.n_shapes = n_shapes
        self.slots = nn.Linear(feature_size, ORDER_SLOTS * (n_shapes + 1 + 3))
        self.present = nn.Linear(feature_size, n_shapes)

    def forward(self, features):
        slots = self.slots(features).view(-1, ORDER_SLOTS, self.n_shapes + 4)   # (B, 6, S+1+3)
        return slots[..., : self.n_shapes + 1], slots[..., self.n_shapes + 1:].sigmoid(), self.present(features)


def standin_loss(outputs, shape, colour, mask, present, label_smoothing=LABEL_SMOOTHING):
    shape_logits, colour_pred, present_logits = outputs
    shape_loss = nn.functional.cross_entropy(shape_logits.flatten(0, 1), shape.flatten(),
                                             label_smoothing=label_smoothing)
    colour_loss = ((colour_pred - colour) ** 2).sum(-1).mul(mask).sum() / mask.sum().clamp(min=1)
    present_loss = nn.functional.binary_cross_entropy_with_logits(present_logits, present)
    return shape_loss + 5 * colour_loss + present_loss


@torch.no_grad()
def standin_accuracy(resnet, head, heldout):
    """What the head reads from the features of scenes it never saw.

    {"single": shape accuracy on the one-object scenes, "slots": shape accuracy over every object
    of every scene in its left-to-right and top-to-bottom places, "colour_error": mean RGB
    distance (0..1) of the colours read there}.
    """
    images, shape, colour, mask, present = heldout
    was_training = resnet.training
    resnet.eval()
    shape_logits, colour_pred, _ = head(resnet(images))
    resnet.train(was_training)
    objects = mask.bool()
    right = shape_logits.argmax(-1) == shape
    single = present.sum(1) == 1
    return {"single": right[single, 0].float().mean().item(),
            "slots": right[objects].float().mean().item(),
            "colour_error": (colour_pred - colour).norm(dim=-1)[objects].mean().item()}


# ---- the loop ---------------------------------------------------------------------------------------

def resolution_schedule(steps: int, resize_size: int, crop_size: int, batch_size: int, low_share: float = 3 / 7,
                        low_batch: int = 2) -> list[tuple[int, int, int, int]]:
    """[(steps, resize, crop, batch)]: small images first, in batches twice as large, then the captioner's size.

    Progressive resizing: a small image costs a fraction of a full one, so the network sees far
    more scenes in the same time, and the last steps adapt it to the size it will be used at.
    Small images go in double batches: on a CPU a step of small images is mostly fixed overhead,
    and the gradients of small, hard-to-read scenes are noisier.
    """
    low_crop = max(32, crop_size * 4 // 7)
    if low_crop >= crop_size:
        return [(steps, resize_size, crop_size, batch_size)]
    low_resize = low_crop + (resize_size - crop_size) * low_crop // crop_size
    low_steps = round(low_share * steps)
    return [(low_steps, low_resize, low_crop, low_batch * batch_size),
            (steps - low_steps, resize_size, crop_size, batch_size)]


def pretrain_standin(backbone="resnet18", resize_size=64, crop_size=56, steps=1400, batch_size=64, lr=2e-3,
                     seed=0, progress=True, low_share=3 / 7, low_batch=2, shapes=PRETRAINING_SHAPES, radius=RADIUS,
                     aspect=ASPECT, label_smoothing=LABEL_SMOOTHING, bf16=False, workers=0):
    """Train a ResNet from scratch on synthetic scenes; returns (state_dict without fc, report dict).

    Deterministic for a seed: the scenes come from random.Random(seed), the initialisation and
    the order of the work from torch's generator seeded the same way. `workers=1` draws the
    scenes in a worker process (the same scenes; 0 draws them in the loop); `bf16` runs the ResNet
    under bfloat16 autocast (benchmarks/standin_profile.py measures both). The report holds the
    held-out accuracy on scenes drawn from another seed, never from a captioning set.
    """
    torch.manual_seed(seed)
    resnet = getattr(models, backbone)(weights=None)
    feature_size = resnet.fc.in_features
    resnet.fc = nn.Identity()
    head = StandinHead(feature_size, len(shapes))
    resnet.to(memory_format=torch.channels_last)
    params = list(resnet.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr, weight_decay=1e-4)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.15)
    schedule = resolution_schedule(steps, resize_size, crop_size, batch_size, low_share, low_batch)
    scene = {"radius": radius, "aspect": aspect}
    heldout = scene_batch(random.Random(seed + 1_000_003), 512, shapes, resize_size, crop_size, **scene)
    batches = torch.utils.data.DataLoader(SceneBatches(schedule, shapes, seed, **scene), batch_size=None,
                                          num_workers=workers, prefetch_factor=4 if workers else None)
    resnet.train()
    with tqdm(total=steps, desc=f"pretraining the stand-in {backbone}", unit="step", disable=not progress) as bar:
        for crop, (images, *targets) in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                features = resnet(images.contiguous(memory_format=torch.channels_last))
            loss = standin_loss(head(features.float()), *targets, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            one_cycle.step()
            bar.update()
            if bar.n % 10 == 0:
                bar.set_postfix(size=crop, loss=f"{loss.item():.3f}")
    accuracy = standin_accuracy(resnet, head, heldout)
    state = {k: v.contiguous() for k, v in resnet.state_dict().items()}
    report = {"backbone": backbone, "resize_size": resize_size, "crop_size": crop_size, "steps": steps,
              "schedule": schedule, "batch_size": batch_size, "lr": lr, "radius": radius, "aspect": aspect,
              "label_smoothing": label_smoothing,
              "seed": seed, "shapes": list(shapes), "heldout_scenes": len(heldout[0]),
              "heldout_single_shape_accuracy": round(accuracy["single"], 4),
              "heldout_shape_accuracy": round(accuracy["slots"], 4),
              "heldout_colour_error": round(accuracy["colour_error"], 4)}
    return state, report


def recipe_fingerprint() -> str:
    """Eight hex digits naming the pretraining recipe: shapes, scene ranges, loss and loop defaults."""
    defaults = {name: repr(p.default) for name, p in inspect.signature(pretrain_standin).parameters.items()
                if p.default is not p.empty and name not in ("progress", "workers")}   # these change no weight
    recipe = {"version": RECIPE_VERSION, "counts": OBJECT_COUNTS, "rotation": ROTATION, "defaults": defaults}
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]


def standin_path(config: Config) -> str:
    """Where the stand-in for this backbone, image size and recipe is built: beside the run folders, shared by them."""
    folder = os.path.join(os.path.dirname(os.path.abspath(config.models_dir)), "pretrained")
    name = (f"standin-{config.backbone}-{config.resize_size}to{config.crop_size}px-"
            f"{config.standin_steps}steps-seed{config.standin_seed}-{recipe_fingerprint()}.pth")
    return os.path.join(folder, name)


# The tiny preset's stand-in, pretrained once with the preset's settings and committed with the code:
# pretraining long enough for features that carry over to a user's own shapes takes half an hour
# on two CPU cores, too long to ask of every learner in notebook 05. Its name is the one
# standin_path gives, so a changed recipe or step count never finds it and pretrains its own.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")


def find_standin(config: Config) -> str | None:
    """The stand-in's weights file for `config` if one exists: one built under models_dir's
    `pretrained/` first, else the one that ships in SHIPPED_DIR if it was made by the same recipe."""
    path = standin_path(config)
    shipped = os.path.join(SHIPPED_DIR, os.path.basename(path))
    return next((p for p in (path, shipped) if os.path.isfile(p)), None)


def ensure_standin(config: Config, log: Callable[[str], Any] = print) -> str:
    """The stand-in's weights file for `config` (find_standin), pretrained and saved first if there is none.

    Pretraining holds a lock (`<weights>.lock`): a second run wanting the same stand-in waits for the
    first, then uses the file it saved instead of pretraining it again."""
    found = find_standin(config)
    if found:
        return found
    path = standin_path(config)
    with build_lock(path, "the stand-in backbone", log):
        if os.path.isfile(path):                    # built by the process we waited for
            log(f"using the stand-in backbone another process just pretrained: {path}")
            return path
        log(f"pretraining the stand-in backbone ({config.backbone}, {config.standin_steps} steps on synthetic "
            f"scenes), saved for reuse as {os.path.basename(path)} in {os.path.dirname(path)}")
        state, report = pretrain_standin(config.backbone, config.resize_size, config.crop_size,
                                         config.standin_steps, seed=config.standin_seed, progress=config.progress)
        log(describe_standin(report))
        with atomic_write(path + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with atomic_write(path) as f:
            torch.save(state, f)
    return path


def describe_standin(report: dict[str, Any]) -> str:
    """A few lines from a stand-in's report (the .json beside its weights): how it does its own task on new scenes."""
    return (f"stand-in backbone ({report['steps']} steps), on {report['heldout_scenes']} scenes it never saw:\n"
            f"  a lone object's shape named right {report['heldout_single_shape_accuracy']:.0%} of the time "
            f"(chance: {1 / len(report['shapes']):.0%})\n"
            f"  each object's shape in two- and three-object scenes, by its place: "
            f"{report['heldout_shape_accuracy']:.0%}\n"
            f"  colours off by {report['heldout_colour_error']:.2f} (RGB distance, 0 to 1.7)")


def ship_standin(path: str, folder: str | None = None) -> str:
    """Copy the stand-in `path` (and its report) into `folder` (default: SHIPPED_DIR) under the same name,
    its convolutions in half precision: half the size in git, and features within rounding of the original's.

    BatchNorm's statistics stay in single precision, whose range they need; `build_resnet` loads
    every tensor back as float32. Returns the new file's path."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() and v.dim() > 1 else v for k, v in state.items()}
    with open(path + ".json") as f:
        report = json.load(f)
    folder = folder or SHIPPED_DIR
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, os.path.basename(path))
    with atomic_write(out + ".json", "w") as f:
        json.dump({**report, "stored": "convolution weights in float16"}, f, indent=1)
    with atomic_write(out) as f:
        torch.save(half, f)
    return out


# ---- does a backbone separate a dataset's objects? ----------------------------------------------

def recorded_objects(captions_json: str, image_folder: str, transform: Callable, limit: int | None = None,
                     resize: int | None = None) -> tuple[torch.Tensor, list[list[tuple[str, str]]]] | None:
    """A split's images as the captioner sees them, with the (colour, shape) objects the generator drew.

    Reads the images named in `captions_json` from `image_folder` (the first `limit`), squashed to
    `resize` px first where they are not resized yet, through `transform` (data.eval_transform).
    None where the captions file carries no generator's record, as COCO's does not."""
    with open(captions_json) as f:
        images = [im for im in json.load(f).get("images", []) if im.get("objects")][:limit]
    if not images:
        return None
    tensors = []
    for im in images:
        image = load_image(os.path.join(image_folder, im["file_name"]))
        if resize:
            image = image.resize((resize, resize), Image.Resampling.BILINEAR)
        tensors.append(transform(image))
    return torch.stack(tensors), [[(o["colour"], o["shape"]) for o in im["objects"]] for im in images]


@torch.no_grad()
def pooled_features(extract: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                    batch_size: int = 256) -> torch.Tensor:
    """`extract` (CNNModel.extract, or a ResNet without its fc) over `images` in batches, without gradients."""
    return torch.cat([extract(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def probe_objects(train_features: torch.Tensor, train_objects: Sequence[Sequence[tuple[str, str]]],
                  val_features: torch.Tensor, val_objects: Sequence[Sequence[tuple[str, str]]],
                  steps: int = 500, seed: int = 0) -> float:
    """A linear probe: the share of val images whose objects a linear read of the pooled features names exactly
    (probe_hits, image by image)."""
    hits = probe_hits(train_features, train_objects, val_features, val_objects, steps, seed)
    return sum(hits) / max(1, len(hits))


def probe_hits(train_features: torch.Tensor, train_objects: Sequence[Sequence[Any]],
               val_features: torch.Tensor, val_objects: Sequence[Sequence[Any]],
               steps: int = 500, seed: int = 0) -> list[bool]:
    """For each val image, whether a linear read of its pooled features names its objects exactly.

    A logistic regression from the standardised features to which colour-shape objects an image
    shows is fitted on the training images; on a val image, given how many objects it holds, its
    top-scoring objects must be exactly the true ones. Linear, like the captioner's encoder head, it
    follows what a frozen-backbone captioner names, a little below it: scoring colour-shape pairs, it
    cannot tell which colour goes with which shape in a picture of two. A probe takes seconds where a
    captioner takes minutes, which makes it the quick test of a backbone on a dataset. An object is
    anything hashable: (colour, shape) pairs, or shapes alone to leave colours aside.
    """
    kinds = sorted({o for objects in (*train_objects, *val_objects) for o in objects})
    index = {o: i for i, o in enumerate(kinds)}

    def multi_hot(all_objects):
        target = torch.zeros(len(all_objects), len(kinds))
        for row, objects in enumerate(all_objects):
            for o in objects:
                target[row, index[o]] = 1
        return target

    y, y_val = multi_hot(train_objects), multi_hot(val_objects)
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(train_features.shape[1], len(kinds))
    with torch.no_grad():
        for p in linear.parameters():
            p.uniform_(-0.01, 0.01, generator=generator)
    optimizer = torch.optim.Adam(linear.parameters(), 1e-2, weight_decay=1e-3)
    x = (train_features - mean) / std
    with torch.enable_grad():
        for _ in range(steps):
            loss = nn.functional.binary_cross_entropy_with_logits(linear(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        scores = linear((val_features - mean) / std)
    counts = y_val.sum(1).long()
    return [set(row.topk(int(k)).indices.tolist()) == set(truth.nonzero().flatten().tolist())
            for row, k, truth in zip(scores, counts, y_val)]
