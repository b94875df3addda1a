"""Which part of the image drove each word, for the chapter's CNN+LSTM captioner.

The chapter's decoder sees the image only as one pooled vector, so it has no attention to show.
Two ways recover a map anyway, one per word of a caption (its log-probability given the image
and the words before it):

- occlusion (the default): cover one patch of the image at a time with grey and see how much
  the word's log-probability drops. A pixel's saliency is the mean drop over the patches that
  cover it. It asks the model directly, in about 100 forward passes per image.
- Grad-CAM: the gradient of the word's log-probability with respect to a convolutional feature
  map A, averaged over the map's cells, weights A's channels; their sum, positive part only,
  is the map. One forward pass, then one backward pass per word. It is a linear estimate of a
  non-linear network: on the tiny set it points at the named object far less often than
  occlusion does, and is slower there too (benchmarks/saliency_pointing.py). The map is the
  backbone's last one (7 x 7 at 224 px), or the one before it when the last is coarser than
  4 x 4 (the tiny preset's 56 px images).

Neither needs training-time support: the backbone runs on the image here, frozen or not,
whether the model was trained on cached features or not.
"""
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .config import Config
from .data import eval_transform
from .images import load_image
from .inference import generate
from .model import CNNModel, LSTMModel
from .progress import tqdm
from .vocabulary import END, Vocab


def _split_index(encoder: CNNModel, image: torch.Tensor, min_cells: int = 4) -> int:
    """Where to cut resnet_module: after its last stage whose map is at least min_cells wide."""
    stages = [i for i, m in enumerate(encoder.resnet_module) if type(m).__name__ == "Sequential"]  # layer1..4
    with torch.no_grad():
        x = image[None]
        sizes: dict[int, int] = {}
        for i, module in enumerate(encoder.resnet_module[:-1]):
            x = module(x)
            sizes[i] = x.shape[-1]
    for i in reversed(stages):
        if sizes[i] >= min_cells:
            return i + 1
    return stages[-1] + 1


METHODS = ("occlusion", "gradcam")


def _word_log_probs(encoder: CNNModel, decoder: LSTMModel, images: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """(N, 3, H, W) images, one caption -> (N, T-1): each token's log-probability after <start>."""
    n, length = len(images), len(token_ids)
    captions = torch.tensor([token_ids] * n, device=images.device)
    logits = decoder(encoder(images), captions, [length] * n)                     # packed: (T * N, V), step-major
    log_probs = logits.float().log_softmax(-1).view(length, n, -1)
    ids = torch.tensor(token_ids, device=images.device)
    return log_probs.gather(2, ids[:, None, None].expand(length, n, 1))[1:, :, 0].T


@torch.no_grad()
def occlusion_saliency(encoder: CNNModel, decoder: LSTMModel, image: torch.Tensor, token_ids: list[int],
                       window: int | None = None, stride: int | None = None, batch_size: int = 64) -> torch.Tensor:
    """One occlusion map per token after <start>: (T-1, H, W) in [0, 1].

    A square window (default: 35% of the image's side, about one tiny-set object) slides with
    `stride` (default: a fifth of the window). Each position is filled with the normalisation's
    mean colour, a grey patch: zero after normalisation (Zeiler and Fergus's occlusion test).
    On the tiny set, a window about an object's size points at the named object's box more
    often than smaller windows, or than filling with the image's own background colour.
    """
    encoder.eval(), decoder.eval()
    device = next(decoder.parameters()).device
    image = image.to(device)
    _, h, w = image.shape
    window = window or max(2, round(0.35 * min(h, w)))
    stride = stride or max(1, window // 5)
    tops = list(range(0, h - window + 1, stride))
    lefts = list(range(0, w - window + 1, stride))
    if tops[-1] != h - window:
        tops.append(h - window)
    if lefts[-1] != w - window:
        lefts.append(w - window)
    boxes = [(t, left) for t in tops for left in lefts]
    base = _word_log_probs(encoder, decoder, image[None], token_ids)[0]          # (T-1,)
    total = torch.zeros(len(token_ids) - 1, h, w, device=device)
    cover = torch.zeros(h, w, device=device)
    for j in range(0, len(boxes), batch_size):
        chunk = boxes[j:j + batch_size]
        batch = image[None].repeat(len(chunk), 1, 1, 1)
        for k, (t, left) in enumerate(chunk):
            batch[k, :, t:t + window, left:left + window] = 0
        drops = (base[None] - _word_log_probs(encoder, decoder, batch, token_ids)).clamp(min=0)   # (n, T-1)
        for k, (t, left) in enumerate(chunk):
            total[:, t:t + window, left:left + window] += drops[k][:, None, None]
            cover[t:t + window, left:left + window] += 1
    maps = total / cover.clamp(min=1)
    return (maps / maps.flatten(1).max(1).values.clamp(min=1e-12)[:, None, None]).cpu()


def word_saliency(encoder: CNNModel, decoder: LSTMModel, image: torch.Tensor, token_ids: list[int],
                  method: str = "occlusion", min_cells: int = 4) -> tuple[torch.Tensor, str]:
    """One map per token after <start>: (maps (T-1, H, W) in [0, 1], note).

    image: (3, H, W), normalised as for captioning; token_ids: the caption's ids, <start> first
    (as decoder.greedy / beam_search return them). Each map is scaled to its own maximum; an
    all-zero map means nothing in the image raised that word. `note` says how the maps were made.
    """
    if method == "occlusion":
        maps = occlusion_saliency(encoder, decoder, image, token_ids)
        return maps, f"occlusion, {max(2, round(0.35 * min(image.shape[1:])))} px patches"
    if method != "gradcam":
        raise ValueError(f"saliency method must be one of {METHODS}, got {method!r}")
    maps, cells = gradcam_saliency(encoder, decoder, image, token_ids, min_cells)
    return maps, f"Grad-CAM on a {cells[0]}x{cells[1]} feature map"


def gradcam_saliency(encoder: CNNModel, decoder: LSTMModel, image: torch.Tensor, token_ids: list[int],
                     min_cells: int = 4) -> tuple[torch.Tensor, tuple[int, ...]]:
    """One Grad-CAM map per token after <start>: ((T-1, H, W) in [0, 1], (h, w) of the feature map used)."""
    encoder.eval(), decoder.eval()
    device = next(decoder.parameters()).device
    image = image.to(device)
    cut = _split_index(encoder, image, min_cells)
    with torch.no_grad():
        lower = encoder.resnet_module[:cut](image[None])
    lower.requires_grad_(True)
    with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):  # cuDNN's LSTM backward wants train mode
        upper = encoder.resnet_module[cut:](lower).flatten(1)                     # (1, D): the pooled features
        features = encoder.head(upper)                                            # (1, E)
        captions = torch.tensor([token_ids], device=device)
        logits = decoder(features, captions, [len(token_ids)])                    # (T, V): step t predicts token t
        log_probs = logits.float().log_softmax(-1)
        steps: list[torch.Tensor] = []
        for t in range(1, len(token_ids)):
            (grad,) = torch.autograd.grad(log_probs[t, token_ids[t]], lower, retain_graph=True)
            weights = grad.mean((2, 3), keepdim=True)                            # one per channel
            steps.append(F.relu((weights * lower).sum(1)))                       # (1, h, w)
    maps = torch.cat(steps).detach()                                              # (T-1, h, w)
    cells = tuple(maps.shape[1:])
    peak = maps.flatten(1).max(1).values.clamp(min=1e-12)[:, None, None]
    maps = F.interpolate((maps / peak)[:, None], size=image.shape[1:], mode="bilinear", align_corners=False)[:, 0]
    return maps.clamp(0, 1).cpu(), cells


def crop_box(box: Sequence[float], image_size: tuple[int, int], resize_size: int, crop_size: int) -> list[int]:
    """A box (x0, y0, x1, y1) in an original image of image_size (width, height) -> the same box in
    the pixels of what captioning sees: the image squashed to resize_size, then centre-cropped."""
    (w, h), margin = image_size, (resize_size - crop_size) / 2
    x0, y0, x1, y1 = box
    return [min(crop_size, max(0, round(v))) for v in (x0 * resize_size / w - margin, y0 * resize_size / h - margin,
                                                       x1 * resize_size / w - margin, y1 * resize_size / h - margin)]


def points_at_objects(words: Sequence[str], maps: Sequence[Any], objects: Sequence[Mapping[str, Any]],
                      image_size: tuple[int, int], resize_size: int, crop_size: int) -> list[tuple[str, bool]]:
    """The pointing game on the tiny set: for the first mention of each colour word that names one
    object of the ground truth, is its map denser inside that object's box than inside the other
    objects' boxes? Returns [(word, True/False)]."""
    boxes = [crop_box(o["box"], image_size, resize_size, crop_size) for o in objects]

    def density(heat: Any, box: Sequence[int]) -> float:
        x0, y0, x1, y1 = box
        return float(heat[y0:y1, x0:x1].mean()) if x1 > x0 and y1 > y0 else 0.0

    out: list[tuple[str, bool]] = []
    seen: set[str] = set()
    for word, heat in zip(words, maps):
        owners = [k for k, o in enumerate(objects) if o["colour"] == word]
        if len(owners) != 1 or word in seen:
            continue
        seen.add(word)
        mine = density(heat, boxes[owners[0]])
        out.append((word, all(mine > density(heat, b) for k, b in enumerate(boxes) if k != owners[0])))
    return out


def explain_image(path: str, encoder: CNNModel, decoder: LSTMModel, vocab: Vocab, config: Config, beam_size: int = 1,
                  method: str = "occlusion") -> tuple[torch.Tensor, list[str], torch.Tensor, str]:
    """Caption one image file and explain each word: (image tensor, words, maps, note)."""
    device = next(decoder.parameters()).device
    image = eval_transform(config.resize_size, config.crop_size)(load_image(path))
    ids = generate(encoder, decoder, image[None].to(device), beam_size)[0]
    words = [vocab.i2w[i] for i in ids[1:]]
    maps, note = word_saliency(encoder, decoder, image, ids, method)
    if words and words[-1] == END:                                                # no map for <end>
        words, maps = words[:-1], maps[:-1]
    return image, words, maps, note


def save_explanations(paths: Sequence[str], out_dir: str, encoder: CNNModel, decoder: LSTMModel, vocab: Vocab,
                      config: Config, beam_size: int = 1, method: str = "occlusion") -> list[str]:
    """explain_image + viz.show_saliency for each image, saved as out_dir/<image name>.png; returns the paths."""
    # lazy, all three: matplotlib (viz draws with it), which the CLI's caption, importing this module, needs
    # only with --explain; pyplot once the backend is chosen
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")                                                     # files only: no display needed
    import matplotlib.pyplot as plt

    from .viz import show_saliency

    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []
    for path in tqdm(paths, desc="explaining", unit="img", disable=len(paths) < 4):
        image, words, maps, note = explain_image(path, encoder, decoder, vocab, config, beam_size, method)
        fig = show_saliency(image, words, maps, title=f"{os.path.basename(path)}: {' '.join(words)}  ({note})")
        target = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written
