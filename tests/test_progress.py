"""kd_jax.base.progress: progress bars that write a few lines, not one per step, into logs."""

import io
import re
import time

from tqdm import tqdm

from kd_jax.base import progress


def _lines(make_bar) -> int:
    """Progress lines one bar writes into a non-TTY stream over 1000 updates spread over ~1 s (a
    log viewer breaks lines at \\r as well as \\n)."""
    stream = io.StringIO()
    bar = make_bar(total=1000, file=stream, desc="train")
    for _ in range(1000):
        time.sleep(0.001)
        bar.update(1)
    bar.close()
    return len([line for line in re.split(r"[\r\n]", stream.getvalue()) if line.strip()])


def test_bar_into_a_log_writes_a_few_lines_not_one_per_update():
    assert _lines(tqdm) >= 5  # plain tqdm redraws every 0.1 s
    assert _lines(progress.bar) <= 3  # the first line and the closing summary


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_on_a_terminal_is_plain_tqdm_and_explicit_intervals_win():
    assert progress.bar(total=1, file=_Terminal()).mininterval == tqdm(total=1, file=_Terminal()).mininterval
    assert progress.bar(total=1, file=io.StringIO(), mininterval=0.5).mininterval == 0.5
