"""Matplotlib helpers for the notebooks: image grids with captions, length histogram, training curves."""
import math
import textwrap

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter


def denormalize(tensor):
    """A normalised (3, H, W) image tensor -> an (H, W, 3) array in [0, 1] for imshow."""
    from .data import IMAGENET_MEAN, IMAGENET_STD

    image = tensor.detach().float().cpu().numpy().transpose(1, 2, 0)
    return np.clip(image * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN), 0, 1)


RIGHT, WRONG = "#1a7f37", "#cf222e"          # caption colours where the truth is known


def _caption_lines(caption, colour, wrap):
    """One caption (a string, or a list of strings) -> [(line, colour)], each string wrapped to `wrap`."""
    parts = [caption] if isinstance(caption, str) else list(caption)
    colours = colour if isinstance(colour, (list, tuple)) else [colour] * len(parts)
    return [(line, c) for part, c in zip(parts, colours) for line in (textwrap.wrap(part, wrap) or [""])]


def show_images(images, captions, ncols=4, width=3.2, wrap=34, colours=None, fontsize=8.5):
    """A grid of images (paths, PIL images, arrays or normalised tensors), each with its caption below.

    A caption is a string or a list of strings (one block each); `colours` gives each image's
    colour, or one colour per block (for example green where a caption is right, red where wrong).
    Each row is given the height of the longest caption, so no caption runs into the next row.
    """
    from .images import load_image

    n = len(images)
    nrows = max(1, math.ceil(n / ncols))
    colours = colours or ["black"] * n
    blocks = [_caption_lines(c, k, wrap) for c, k in zip(captions, colours)]
    line_h = fontsize * 1.3 / 72                                        # inches per text line
    text_h = max(len(b) for b in blocks) * line_h + 0.1 if blocks else 0
    fig_h = nrows * (width + text_h) + 0.1
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, fig_h), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.05 / fig_h, bottom=text_h / fig_h,
                        wspace=0.05, hspace=text_h / width)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, lines in zip(axes.flat, images, blocks):
        if isinstance(image, str) or hasattr(image, "__fspath__"):
            image = load_image(image)
        elif hasattr(image, "detach"):
            image = denormalize(image)
        ax.imshow(image)
        for k, (line, colour) in enumerate(lines):
            ax.annotate(line, xy=(0, 0), xycoords="axes fraction", xytext=(0, -4 - k * fontsize * 1.3),
                        textcoords="offset points", va="top", ha="left", fontsize=fontsize, color=colour)
    return fig


def show_scored(result, image_ids, metric="CIDEr", ncols=4):
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


def show_saliency(image, words, maps, width=1.6, per_row=8, title=None):
    """A strip: the image, then one heat map per word over a faded copy of it (saliency.explain_image)."""
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
        heat = np.asarray(heat, dtype=np.float32)
        ax.imshow(picture * 0.5 + 0.5 * picture.mean(-1, keepdims=True))       # faded: the map stands out
        ax.imshow(heat, cmap="inferno", alpha=np.clip(heat, 0, 1) * 0.85, vmin=0, vmax=1)  # clear where 0
        ax.set_title(word, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_length_histogram(lengths, max_seq_len=20):
    """Histogram of caption lengths in tokens (with <start> and <end>), the max_seq_len cut marked."""
    lengths = np.asarray(lengths) + 2
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.hist(lengths, bins=np.arange(lengths.min(), lengths.max() + 2) - 0.5, color="tab:blue")
    ax.axvline(max_seq_len + 0.5, color="tab:red", linestyle="--", label=f"max_seq_len = {max_seq_len}")
    cut = (lengths > max_seq_len).mean()
    ax.set(xlabel="tokens per caption (with <start> and <end>)", ylabel="captions",
           title=f"{len(lengths)} captions; {cut:.2%} are longer than max_seq_len and get truncated")
    ax.legend()
    fig.tight_layout()
    return fig


def read_log(path):
    """The rows of a train_log.jsonl; a torn line (a kill during a write) is skipped with a warning."""
    from .rundir import read_log as read_rows

    return read_rows(path, warn=print)


def plot_training_log(path):
    """Training loss and perplexity per logged step, validation loss per epoch."""
    rows = read_log(path)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
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


def nearest_neighbour_accuracy(features, labels, k=5):
    """Leave-one-out k-nearest-neighbour accuracy (cosine) of `labels` from (N, D) `features`."""
    import torch

    x = torch.nn.functional.normalize(features.float(), dim=1)
    similarity = x @ x.T
    similarity.fill_diagonal_(-2)                                     # never one's own neighbour
    neighbours = similarity.topk(min(k, len(labels) - 1), dim=1).indices.tolist()
    right = 0
    for i, row in enumerate(neighbours):
        votes = [labels[j] for j in row]
        right += max(set(votes), key=votes.count) == labels[i]
    return right / len(labels)


def plot_feature_pca(features, labels):
    """One scatter per feature set: its first two principal components, coloured by label, with the
    labels' nearest-neighbour accuracy in the title (how well the features alone tell them apart)."""
    import torch

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


def show_source(*objects):
    """The source code of functions, classes or methods, syntax-highlighted in a notebook:
    the library's pieces, read where they are used."""
    import inspect

    from IPython.display import Code

    return Code("\n\n".join(textwrap.dedent(inspect.getsource(o)) for o in objects), language="python")
