"""Progress bars: tqdm's widget in a live Jupyter kernel, text everywhere else.

A notebook executed by papermill (`make demo`, the tests) saves a widget as its first frame,
"0%", since widget state is not kept; with CAPTIONING_TEXT_PROGRESS set in the kernel's
environment the bars are text instead, and `captioning.demo` keeps each bar's last frame.
"""
import os
from typing import Any

TEXT_PROGRESS = "CAPTIONING_TEXT_PROGRESS"


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """tqdm.auto.tqdm, or the plain text tqdm when CAPTIONING_TEXT_PROGRESS is set."""
    # lazy: tqdm.auto takes 50 ms to import (asyncio), more than the whole CLI's --help, which
    # imports this module (through karpathy) and draws no bar
    if os.environ.get(TEXT_PROGRESS):
        from tqdm.std import tqdm as bar
    else:
        from tqdm.auto import tqdm as bar
    return bar(*args, **kwargs)
