import matplotlib
import nbformat
import numpy as np

from captioning.demo import tidy_streams
from captioning.viz import RIGHT, WRONG, show_images

matplotlib.use("Agg")


def test_captions_never_run_into_the_next_row_and_carry_their_colours():
    images = [np.full((30, 40, 3), k / 10) for k in range(7)]
    captions = [["greedy: " + "a long caption about shapes " * (k % 3 + 1), f"beam 3: caption {k}"] for k in range(7)]
    colours = [[RIGHT, WRONG] for _ in range(7)]
    fig = show_images(images, captions, ncols=3, colours=colours)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 7
    height = fig.bbox.height
    for k, ax in enumerate(axes):
        texts = [t for t in ax.texts]
        assert [t.get_color() for t in texts][-1] == WRONG and texts[0].get_color() == RIGHT
        lowest = min(t.get_window_extent(renderer).y0 for t in texts)
        assert lowest >= 0, "a caption is cut off at the bottom of the figure"
        below = [b for b in axes if b.get_position().y1 < ax.get_position().y0 - 1e-6]
        for b in below:                      # every image of a lower row starts below this caption's end
            assert b.get_window_extent(renderer).y1 <= lowest + 1
        assert ax.get_window_extent(renderer).y1 <= height


def test_tidy_streams_keeps_the_last_frame_of_each_progress_bar():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("work()")
    frames = ["\r", "work:   0%|  | 0/4", "\rwork:  50%|# | 2/4", "\rwork: 100%|##| 4/4", "\n"]
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text=f) for f in frames]
    cell.outputs.insert(3, nbformat.v4.new_output("stream", name="stdout", text="epoch 0: val loss 1.0\n"))
    cell.outputs.append(nbformat.v4.new_output("stream", name="stderr", text="done\rdone!\n"))
    nb.cells = [cell]
    tidy_streams(nb)
    texts = [(o.name, o.text) for o in cell.outputs]
    # the bar's last frame is shown as stdout, after the line printed while it ran; other stderr stays
    assert texts == [("stdout", "epoch 0: val loss 1.0\nwork: 100%|##| 4/4\n"), ("stderr", "done!\n")]


def test_the_architecture_diagram_names_each_part_and_the_caption_it_unrolls():
    from captioning.viz import plot_architecture

    fig = plot_architecture(words=("a", "blue", "star"), embedding_size=128, hidden_size=256, feature_size=512,
                            crop_size=56)
    texts = " | ".join(t.get_text() for t in fig.axes[0].texts)
    for part in ("3 x 56 x 56", "-> 512", "-> 128", "(256)", "embed\nblue", "Linear:\nstar", "Linear:\n<end>",
                 "CNNModel", "LSTMModel"):
        assert part in texts, part
    assert texts.count("LSTM\nstep") == 5                       # <start>, a, blue, star, <end>


def test_saliency_strip_titles_each_word_and_the_attention_style_lights_where_the_map_is_high():
    import pytest

    from captioning.viz import show_saliency

    picture = np.full((20, 20, 3), 0.8)
    heat = np.zeros((20, 20))
    heat[:10, 10:] = 1.0                                            # the top right quarter
    fig = show_saliency(picture, ["a", "red"], [heat, heat], style="attention")
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["image", "a", "red"]
    drawn = np.asarray(panels[1].images[-1].get_array())
    assert drawn[5, 15].mean() > 3 * drawn[15, 5].mean()          # lit where it looked, dimmed elsewhere
    heat_fig = show_saliency(picture, ["a"], [heat])                # the default: a heat map over a faded image
    assert len([ax for ax in heat_fig.axes if ax.images][1].images) == 2
    with pytest.raises(ValueError, match="style"):
        show_saliency(picture, ["a"], [heat], style="glow")


def test_the_training_plot_marks_where_the_learning_rate_dropped(tmp_path):
    import json

    from captioning.viz import plot_training_log

    def log(rates):
        path = tmp_path / f"log{len(rates)}-{rates[-1]}.jsonl"
        rows = [{"step": 10 * (i + 1), "epoch": i // 3, "loss": 1.0 / (i + 1), "perplexity": 2.0, **rate}
                for i, rate in enumerate(rates)]
        rows.append({"step": 60, "epoch": 1, "val_loss": 0.5})
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    def dashed(fig):
        return [(line.get_xdata()[0], line.get_label()) for line in fig.axes[0].lines if line.get_linestyle() == "--"]

    decayed = log([{"lr": 0.005}] * 4 + [{"lr": 0.0005}] * 2)
    assert dashed(plot_training_log(decayed)) == [(50, "learning rate 0.005 -> 0.0005")]
    assert len([ln for ln in plot_training_log(decayed).axes[1].lines if ln.get_linestyle() == "--"]) == 1
    assert dashed(plot_training_log(log([{"lr": 0.005}] * 6))) == []        # a constant rate: no line
    assert dashed(plot_training_log(log([{}] * 5))) == []                   # a log from before rates were logged
    matplotlib.pyplot.close("all")
