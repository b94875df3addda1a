"""The encoder's ResNet: which weights it starts from, and the tiny preset's stand-in for ImageNet.

- `build_resnet(name, weights)`: torchvision's weights API ("DEFAULT", an enum name, None) or a
  local `.pth` file, whatever its classifier size (the `fc` layer is dropped by CNNModel anyway).
- `calibrate_batchnorm`: BatchNorm statistics estimated from images, for a frozen random ResNet.
- `fold_batchnorm`: a frozen ResNet with its BatchNorms folded into the convolutions, for extraction.
- `ensure_standin(config)`: the tiny preset's pretrained backbone. On COCO the chapter's frozen
  encoder works because ImageNet taught it to see; the tiny world has no ImageNet, so this
  module makes one: a ResNet trained from scratch (`standin_steps`, small images first) to say
  which shapes of which colours are where, on random synthetic scenes (eleven shapes, any colour,
  any background, one to three objects), then saved as an ordinary weights file under
  `models_dir/pretrained/` and loaded through the same `weights=<path>` route as a user's own
  ImageNet file.
"""
import colorsys
import contextlib
import copy
import json
import math
import os
import random
import sys

import torch
import torch.nn as nn
import torchvision.models as models

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
STANDIN = "standin"      # Config.weights value: pretrain (once) and use the stand-in backbone


# ---- weights ---------------------------------------------------------------------------------

def resolve_weights(backbone, weights):
    """`weights` as given by a user -> a torchvision weights enum, None, or a local file path."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {BACKBONES}")
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        return None
    if weights == STANDIN:
        raise ValueError("weights='standin' is resolved by captioning.backbone.ensure_standin(config) "
                         "into a weights file first")
    if isinstance(weights, str) and (os.sep in weights or weights.endswith((".pth", ".pt"))):
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"local weights file not found: {weights}")
        return weights
    enum = models.get_model_weights(backbone)
    if isinstance(weights, enum):
        return weights
    name = str(weights).split(".")[-1]  # "ResNet152_Weights.IMAGENET1K_V2" or "IMAGENET1K_V2"
    try:
        return enum[name]
    except KeyError:
        raise ValueError(f"unknown weights {weights!r} for {backbone}; choose from "
                         f"{['DEFAULT', *enum.__members__]}, {STANDIN!r}, None, or a .pth file") from None


def weights_id(weights):
    """A string that names the weights (stored in checkpoints and feature-cache keys)."""
    if weights is None or isinstance(weights, str):
        return weights
    return f"{type(weights).__name__}.{weights.name}"


def _load_state_dict(weights):
    if isinstance(weights, str):
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # a text file, a truncated download, a pickle of other objects
            reason = (str(e).strip().splitlines() or [""])[0][:160]
            raise ValueError(f"{weights} is not a weights file torch.load can read ({type(e).__name__}: "
                             f"{reason})") from e
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{weights} does not hold a state_dict of tensors")
        return state
    try:
        # torch.hub prints "Downloading: ..." to stdout: to stderr with it, where it cannot mix with
        # the results a command prints (caption --json)
        with contextlib.redirect_stdout(sys.stderr):
            return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # offline, proxy, disk full...
        file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise RuntimeError(
            f"could not download {weights_id(weights)} from {weights.url} ({type(e).__name__}: {e}). "
            f"Download it elsewhere and place it at {file}, or pass weights='/path/to/file.pth'.") from e


def build_resnet(backbone, weights):
    """A torchvision ResNet with `weights` (resolved by resolve_weights) loaded, its fc layer random.

    With weights the network is built on the meta device and given the loaded tensors, instead
    of being randomly initialised first and then overwritten. The file's classifier (`fc.*`) is
    skipped: a 1000-class ImageNet file and the stand-in's own head both load.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {BACKBONES}")
    if weights is None:
        return getattr(models, backbone)(weights=None)
    state = {k.removeprefix("module."): v.float() if v.is_floating_point() else v
             for k, v in _load_state_dict(weights).items() if not k.removeprefix("module.").startswith("fc.")}
    with torch.device("meta"):
        resnet = getattr(models, backbone)(weights=None)
    resnet.fc = nn.Linear(resnet.fc.in_features, resnet.fc.out_features)  # real tensors, never read
    missing, unexpected = resnet.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        where = weights if isinstance(weights, str) else weights_id(weights)
        raise ValueError(f"{where} does not fit a {backbone}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return resnet


def fold_batchnorm(module):
    """A copy of a frozen network with every BatchNorm2d folded into the convolution before it.

    In eval mode a BatchNorm is a fixed per-channel scale and shift, which the convolution's
    weights and bias can absorb: the copy computes the same features (up to float rounding) with
    one pass over each activation instead of two. The feature cache extracts with it. A
    convolution and a BatchNorm are folded when they are consecutive children of one module, as
    in torchvision's ResNets (conv1/bn1, conv2/bn2, conv3/bn3, downsample). The original module is
    left as it is; one in training mode is refused, since its BatchNorm is not yet fixed.
    """
    if module.training:
        raise ValueError("fold_batchnorm needs a module in eval mode (fixed BatchNorm statistics)")
    folded = copy.deepcopy(module)
    for parent in folded.modules():
        names = list(parent._modules)
        for conv_name, bn_name in zip(names, names[1:]):
            conv, bn = parent._modules[conv_name], parent._modules[bn_name]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                parent._modules[conv_name] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                parent._modules[bn_name] = nn.Identity()
    return folded.requires_grad_(False)


@torch.no_grad()
def calibrate_batchnorm(module, batches):
    """Reset every BatchNorm in `module` and re-estimate its statistics as a cumulative average over batches.

    A randomly initialised ResNet has running mean 0 and variance 1 everywhere, so frozen in eval
    mode it does not normalise at all. Estimated statistics make its features carry the image.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                                      # cumulative moving average
    module.train()
    for images in batches:
        module(images)
    for m in norms:
        m.momentum = 0.1


# ---- the stand-in pretraining: synthetic scenes ------------------------------------------------

MAX_OBJECTS = 3
ORDER_SLOTS = 2 * MAX_OBJECTS  # the objects from left to right, then from top to bottom
OBJECT_COUNTS = (1, 1, 2, 2, 2, 3)   # drawn uniformly: one scene in three has a single object
RADIUS = (0.15, 0.23)              # an object's radius, as a fraction of the image's shorter side
ROTATION = 20                      # polygons are turned by up to this many degrees either way
ASPECT = (0.75, 1.8)               # width / height before the squash to a square, as photos and the tiny set


def _random_colour(rng):
    """Any colour: a grey in one draw of eight, else a random hue at a random saturation and value."""
    if rng.random() < 0.125:
        return (rng.random(),) * 3
    return colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))


def _background(rng, width, height):
    """A light, dark or random solid background, sometimes a two-colour gradient."""
    from PIL import Image

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


def synthetic_scene(rng, shapes, resize_size, crop_size):
    """One random scene, squashed to resize_size and cropped to crop_size like a training image.

    Returns (PIL image, objects): objects are (shape index, colour (r, g, b) in 0..1, centre x, centre y),
    with the centre in the crop's coordinates (0..1).
    """
    from PIL import ImageDraw, ImageFilter

    from .tinyset import draw_shape

    width = rng.randint(64, 140)
    height = max(48, round(width / rng.uniform(*ASPECT)))
    image, background = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    count = rng.choice(OBJECT_COUNTS)
    radius = rng.uniform(*RADIUS) * min(width, height)
    objects, tries = [], 0
    while len(objects) < count and tries < 40:
        tries += 1
        r = radius * rng.uniform(0.85, 1.15)
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


def scene_targets(objects, n_shapes, min_gap=0.08):
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


def scene_batch(rng, n, shapes, resize_size, crop_size):
    """n scenes as normalised (n, 3, crop, crop) images and their stacked targets."""
    from .data import _to_normalized_tensor

    images, targets = [], []
    for _ in range(n):
        image, objects = synthetic_scene(rng, shapes, resize_size, crop_size)
        images.append(_to_normalized_tensor(image))
        targets.append(scene_targets(objects, len(shapes)))
    return (torch.stack(images), *(torch.stack(t) for t in zip(*targets)))


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


def standin_loss(outputs, shape, colour, mask, present):
    shape_logits, colour_pred, present_logits = outputs
    shape_loss = nn.functional.cross_entropy(shape_logits.flatten(0, 1), shape.flatten())
    colour_loss = ((colour_pred - colour) ** 2).sum(-1).mul(mask).sum() / mask.sum().clamp(min=1)
    present_loss = nn.functional.binary_cross_entropy_with_logits(present_logits, present)
    return shape_loss + 5 * colour_loss + present_loss


@torch.no_grad()
def standin_accuracy(resnet, head, heldout):
    """(shape accuracy over the objects of the held-out scenes, mean colour error in RGB 0..1)."""
    images, shape, colour, mask, _ = heldout
    was_training = resnet.training
    resnet.eval()
    shape_logits, colour_pred, _ = head(resnet(images))
    resnet.train(was_training)
    objects = mask.bool()
    accuracy = (shape_logits.argmax(-1) == shape)[objects].float().mean().item()
    error = (colour_pred - colour).norm(dim=-1)[objects].mean().item()
    return accuracy, error


def resolution_schedule(steps, resize_size, crop_size, batch_size, low_share=3 / 7, low_batch=2):
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
                     seed=0, progress=True, low_share=3 / 7, low_batch=2):
    """Train a ResNet from scratch on synthetic scenes; returns (state_dict without fc, report dict).

    Deterministic for a seed: the scenes come from random.Random(seed), the initialisation and
    the order of the work from torch's generator seeded the same way. The report holds the
    held-out accuracy on scenes drawn from another seed, never from a captioning set.
    """
    from .progress import tqdm
    from .tinyset import DRAWABLE_SHAPES

    shapes = DRAWABLE_SHAPES
    torch.manual_seed(seed)
    rng = random.Random(seed)
    resnet = getattr(models, backbone)(weights=None)
    feature_size = resnet.fc.in_features
    resnet.fc = nn.Identity()
    head = StandinHead(feature_size, len(shapes))
    resnet.to(memory_format=torch.channels_last)
    params = list(resnet.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr, weight_decay=1e-4)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.15)
    schedule = resolution_schedule(steps, resize_size, crop_size, batch_size, low_share, low_batch)
    heldout = scene_batch(random.Random(seed + 1_000_003), 512, shapes, resize_size, crop_size)
    resnet.train()
    with tqdm(total=steps, desc=f"pretraining the stand-in {backbone}", unit="step", disable=not progress) as bar:
        for phase_steps, phase_resize, phase_crop, phase_batch in schedule:
            for _ in range(phase_steps):
                images, *targets = scene_batch(rng, phase_batch, shapes, phase_resize, phase_crop)
                loss = standin_loss(head(resnet(images.contiguous(memory_format=torch.channels_last))), *targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                one_cycle.step()
                bar.update()
                if bar.n % 10 == 0:
                    bar.set_postfix(size=phase_crop, loss=f"{loss.item():.3f}")
    accuracy, error = standin_accuracy(resnet, head, heldout)
    state = {k: v.contiguous() for k, v in resnet.state_dict().items()}
    report = {"backbone": backbone, "resize_size": resize_size, "crop_size": crop_size, "steps": steps,
              "schedule": schedule, "batch_size": batch_size, "lr": lr,
              "seed": seed, "shapes": list(shapes), "heldout_scenes": len(heldout[0]),
              "heldout_shape_accuracy": round(accuracy, 4), "heldout_colour_error": round(error, 4)}
    return state, report


def standin_path(config):
    """Where the stand-in for this backbone and image size lives: beside the run folders, shared by them."""
    folder = os.path.join(os.path.dirname(os.path.abspath(config.models_dir)), "pretrained")
    name = (f"standin-{config.backbone}-{config.resize_size}to{config.crop_size}px-"
            f"{config.standin_steps}steps-seed{config.standin_seed}.pth")
    return os.path.join(folder, name)


def ensure_standin(config, log=print):
    """The stand-in's weights file for `config`, pretrained and saved first if it is not on disk yet.

    Pretraining holds a lock (`<weights>.lock`): a second run wanting the same stand-in waits for the
    first, then uses the file it saved instead of pretraining it again."""
    from .atomic import atomic_write
    from .derived import build_lock

    path = standin_path(config)
    if os.path.isfile(path):
        return path
    with build_lock(path, "the stand-in backbone", log):
        if os.path.isfile(path):                    # built by the process we waited for
            log(f"using the stand-in backbone another process just pretrained: {path}")
            return path
        log(f"pretraining the stand-in backbone ({config.backbone}, {config.standin_steps} steps on synthetic "
            f"scenes); it is saved to {path} and reused")
        state, report = pretrain_standin(config.backbone, config.resize_size, config.crop_size,
                                         config.standin_steps, seed=config.standin_seed, progress=config.progress)
        log(f"stand-in backbone: held-out shape accuracy {report['heldout_shape_accuracy']:.1%}, "
            f"colour error {report['heldout_colour_error']:.3f} (RGB, 0..1), on {report['heldout_scenes']} "
            f"scenes it never saw")
        with atomic_write(path + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with atomic_write(path) as f:
            torch.save(state, f)
    return path
