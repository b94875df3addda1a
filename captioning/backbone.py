"""The encoder's ResNet: which weights it starts from, and how a frozen one is prepared.

- `build_resnet(name, weights)`: torchvision's weights API ("DEFAULT", an enum name, None) or a
  local `.pth` file, whatever its classifier size (the `fc` layer is dropped by CNNModel anyway).
- `calibrate_batchnorm`: BatchNorm statistics estimated from images, for a frozen random ResNet.
- `fold_batchnorm`: a frozen ResNet with its BatchNorms folded into the convolutions, for extraction.

`weights="standin"` (the tiny preset's) names the stand-in for ImageNet that `captioning.standin`
pretrains and saves as an ordinary weights file.
"""
import contextlib
import copy
import os
import sys
from collections.abc import Iterable
from typing import TypeVar

import torch
import torch.nn as nn
import torchvision.models as models
from torchvision.models import WeightsEnum

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
STANDIN = "standin"      # Config.weights value: pretrain (once) and use the stand-in backbone

_M = TypeVar("_M", bound=nn.Module)


# ---- weights ---------------------------------------------------------------------------------

def resolve_weights(backbone: str, weights: str | WeightsEnum | None) -> str | WeightsEnum | None:
    """`weights` as given by a user -> a torchvision weights enum, None, or a local file path."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {BACKBONES}")
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        return None
    if weights == STANDIN:
        raise ValueError("weights='standin' is resolved by captioning.standin.ensure_standin(config) "
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


def weights_id(weights: str | WeightsEnum | None) -> str | None:
    """A string that names the weights (stored in checkpoints and feature-cache keys)."""
    if weights is None or isinstance(weights, str):
        return weights
    return f"{type(weights).__name__}.{weights.name}"


def _load_state_dict(weights: str | WeightsEnum) -> dict[str, torch.Tensor]:
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


def build_resnet(backbone: str, weights: str | WeightsEnum | None) -> models.ResNet:
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


def fold_batchnorm(module: _M) -> _M:
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
def calibrate_batchnorm(module: nn.Module, batches: Iterable[torch.Tensor]) -> None:
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
