"""Which part of the image drove each word of a caption: one map per word, for either decoder.

The attention decoder (captioning.attention) says where it looked: before each word it weighs
the cells of the encoder's grid, and those weights, from the very decode that produced the
caption, are the word's map (the Show, Attend and Tell figure). The chapter's decoder sees the
image only as one pooled vector, so it has no attention to show. Two ways recover a map anyway,
one per word (its log-probability given the image and the words before it); both work on the
attention model too, a second opinion on what its attention shows:

- occlusion (the pooled model's default): cover one patch of the image at a time with grey and
  see how much the word's log-probability drops. A pixel's saliency is the mean drop over the
  patches that cover it. It asks the model directly, in about 100 forward passes per image.
- Grad-CAM: the gradient of the word's log-probability with respect to a convolutional feature
  map A, averaged over the map's cells, weights A's channels; their sum, positive part only,
  is the map. One forward pass, then one backward pass per word. It is a linear estimate of a
  non-linear network: on the tiny set it points at the named object far less often than
  occlusion does, and is slower there too (benchmarks/saliency_pointing.py). The map is the
  backbone's last one (7 x 7 at 224 px), or the one before it when the last is coarser than
  4 x 4 (the tiny preset's 56 px images); for the attention model, its grid or a stage before it.

Attention weights show what the decoder read, not what the word depends on: a cell can be read and
matter little, and a cell beside an object can carry it (a deep cell sees far beyond its patch).
The pointing game (`pointing_game`) puts the three to the same test; on the relations world the
attention model's attention peaks on the object a word names about as often as occlusion of the
same model does, about half the time (benchmarks/attention_pointing.py).

None needs training-time support: the backbone runs on the image here, frozen or not,
whether the model was trained on cached features or not.
"""
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .config import Config
from .data import eval_transform
from .decoding import beam_search, greedy_search
from .images import load_image
from .inference import generate
from .model import CNNModel, LSTMModel
from .progress import tqdm
from .vocabulary import END, Vocab

METHODS = ("attention", "occlusion", "gradcam")


def has_attention(decoder: Any) -> bool:
    """Whether the decoder weighs a grid of the image at each word (it has step_weights)."""
    return callable(getattr(decoder, "step_weights", None))


def pick_method(decoder: Any, method: str | None = None) -> str:
    """The method to explain this decoder with: `method`, checked, or by default "attention" where the
    decoder has attention and "occlusion" where it has not."""
    if method is None:
        return "attention" if has_attention(decoder) else "occlusion"
    if method not in METHODS:
        raise ValueError(f"saliency method must be one of {METHODS}, got {method!r}")
    if method == "attention" and not has_attention(decoder):
        raise ValueError(f"saliency method 'attention' needs a decoder with attention: this {type(decoder).__name__} "
                         f"reads one pooled vector per image, so it has no attention to show; "
                         f"use occlusion or gradcam")
    return method


def _split_index(encoder: CNNModel, image: torch.Tensor, min_cells: int = 4) -> int:
    """Where to cut resnet_module for Grad-CAM: after its last stage whose map is at least min_cells wide.

    The pooled encoder's module ends with the average pool, the grid encoder's with its last stage,
    which may then be the map itself (the cut falls at the end)."""
    stages = [i for i, m in enumerate(encoder.resnet_module) if type(m).__name__ == "Sequential"]  # layer1..4
    with torch.no_grad():
        x = image[None]
        sizes: dict[int, int] = {}
        for i, module in enumerate(encoder.resnet_module):
            x = module(x)
            sizes[i] = x.shape[-1]
    for i in reversed(stages):
        if sizes[i] >= min_cells:
            return i + 1
    return stages[-1] + 1


def _is_grid(encoder: CNNModel) -> bool:
    return getattr(encoder, "feature_kind", "pooled") == "grid"


def _word_log_probs(encoder: CNNModel, decoder: LSTMModel, images: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """(N, 3, H, W) images, one caption -> (N, T-1): each token's log-probability after <start>.

    Either decoder: its forward takes what its encoder gives, (N, E) or (N, P, E)."""
    n, length = len(images), len(token_ids)
    captions = torch.tensor([token_ids] * n, device=images.device)
    logits = decoder(encoder(images), captions, [length] * n)                     # packed: (T * N, V), step-major
    log_probs = logits.float().log_softmax(-1).view(length, n, -1)
    ids = torch.tensor(token_ids, device=images.device)
    return log_probs.gather(2, ids[:, None, None].expand(length, n, 1))[1:, :, 0].T


def _scale_to_peak(maps: torch.Tensor) -> torch.Tensor:
    """(T, H, W) non-negative maps -> each divided by its own maximum, in [0, 1] (an all-zero map stays zero)."""
    return maps / maps.flatten(1).max(1).values.clamp(min=1e-12)[:, None, None]


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
    return _scale_to_peak(total / cover.clamp(min=1)).cpu()


def attention_maps(weights: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(T, P) attention weights over an h x w grid, cells in reading order -> (T, H, W): each row laid
    out on the grid and upsampled bilinearly to the image's pixels. Not rescaled, so that what the
    decoder weighed is what the map shows; explain_image scales each map to its peak for drawing."""
    h, w = grid
    if weights.shape[-1] != h * w:
        raise ValueError(f"{weights.shape[-1]} attention weights per word do not fill a {h}x{w} grid")
    cells = weights.detach().float().reshape(-1, 1, h, w)
    return F.interpolate(cells, size=size, mode="bilinear", align_corners=False)[:, 0].cpu()


def _grid_features(encoder: CNNModel, decoder: LSTMModel, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """A (3, H, W) image -> (its (1, P, E) cell embeddings, the grid's (h, w)), from one backbone pass."""
    pick_method(decoder, "attention")
    encoder.eval(), decoder.eval()
    grid_map = encoder.extract(image[None].to(next(decoder.parameters()).device))   # (1, D, h, w)
    h, w = grid_map.shape[-2:]
    return encoder.head(grid_map), (h, w)


@torch.no_grad()
def decode_with_attention(encoder: CNNModel, decoder: LSTMModel, image: torch.Tensor, beam_size: int = 1
                          ) -> tuple[list[int], torch.Tensor, tuple[int, int]]:
    """Caption one (3, H, W) image and keep where the decoder looked: (ids, weights (len(ids), P), grid (h, w)).

    Greedy, or beam search with return_weights: the weights are those of the decode that produced
    the ids, row t the attention that produced token t (row 0: <start>)."""
    features, grid = _grid_features(encoder, decoder, image)
    if beam_size > 1:
        ids, weights = beam_search(decoder, features, beam_size, return_weights=True)
    else:
        ids, weights = greedy_search(decoder, features, return_weights=True)
    assert weights[0] is not None                       # a decoder with step_weights always gives them
    return ids[0], weights[0].cpu(), grid


@torch.no_grad()
def replay_attention(encoder: CNNModel, decoder: Any, image: torch.Tensor, token_ids: list[int]
                     ) -> tuple[torch.Tensor, tuple[int, int]]:
    """The attention weights behind a given caption: (weights (len(token_ids), P), grid (h, w)); decoder:
    one with step_weights (captioning.attention.AttentionDecoder).

    The decoder steps through token_ids as if it had chosen them, so for the ids of its own decode
    these are that decode's weights; for any other caption, where it would have looked."""
    features, grid = _grid_features(encoder, decoder, image)
    _, state = decoder.init_state(features)
    rows = [decoder.step_weights(state)]
    for token in token_ids[:-1]:
        _, state = decoder.step(torch.tensor([token], device=features.device), state)
        rows.append(decoder.step_weights(state))
    return torch.cat(rows).cpu(), grid


def _attention_explanation(weights: torch.Tensor, grid: tuple[int, int], image: torch.Tensor
                           ) -> tuple[torch.Tensor, str]:
    """Weights (T, P) of a caption's tokens, <start> first -> (maps (T-1, H, W) in [0, 1], note)."""
    maps = attention_maps(weights[1:], grid, (image.shape[1], image.shape[2]))
    return _scale_to_peak(maps), f"attention over a {grid[0]}x{grid[1]} grid"


def word_saliency(encoder: CNNModel, decoder: LSTMModel, image: torch.Tensor, token_ids: list[int],
                  method: str | None = None, min_cells: int = 4) -> tuple[torch.Tensor, str]:
    """One map per token after <start>: (maps (T-1, H, W) in [0, 1], note).

    image: (3, H, W), normalised as for captioning; token_ids: the caption's ids, <start> first
    (as decoder.greedy / beam_search return them). method None: attention where the decoder has
    it, occlusion otherwise (pick_method). Each map is scaled to its own maximum; an all-zero map
    means nothing in the image raised that word. `note` says how the maps were made.
    """
    method = pick_method(decoder, method)
    if method == "attention":
        return _attention_explanation(*replay_attention(encoder, decoder, image, token_ids), image)
    if method == "occlusion":
        maps = occlusion_saliency(encoder, decoder, image, token_ids)
        return maps, f"occlusion, {max(2, round(0.35 * min(image.shape[1:])))} px patches"
    maps, cells = gradcam_saliency(encoder, decoder, image, token_ids, min_cells)
    return maps, f"Grad-CAM on a {cells[0]}x{cells[1]} feature map"


def gradcam_saliency(encoder: CNNModel, decoder: LSTMModel, image: torch.Tensor, token_ids: list[int],
                     min_cells: int = 4) -> tuple[torch.Tensor, tuple[int, ...]]:
    """One Grad-CAM map per token after <start>: ((T-1, H, W) in [0, 1], (h, w) of the feature map used).

    The grid encoder's head takes the map itself, the pooled one's the map pooled by the rest of
    the backbone."""
    encoder.eval(), decoder.eval()
    device = next(decoder.parameters()).device
    image = image.to(device)
    cut = _split_index(encoder, image, min_cells)
    with torch.no_grad():
        lower = encoder.resnet_module[:cut](image[None])
    lower.requires_grad_(True)
    with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):  # cuDNN's LSTM backward wants train mode
        upper = encoder.resnet_module[cut:](lower)                                # the grid, or (1, D, 1, 1) pooled
        features = encoder.head(upper if _is_grid(encoder) else upper.flatten(1))  # (1, P, E) or (1, E)
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
    maps = F.interpolate(_scale_to_peak(maps)[:, None], size=image.shape[1:], mode="bilinear", align_corners=False)
    return maps[:, 0].clamp(0, 1).cpu(), cells


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
    objects' boxes? Returns [(word, True/False)]. (benchmarks/saliency_pointing.py; pointing_game
    is the stricter game that judges every method and decoder alike.)"""
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


def named_objects(words: Sequence[str], objects: Sequence[Mapping[str, Any]], colours: Iterable[str],
                  shapes: Iterable[str]) -> list[tuple[int, int]]:
    """The objects a caption names rightly: [(index of the colour word, index of the object)], first mention
    only. A name is a colour word directly followed by a shape word, and it is right when exactly one
    true object has that colour and that shape ("a red circle" where two objects are red circles names
    neither; "a red square" where the red object is a circle names nothing)."""
    colour_words, shape_words = {c.lower() for c in colours}, {s.lower() for s in shapes}
    lowered = [w.lower() for w in words]
    out: list[tuple[int, int]] = []
    seen: set[tuple[str, str]] = set()
    for i, (colour, shape) in enumerate(zip(lowered, lowered[1:])):
        if colour not in colour_words or shape not in shape_words or (colour, shape) in seen:
            continue
        seen.add((colour, shape))
        owners = [k for k, o in enumerate(objects) if (o["colour"].lower(), o["shape"].lower()) == (colour, shape)]
        if len(owners) == 1:
            out.append((i, owners[0]))
    return out


def _peak_in(heat: torch.Tensor, box: Sequence[int]) -> bool:
    """Whether the (H, W) map's highest pixel lies in box (x0, y0, x1, y1), end exclusive; a flat map
    (nothing raised the word) points nowhere."""
    if float(heat.max()) <= float(heat.min()):
        return False
    row, col = divmod(int(heat.argmax()), heat.shape[1])
    x0, y0, x1, y1 = box
    return x0 <= col < x1 and y0 <= row < y1


def pointing_game(words: Sequence[str], maps: Sequence[Any], objects: Sequence[Mapping[str, Any]],
                  colours: Iterable[str], shapes: Iterable[str], image_size: tuple[int, int], resize_size: int,
                  crop_size: int) -> list[tuple[str, bool]]:
    """The pointing game, the same for every method and decoder: for each object the caption names
    rightly (named_objects), does the peak of its colour word's map plus its shape word's map lie
    inside the object's box (crop_box)? Returns [("red circle", hit)].

    words and maps: one map (H, W) per word, as explain_image gives them; objects: the truth
    ({"colour", "shape", "box"} in the original image's pixels), colours and shapes: the data's words
    for them. An object the crop cuts away entirely is not judged."""
    out: list[tuple[str, bool]] = []
    for i, k in named_objects(words, objects, colours, shapes):
        box = crop_box(objects[k]["box"], image_size, resize_size, crop_size)
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        heat = torch.as_tensor(maps[i]).float() + torch.as_tensor(maps[i + 1]).float()
        out.append((f"{words[i].lower()} {words[i + 1].lower()}", _peak_in(heat, box)))
    return out


def explain_image(path: str, encoder: CNNModel, decoder: LSTMModel, vocab: Vocab, config: Config, beam_size: int = 1,
                  method: str | None = None) -> tuple[torch.Tensor, list[str], torch.Tensor, str]:
    """Caption one image file and explain each word: (image tensor, words, maps (len(words), H, W) in [0, 1], note).

    method None: attention for a decoder with attention, occlusion otherwise (pick_method). The
    attention maps are the weights of the decode that produced the caption; the other methods
    caption the image first, then ask the model about those words."""
    method = pick_method(decoder, method)
    device = next(decoder.parameters()).device
    image = eval_transform(config.resize_size, config.crop_size)(load_image(path))
    if method == "attention":
        ids, weights, grid = decode_with_attention(encoder, decoder, image, beam_size)
        maps, note = _attention_explanation(weights, grid, image)
    else:
        ids = generate(encoder, decoder, image[None].to(device), beam_size)[0]
        maps, note = word_saliency(encoder, decoder, image, ids, method)
    words = [vocab.i2w[i] for i in ids[1:]]
    if words and words[-1] == END:                                                # no map for <end>
        words, maps = words[:-1], maps[:-1]
    return image, words, maps, note


def save_explanations(paths: Sequence[str], out_dir: str, encoder: CNNModel, decoder: LSTMModel, vocab: Vocab,
                      config: Config, beam_size: int = 1, method: str | None = None) -> list[str]:
    """explain_image + viz.show_saliency for each image, saved as out_dir/<image name>.png; returns the paths.

    Attention maps are drawn as Show, Attend and Tell drew them, the image lit where the decoder
    looked; the others as heat maps, which say how strongly a region raised the word."""
    # lazy, all three: matplotlib (viz draws with it), which the CLI's caption, importing this module, needs
    # only with --explain; pyplot once the backend is chosen
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")                                                     # files only: no display needed
    import matplotlib.pyplot as plt

    from .viz import show_saliency

    method = pick_method(decoder, method)                                         # before any work: a clear error
    style = "attention" if method == "attention" else "heat"
    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []
    for path in tqdm(paths, desc="explaining", unit="img", disable=len(paths) < 4):
        image, words, maps, note = explain_image(path, encoder, decoder, vocab, config, beam_size, method)
        fig = show_saliency(image, words, maps, title=f"{os.path.basename(path)}: {' '.join(words)}  ({note})",
                            style=style)
        target = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written
