"""glibc malloc settings for XLA on CPU, applied by starting the command again before jax loads.

XLA's CPU runtime allocates a compiled program's temporaries at every call and frees them after.
By default glibc serves large blocks with mmap (or from per-thread arenas it trims) and hands them
back to the kernel at free, so the next step faults them in again, page by page, zero-filled. On
`make demo` (2-core machine, 2026-12-06) that was 55M minor page faults and 102 s of its 385 s of
CPU time in the kernel; with ENV, 2.0M faults, 19 s in the kernel and the demo 22% faster (225 s
-> 175 s), printing the same table: the allocator changes no number. ENV keeps freed memory in the
process (no mmap for large blocks, no trimming, two arenas); the peak resident set grew 8%.

`make demo` (`python -m kd_jax.demo`) applies it itself; `make test` exports the same variables.
"""

from __future__ import annotations

import os
import sys

ENV = {
    "MALLOC_MMAP_MAX_": "0",  # large blocks from the heap, not mmap: freed ones are reused, not faulted in again
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),  # never give the heap's free top back to the kernel
    "MALLOC_ARENA_MAX": "2",  # threads share two arenas and their free memory (measured with 2 on 2 cores)
}


def missing() -> dict[str, str]:
    """The ENV variables this process was started without (the caller's own values win)."""
    return {k: v for k, v in ENV.items() if k not in os.environ}


def restart_with_allocator(module: str, argv: list[str]) -> None:
    """Replace this process by `python -m module *argv` with ENV added, unless it already has it, the
    platform is not Linux (glibc), or KD_JAX_ALLOCATOR=0 switches it off. Call before work starts."""
    add = missing()
    if not add or not sys.platform.startswith("linux") or os.environ.get("KD_JAX_ALLOCATOR") == "0":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], {**os.environ, **add})
