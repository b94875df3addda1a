"""Matplotlib helpers for the notebooks: image grids with captions, length histogram, training curves."""
import json
import math
import textwrap

import matplotlib.pyplot as plt
import numpy as np


def denormalize(tensor):
    """A normalised (3, H, W) image tensor -> an (H, W, 3) array in [0, 1] for imshow."""
    from .data import IMAGENET_MEAN, IMAGENET_STD

    image = tensor.detach().float().cpu().numpy().transpose(1, 2, 0)
    return np.clip(image * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN), 0, 1)


def show_images(images, captions, ncols=4, width=3.2, wrap=34):
    """A grid of images (paths, PIL images, arrays or normalised tensors), each with its caption below."""
    from .images import load_image

    n = len(images)
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, width * nrows * 1.15), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        if isinstance(image, str) or hasattr(image, "__fspath__"):
            image = load_image(image)
        elif hasattr(image, "detach"):
            image = denormalize(image)
        ax.imshow(image)
        ax.set_title("\n".join(textwrap.wrap(caption, wrap)), fontsize=8.5, loc="left")
    fig.tight_layout()
    return fig


def show_scored(result, image_ids, metric="CIDEr", ncols=4):
    """Images from an evaluate_checkpoint() result, each with its score, the model's caption and a reference."""
    captions = [f"{metric} {result['per_image'][i][metric]:.2f}\nmodel: {result['predictions'][i]}\n"
                f"human: {result['references'][i][0]}" for i in image_ids]
    return show_images([result["paths"][i] for i in image_ids], captions, ncols=ncols)


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
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
    fig.tight_layout()
    return fig
