"""Matplotlib helpers for the notebooks: the model's diagram, image grids with captions, length histogram,
training curves."""
import inspect
import math
import os
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
from PIL import Image

from .images import load_image

# viz imports no torch: notebooks 01 and 03 draw with it and never load torch (2 s). The functions
# that take tensors import it (or the modules that do) when they run.
if TYPE_CHECKING:          # for the annotations only
    import torch


def denormalize(tensor: "torch.Tensor") -> np.ndarray:
    """A normalised (3, H, W) image tensor -> an (H, W, 3) array in [0, 1] for imshow."""
    from .data import IMAGENET_MEAN, IMAGENET_STD  # lazy: torch (see the note at the top)

    image = tensor.detach().float().cpu().numpy().transpose(1, 2, 0)
    return np.clip(image * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN), 0, 1)


RIGHT, WRONG = "#1a7f37", "#cf222e"          # caption colours where the truth is known


def _caption_lines(caption: str | Sequence[str], colour: str | Sequence[str], wrap: int) -> list[tuple[str, str]]:
    """One caption (a string, or a list of strings) -> [(line, colour)]. Each string is a block: its
    own lines (split at "\\n") are kept apart and each is wrapped to `wrap` characters."""
    parts = [caption] if isinstance(caption, str) else list(caption)
    colours = colour if isinstance(colour, (list, tuple)) else [colour] * len(parts)
    return [(line, c) for part, c in zip(parts, colours) for text in str(part).split("\n")
            for line in (textwrap.wrap(text, wrap) or [""])]


def original_size(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(width, height) of the original of an image in a `resized_images/<split>/` folder (the
    data layout: `<data>/<split>/<name>` beside `<data>/resized_images/<split>/<name>`), or None
    for any other path or when the original is not there."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    resized, split = os.path.split(folder)
    if os.path.basename(resized) != "resized_images":
        return None
    original = os.path.join(os.path.dirname(resized), split, name)
    if not os.path.isfile(original):
        return None
    with Image.open(original) as image:
        return image.size


CHAR_WIDTH = 0.6           # a caption character's mean width, in ems of its font (DejaVu Sans, with some room)


def show_images(images: Sequence[Any], captions: Sequence[str | Sequence[str]], ncols: int = 4, width: float = 3.2,
                wrap: int | None = None, colours: Sequence[str | Sequence[str]] | None = None, fontsize: float = 12,
                proportions: str = "original") -> Figure:
    """A grid of images (paths, PIL images, arrays or normalised tensors), each with its caption below.

    A caption is a string or a list of strings (one block each; a "\\n" in a string starts a new
    line); `colours` gives each image's colour, or one colour per block (for example green where a
    caption is right, red where wrong). Captions are wrapped to the image's `width` (in inches) at
    `fontsize` points, unless `wrap` (characters) says otherwise. Each row is given the height of its
    tallest image and its longest caption, so no caption runs into the next row.

    Images are drawn with square pixels, so a circle stays round. A path into a `resized_images/`
    folder (squashed to a square by notebook 03) is drawn at its original's proportions, as the
    picture was taken, unless `proportions="pixels"` (what the CNN is given, squashed).
    """
    if proportions not in ("original", "pixels"):
        raise ValueError(f"proportions must be 'original' or 'pixels', got {proportions!r}")
    wrap = wrap or max(8, int(width * 72 / (CHAR_WIDTH * fontsize)))
    colours = colours or ["black"] * len(images)
    blocks = [_caption_lines(c, k, wrap) for c, k in zip(captions, colours)]
    pictures, shapes = [], []                                         # shapes: (width, height) as drawn
    for image in images:
        shown = original_size(image) if proportions == "original" and isinstance(image, (str, os.PathLike)) else None
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        elif hasattr(image, "detach"):
            image = denormalize(image)
        array = np.asarray(image)
        pictures.append(array)
        shapes.append(shown or (array.shape[1], array.shape[0]))

    line_h = fontsize * 1.3 / 72                                      # inches per text line
    margin, gap, row_gap = 0.05, 0.15, 0.2                            # inches
    rows = [range(k, min(k + ncols, len(pictures))) for k in range(0, max(len(pictures), 1), ncols)]
    image_h = [max((width * shapes[i][1] / shapes[i][0] for i in row), default=width) for row in rows]
    text_h = [max((len(blocks[i]) for i in row), default=0) * line_h + 0.1 for row in rows]
    fig_w = 2 * margin + ncols * width + (ncols - 1) * gap
    fig_h = margin + sum(image_h) + sum(text_h) + row_gap * (len(rows) - 1)
    fig = plt.figure(figsize=(fig_w, fig_h))
    top = fig_h - margin
    for row, h, t in zip(rows, image_h, text_h):
        for col, i in enumerate(row):
            x = margin + col * (width + gap)
            ax = fig.add_axes((x / fig_w, (top - h) / fig_h, width / fig_w, h / fig_h), anchor="SW")
            ax.axis("off")
            picture, (w_shown, h_shown) = pictures[i], shapes[i]
            # data aspect: pixel height / pixel width on screen, so the picture shows at w_shown:h_shown
            aspect = picture.shape[1] * h_shown / (picture.shape[0] * w_shown)
            ax.imshow(picture, aspect=aspect, interpolation="antialiased")
            for k, (line, colour) in enumerate(blocks[i]):
                ax.annotate(line, xy=(0, 0), xycoords="axes fraction", xytext=(0, -4 - k * fontsize * 1.3),
                            textcoords="offset points", va="top", ha="left", fontsize=fontsize, color=colour)
        top -= h + t + row_gap
    return fig


def show_scored(result: Mapping[str, Any], image_ids: Sequence[int], metric: str = "CIDEr", ncols: int = 4) -> Figure:
    """Images from an evaluate_checkpoint() result: score, the model's caption (green if it names the
    right objects, red if not, where the truth is known) and one human reference."""
    semantic = (result.get("semantic") or {}).get("per_image", {})
    captions, colours = [], []
    for i in image_ids:
        captions.append([f"{metric} {result['per_image'][i][metric]:.2f}", f"model: {result['predictions'][i]}",
                         f"human: {result['references'][i][0]}"])
        right = semantic.get(i, {}).get("objects")
        colours.append(["black", "black" if right is None else RIGHT if right else WRONG, "dimgray"])
    return show_images([result["paths"][i] for i in image_ids], captions, ncols=ncols, colours=colours)


def show_saliency(image: Any, words: Sequence[str], maps: Iterable[Any], width: float = 1.6, per_row: int = 8,
                  title: str | None = None, style: str = "heat") -> Figure:
    """A strip: the image, then one map per word (saliency.explain_image), the word above its panel.

    style "heat": a heat map over a faded copy of the image, clear where the map is 0 (how strongly
    each region raised the word). style "attention": the Show, Attend and Tell figure, the image lit
    where the map is high and dimmed elsewhere, so that what the decoder looked at keeps its colours.
    """
    if style not in ("heat", "attention"):
        raise ValueError(f"style must be 'heat' or 'attention', got {style!r}")
    picture = denormalize(image) if hasattr(image, "detach") else np.asarray(image)
    n = len(words) + 1
    ncols = min(n, per_row)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, (width + 0.3) * nrows + (0.3 if title else 0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(picture)
    axes.flat[0].set_title("image", fontsize=9)
    for ax, word, heat in zip(axes.flat[1:], words, maps):
        heat = np.clip(np.asarray(heat, dtype=np.float32), 0, 1)
        if style == "attention":
            ax.imshow(picture * (0.15 + 0.85 * heat[..., None]))                # lit where it looked
        else:
            ax.imshow(picture * 0.5 + 0.5 * picture.mean(-1, keepdims=True))   # faded: the map stands out
            ax.imshow(heat, cmap="inferno", alpha=heat * 0.85, vmin=0, vmax=1)  # clear where 0
        ax.set_title(word, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_length_histogram(lengths: Sequence[int] | np.ndarray, max_seq_len: int = 20) -> Figure:
    """Histogram of caption lengths in tokens (with <start> and <end>), the max_seq_len cut marked.

    The title says how many captions get truncated; the captions exactly max_seq_len long, which
    fit whole, are labelled, so a tall bar at the limit is not mistaken for cut captions.
    """
    lengths = np.asarray(lengths) + 2
    fig, ax = plt.subplots(figsize=(8, 3.4))
    edges = np.arange(lengths.min(), max(lengths.max(), max_seq_len) + 2) - 0.5
    # ignore: matplotlib's stubs want a Sequence for bins, where its docs (and it) take an array
    _, _, bars = ax.hist(lengths, bins=edges, color="tab:blue")  # type: ignore[arg-type]
    ax.axvline(max_seq_len + 0.5, color="tab:red", linestyle="--", label=f"max_seq_len = {max_seq_len}")
    cut, at_limit = int((lengths > max_seq_len).sum()), int((lengths == max_seq_len).sum())
    if cut:
        title = f"{len(lengths)} captions; {cut} ({cut / len(lengths):.2%}) are longer than max_seq_len: truncated"
    else:
        title = f"{len(lengths)} captions; none is longer than max_seq_len, so none is truncated"
    handles = []
    if at_limit:
        assert isinstance(bars, BarContainer)         # one data set, histtype="bar": one Rectangle per bin
        for bar in bars.patches:                      # the bar of captions exactly max_seq_len long
            if bar.get_x() < max_seq_len < bar.get_x() + bar.get_width():
                bar.set_facecolor("tab:green")
        handles = [Patch(color="tab:green", label=f"{at_limit} captions exactly {max_seq_len} tokens: they fit whole")]
    ax.set(xlabel="tokens per caption (with <start> and <end>)", ylabel="captions", title=title)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, loc="upper right", fontsize=9)
    fig.tight_layout()
    return fig


def read_log(path: str) -> list[dict[str, Any]]:
    """The rows of a train_log.jsonl; a torn line (a kill during a write) is skipped with a warning."""
    from .rundir import read_log as read_rows  # lazy: torch (rundir imports the checkpoint code)

    return read_rows(path, warn=print)


def plot_training_log(path: str) -> Figure:
    """Training loss and perplexity per logged step, validation loss per epoch; a dashed line where the
    learning rate dropped (lr_decay, or a resume with a smaller lr), so that the step it makes in the
    losses can be told from noise."""
    rows = read_log(path)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
    rates = [(r["step"], r["lr"]) for r in train if "lr" in r]      # logs written before it was logged: none
    for (_, before), (step, lr) in zip(rates, rates[1:]):
        if lr < before:
            for ax in (ax1, ax2):
                ax.axvline(step, color="grey", linestyle="--", linewidth=1,
                           label=f"learning rate {before:g} -> {lr:g}" if ax is ax1 else None)
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss (epoch end)")
    ax1.set(xlabel="step", ylabel="cross-entropy per token", title="loss")
    ax1.legend()
    ax2.plot([r["step"] for r in train], [r["perplexity"] for r in train], color="tab:orange")
    ax2.set(xlabel="step", ylabel="perplexity", yscale="log", title="perplexity = exp(loss)")
    ax2.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))       # 1, 2, 5, 10, 20 ... in plain numbers
    ax2.yaxis.set_major_formatter(ScalarFormatter())
    ax2.yaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    return fig


def plot_reward_log(path: str, smooth: int = 10) -> Figure:
    """A self-critical run's train_log.jsonl: the sampled captions' mean reward per logged step (and its
    running mean over `smooth` points), validation CIDEr-D per epoch (the starting point at step 0),
    and the validation cross-entropy, which SCST is free to make worse."""
    rows = read_log(path)
    train = [r for r in rows if "reward" in r]
    val = [r for r in rows if "val_cider" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
    steps, rewards = [r["step"] for r in train], np.array([r["reward"] for r in train])
    ax1.plot(steps, rewards, color="tab:blue", alpha=0.35, label="mean reward of the samples")
    if len(rewards) >= smooth:
        ax1.plot(steps[smooth - 1:], np.convolve(rewards, np.ones(smooth) / smooth, "valid"), color="tab:blue",
                 label=f"running mean ({smooth})")
    ax1.plot([r["step"] for r in val], [r["val_cider"] for r in val], "o-", color="tab:green",
             label="val CIDEr-D, greedy (epoch end)")
    ax1.set(xlabel="step", ylabel="CIDEr-D", title="reward")
    ax1.legend(fontsize=8, loc="lower right")
    ax2.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:red")
    ax2.set(xlabel="step", ylabel="cross-entropy per token", title="val loss (not what SCST optimises)")
    fig.tight_layout()
    return fig


def nearest_neighbour_accuracy(features: "torch.Tensor", labels: Sequence[Any], k: int = 5) -> float:
    """Leave-one-out k-nearest-neighbour accuracy (cosine) of `labels` from (N, D) `features`."""
    import torch  # lazy: see the note at the top

    x = torch.nn.functional.normalize(features.float(), dim=1)
    similarity = x @ x.T
    similarity.fill_diagonal_(-2)                                     # never one's own neighbour
    neighbours = similarity.topk(min(k, len(labels) - 1), dim=1).indices.tolist()
    right = 0
    for i, row in enumerate(neighbours):
        votes = [labels[j] for j in row]
        right += max(set(votes), key=votes.count) == labels[i]
    return right / len(labels)


def plot_feature_pca(features: "Mapping[str, torch.Tensor]", labels: Sequence[Any]) -> Figure:
    """One scatter per feature set: its first two principal components, coloured by label, with the
    labels' nearest-neighbour accuracy in the title (how well the features alone tell them apart)."""
    import torch  # lazy: see the note at the top

    names = sorted(set(labels))
    fig, axes = plt.subplots(1, len(features), figsize=(5.2 * len(features), 4.4), squeeze=False)
    for ax, (title, x) in zip(axes.flat, features.items()):
        x = x.float() - x.float().mean(0)
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        xy = (x @ v[:2].T).numpy()                                    # (N, 2)
        for name in names:
            pick = [i for i, label in enumerate(labels) if label == name]
            ax.scatter(xy[pick, 0], xy[pick, 1], s=10, label=name, alpha=0.75)
        ax.set(title=f"{title}\n5-nearest-neighbour accuracy {nearest_neighbour_accuracy(x, labels):.0%}",
               xticks=[], yticks=[], xlabel="principal component 1", ylabel="principal component 2")
    axes.flat[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def plot_architecture(words: Sequence[str] = ("a", "red", "circle"), embedding_size: int = 256, hidden_size: int = 512,
                      feature_size: int = 2048, crop_size: int = 224) -> Figure:
    """The chapter's model as a diagram: image -> ResNet -> Linear + BatchNorm -> image embedding, then
    the LSTM unrolled, the image embedding first and each word's embedding after it, each step's
    hidden state -> Linear -> scores over the vocabulary, whose likeliest word is the next input."""
    steps = ["<start>", *words, "<end>"]
    n, gap = len(steps), 1.8
    x0 = 4.9                                          # step 0 sits under the encoder's last box
    width = x0 + gap * (n - 1) + 1.0
    fig, ax = plt.subplots(figsize=(width * 0.85, 5.2))
    ax.set(xlim=(0, width), ylim=(0.2, 6.2))
    ax.axis("off")

    def box(x: float, y: float, w: float, h: float, text: str, colour: str, size: float = 10) -> None:
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.04", fc=colour,
                                    ec="#444444", lw=1))
        ax.text(x, y, text, ha="center", va="center", fontsize=size)

    def arrow(a: tuple[float, float], b: tuple[float, float], colour: str = "#444444", style: str = "solid") -> None:
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=12, color=colour, lw=1.2,
                                     linestyle=style))

    top = 5.3
    encoder = [(0.9, f"image\n3 x {crop_size} x {crop_size}", "#f6f8fa"),
               (2.9, f"ResNet (frozen)\nwithout its fc\n-> {feature_size}", "#dbe9f6"),
               (x0, f"Linear\n+ BatchNorm1d\n-> {embedding_size}", "#fde2c4")]
    for x, text, colour in encoder:
        box(x, top, 1.6, 0.95, text, colour, 9)
    for (xa, *_), (xb, *_) in zip(encoder, encoder[1:]):
        arrow((xa + 0.82, top), (xb - 0.82, top))
    ax.text(0.1, top + 0.75, "CNNModel, the encoder", fontsize=11, weight="bold")
    in_y, lstm_y, out_y = 3.4, 2.2, 1.0
    ax.text(0.1, 2.2, "LSTMModel, the decoder,\nunrolled over the caption:\nthe image embedding goes in\n"
                      "first, then each word's\nembedding; each step\npredicts the next word",
            fontsize=10, va="center")
    inputs = ["image\nembedding", *[f"embed\n{w}" for w in steps[:-1]]]
    for t in range(n):
        x = x0 + gap * t
        box(x, in_y, 1.15, 0.7, inputs[t], "#fde2c4" if t == 0 else "#e6f4ea", 9)
        box(x, lstm_y, 1.15, 0.75, f"LSTM\nstep {t}\n({hidden_size})", "#efe3f8", 9)
        box(x, out_y, 1.15, 0.55, f"Linear:\n{steps[t]}", "#fff8c5", 9)
        arrow((x, in_y - 0.37), (x, lstm_y - 0.0 + 0.4))
        arrow((x, lstm_y - 0.4), (x, out_y + 0.3))
        if t:
            arrow((x - gap + 0.6, lstm_y), (x - 0.6, lstm_y), "#8250df")          # (h, c) carried over
        if t < n - 1:                                                              # that word is the next input
            arrow((x + 0.6, out_y + 0.1), (x + gap - 0.6, in_y - 0.1), "#999999", "dashed")
    arrow((x0, top - 0.5), (x0, in_y + 0.37), "#c4621a")                          # the image embedding: step 0
    return fig


def show_source(*objects: Any) -> Any:
    """The source code of functions, classes or methods, syntax-highlighted in a notebook:
    the library's pieces, read where they are used."""
    from IPython.display import Code  # lazy: notebooks only, and IPython takes 70 ms (the CLI draws with viz)

    return Code("\n\n".join(textwrap.dedent(inspect.getsource(o)) for o in objects), language="python")
