"""Progress bars that stay readable in logs.

On a terminal tqdm redraws one line in place; into a file or a CI log each redraw (up to ten a
second) is a new line, so a training run writes one line per step. `bar` keeps tqdm as it is on a
terminal and, on anything else, redraws at most every LOG_INTERVAL seconds: a rare line still shows
a long run's rate and ETA (a bar disabled but for a final summary would not), and the line written
at close is the summary.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between progress lines when the stream is not a terminal


def bar(**tqdm_kwargs) -> tqdm:
    """tqdm(**tqdm_kwargs), throttled to one line per LOG_INTERVAL seconds when `file` (default
    stderr) is not a TTY; intervals passed explicitly win. maxinterval too: past it, tqdm's monitor
    thread forces a redraw of a fast bar."""
    stream = tqdm_kwargs.get("file") or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        tqdm_kwargs.setdefault("mininterval", LOG_INTERVAL)
        tqdm_kwargs.setdefault("maxinterval", LOG_INTERVAL)
    return tqdm(**tqdm_kwargs)
