"""Progress bars: tqdm's widget in a live Jupyter kernel, text everywhere else.

A notebook executed by papermill (`make demo`, the tests) saves a widget as its first frame,
"0%", since widget state is not kept; with CAPTIONING_TEXT_PROGRESS set in the kernel's
environment the bars are text instead, and `captioning.demo` keeps each bar's last frame.
"""
import os

TEXT_PROGRESS = "CAPTIONING_TEXT_PROGRESS"


def tqdm(*args, **kwargs):
    """tqdm.auto.tqdm, or the plain text tqdm when CAPTIONING_TEXT_PROGRESS is set."""
    if os.environ.get(TEXT_PROGRESS):
        from tqdm.std import tqdm as bar
    else:
        from tqdm.auto import tqdm as bar
    return bar(*args, **kwargs)
