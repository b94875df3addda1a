"""What a learner sees in notebooks 01-04 (issue 29's second pass), checked where a machine can:
no pink progress bars in executed copies, 'an orange', a threshold table whose rows differ, round
circles, captions big enough to read at 1280 px, each on its own lines and inside its column."""
import contextlib
import io
import json
import os
import re

import matplotlib
import nbformat
import numpy as np
import pytest
from conftest import ROOT
from PIL import Image, ImageDraw

from captioning.demo import tidy_streams
from captioning.semantics import load_ground_truth, semantic_accuracy
from captioning.tinyset import make_tinyset, with_articles
from captioning.viz import plot_length_histogram, show_images
from captioning.vocabulary import count_tokens

matplotlib.use("Agg")

DISPLAY_PX = 1150          # the width of a notebook's output area in a 1280 px browser window


def _stream_cell(*outputs):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("work()")
    cell.outputs = [nbformat.v4.new_output("stream", name=name, text=text) for name, text in outputs]
    nb.cells = [cell]
    return nb, cell


def test_tidy_streams_leaves_no_progress_bar_on_stderr():
    nb, cell = _stream_cell(
        ("stderr", "\rresizing train2014:   0%|          | 0/600"),
        ("stderr", "\rresizing train2014: 100%|##########| 600/600 [00:00<00:00, 1901.19img/s]\n"),
        ("stdout", "train {'total': 600}\n"),
        ("stderr", "\rresizing val2014: 0img [00:00, ?img/s]\n"),   # no total: no percentage
        ("stderr", "\r 50%|#####     | 1/2\r100%|##########| 2/2"),    # no description
        ("stdout", "val {'total': 0}\n"))
    tidy_streams(nb)
    assert [o.name for o in cell.outputs] == ["stdout"]
    assert cell.outputs[0].text == ("resizing train2014: 100%|##########| 600/600 [00:00<00:00, 1901.19img/s]\n"
                                    "train {'total': 600}\n"
                                    "resizing val2014: 0img [00:00, ?img/s]\n"
                                    "100%|##########| 2/2\n"
                                    "val {'total': 0}\n")


def test_tidy_streams_keeps_a_warning_on_stderr():
    nb, cell = _stream_cell(("stderr", "\rwork: 100%|##| 4/4\n"),
                            ("stderr", "UserWarning: something a reader must see\n"))
    tidy_streams(nb)
    assert [(o.name, o.text) for o in cell.outputs] == [
        ("stdout", "work: 100%|##| 4/4\n"), ("stderr", "UserWarning: something a reader must see\n")]


@pytest.mark.parametrize("caption, expected", [
    ("a orange circle to the left of a blue square", "an orange circle to the left of a blue square"),
    ("There Is A Orange Circle", "There Is An Orange Circle"),
    ("a blue square above a ultramarine star", "a blue square above an ultramarine star"),
    ("a unicorn", "a unicorn"),
    ("above a red circle", "above a red circle"),
])
def test_with_articles(caption, expected):
    assert with_articles(caption) == expected


def test_generated_captions_say_an_before_a_vowel_and_still_parse(tmp_path):
    make_tinyset(str(tmp_path / "t"), train=150, val=2, seed=3)
    path = tmp_path / "t" / "annotations" / "captions_train2014.json"
    captions = [a["caption"] for a in json.load(open(path))["annotations"]]
    assert not [c for c in captions if re.search(r"\ba [aeiou]", c, re.IGNORECASE)]
    assert any(re.search(r"\ban orange\b", c, re.IGNORECASE) for c in captions)
    refs = {}
    for a in json.load(open(path))["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    truth = load_ground_truth(path)
    for k in range(5):                   # semantics reads 'an orange circle' as the orange circle
        acc = semantic_accuracy({i: caps[k] for i, caps in refs.items()}, truth)
        assert acc["objects"] == 1.0 and acc["relation"] == 1.0


def _threshold_table(counts, threshold):
    """Run notebook 02's threshold cell on `counts`; its printed rows as [(threshold, words, unk %)]."""
    cells = nbformat.read(os.path.join(ROOT, "notebooks", "02_build_vocabulary.ipynb"), as_version=4).cells
    [source] = [c.source for c in cells if c.cell_type == "code" and "THRESHOLDS" in c.source]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, "<notebook 02>", "exec"), {"counts": counts, "threshold": threshold})
    rows = re.findall(r"threshold +(\d+): +(\d+) words, +([\d.]+)% of tokens", out.getvalue())
    return [(int(t), int(w), float(u)) for t, w, u in rows]


def test_the_threshold_table_rows_differ_on_the_tiny_set(tiny_data):
    counts, _ = count_tokens(str(tiny_data / "annotations" / "captions_train2014.json"), progress=False)
    rows = _threshold_table(counts, threshold=2)
    assert len(rows) >= 4, rows
    words = [w for _, w, _ in rows]
    unk = [u for _, _, u in rows]
    assert words == sorted(set(words), reverse=True), rows       # every row keeps fewer words
    assert unk == sorted(set(unk)), rows                        # and makes more <unk>


def test_the_threshold_table_is_meaningful_on_coco_like_counts():
    from collections import Counter

    rng = np.random.default_rng(0)
    counts = Counter({f"w{k}": int(c) for k, c in enumerate(rng.zipf(1.6, 25_000))})   # COCO: ~25k words
    rows = _threshold_table(counts, threshold=4)
    assert rows[0][0] == 1 and 4 in [t for t, _, _ in rows]     # thresholds a COCO user would try
    assert all(t < 1000 for t, _, _ in rows)
    assert [w for _, w, _ in rows] == sorted({w for _, w, _ in rows}, reverse=True)


def _circle(width, height):
    image = Image.new("RGB", (width, height), (236, 236, 232))
    r = min(width, height) // 3
    ImageDraw.Draw(image).ellipse((width // 2 - r, height // 2 - r, width // 2 + r, height // 2 + r), fill=(200, 0, 0))
    return image


def _drawn_ratio(fig, ax):
    """Width / height of the axes as drawn: the picture's displayed proportions."""
    fig.canvas.draw()
    box = ax.get_window_extent()
    return box.width / box.height


def _pixel_ratio(ax):
    """Screen length of one pixel across / down: 1 when a circle stays round."""
    (x0, y0), (x1, y1) = ax.transData.transform([(0, 0), (1, 1)])
    return abs(x1 - x0) / abs(y1 - y0)


def test_show_images_keeps_circles_round():
    wide, tall = np.asarray(_circle(120, 60)), np.asarray(_circle(50, 100))
    fig = show_images([wide, tall, _circle(80, 80)], ["wide", "tall", "square"], ncols=3)
    axes = [ax for ax in fig.axes if ax.images]
    assert _drawn_ratio(fig, axes[0]) == pytest.approx(2.0, rel=0.02)
    assert _drawn_ratio(fig, axes[1]) == pytest.approx(0.5, rel=0.02)
    for ax in axes:
        assert _pixel_ratio(ax) == pytest.approx(1.0, rel=0.02)


def test_a_resized_image_is_drawn_at_its_originals_proportions(tmp_path):
    original = _circle(120, 80)
    (tmp_path / "train2014").mkdir()
    (tmp_path / "resized_images" / "train2014").mkdir(parents=True)
    original.save(tmp_path / "train2014" / "a.png")
    original.resize((64, 64)).save(tmp_path / "resized_images" / "train2014" / "a.png")    # squashed
    path = str(tmp_path / "resized_images" / "train2014" / "a.png")
    fig = show_images([path], ["resized"], ncols=1)
    assert _drawn_ratio(fig, fig.axes[0]) == pytest.approx(1.5, rel=0.02)    # round again
    fig = show_images([path], ["resized"], ncols=1, proportions="pixels")
    assert _drawn_ratio(fig, fig.axes[0]) == pytest.approx(1.0, rel=0.02)    # as the CNN gets it
    with pytest.raises(ValueError, match="proportions"):
        show_images([path], ["x"], proportions="stretched")


def _caption_texts(fig):
    return [t for ax in fig.axes for t in ax.texts]


@pytest.mark.parametrize("ncols, width", [(4, 3.2), (1, 4), (3, 3)])   # 01/04/07's grids, 07's one image, 03's
def test_captions_are_readable_at_1280_px(ncols, width):
    images = [np.asarray(_circle(112, 98))] * ncols
    fig = show_images(images, ["a red circle to the left of a blue square"] * ncols, ncols=ncols, width=width)
    shown = min(1.0, DISPLAY_PX / (fig.get_figwidth() * fig.dpi))          # a browser shrinks a wide figure
    for text in _caption_texts(fig):
        assert text.get_fontsize() * fig.dpi / 72 * shown >= 13, "caption font under 13 px on screen"


def test_captions_stay_in_their_column_and_keep_their_lines():
    pads = "<start> a blue triangle to the left of a blue square <end>" + " <pad>" * 9
    fig = show_images([np.asarray(_circle(56, 56))] * 4, [pads, "one\ntwo", ["first", "second"], "x"], ncols=4)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.images]
    for left, right in zip(axes, axes[1:]):
        for text in left.texts:
            assert text.get_window_extent(renderer).x1 <= right.get_window_extent(renderer).x0, text.get_text()
    assert [t.get_text() for t in axes[1].texts] == ["one", "two"]        # a "\n" starts a new line
    assert [t.get_text() for t in axes[2].texts] == ["first", "second"]


def test_length_histogram_says_why_captions_sit_at_the_limit():
    fig = plot_length_histogram([18] * 50 + [8] * 100, max_seq_len=20)         # 18 words + <start>/<end>
    ax = fig.axes[0]
    assert "none is truncated" in ax.get_title()
    assert any("50 captions exactly 20 tokens" in t.get_text() for t in ax.get_legend().get_texts())
    fig = plot_length_histogram([25] * 3 + [8] * 97, max_seq_len=20)
    assert "3 (3.00%) are longer" in fig.axes[0].get_title()


@pytest.mark.parametrize("name", ["01_download_data", "02_build_vocabulary", "03_resize_images",
                                  "04_dataset_and_loader"])
def test_each_notebook_names_the_books_section(name):
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name + ".ipynb"), as_version=4)
    header = nb.cells[0].source
    assert re.search(r"^\*\*Book:\*\* chapter 2, .*\*[A-Z][^*]+\*", header, re.MULTILINE), header[:300]


def test_notebook_02_shows_the_encoding_example():
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "02_build_vocabulary.ipynb"), as_version=4)
    [source] = [c.source for c in nb.cells if c.cell_type == "code" and "encode_caption" in c.source]
    assert "i2w" in source and '"ids"' in source and '"back to words"' in source
