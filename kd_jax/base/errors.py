"""The one base class of the errors kd_jax explains, and how the commands report them.

Every error kd_jax raises on bad input or a failed run derives from `KDJaxError`; its message is
one line that names the problem and the fix. The commands (`python -m kd_jax.X`) print that line
and exit 1 (`--debug` shows the traceback instead); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys


class KDJaxError(Exception):
    """An error with a message that says what is wrong and how to fix it."""


@contextlib.contextmanager
def reported(debug: bool = False):
    """Around a command's work: a KDJaxError becomes `error: <message>` on stderr and exit code 1."""
    try:
        yield
    except KDJaxError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
