"""`python -m kd_jax.demo` (`make demo`): the R1-style recipe end to end, offline, on CPU, as an
experiment: traces and tokenizer, a teacher trained from scratch, its top-16 store, its verified
traces, one student per way of using the teacher at equal training compute, an evaluation table with
95% intervals and what they show, and the best student exported and answered by transformers
(kd_jax/demo/recipe.py).

`python -m kd_jax.demo --recipe prune` (`make demo-prune`): a real pretrained model instead:
SmolLM2-135M-Instruct pruned to a third of its non-embedding parameters and healed on human-written
text by each way of using the teacher, at equal compute and two seeds (kd_jax/demo/prune.py).

Both run their rows file (kd_jax/demo/rows/) through the comparison harness behind
`python -m kd_jax.compare`; the demo makes only the data, stores and teacher they read.
"""

from __future__ import annotations

import os
import sys

# The demo runs on CPU (its budget is planned there; libtpu or a CUDA plugin in the environment would
# otherwise be probed for hardware that is not here), on 2 CPU devices, data parallel, whatever the
# core count: the device count changes the numbers (1 device: 53 of the reduced demo's 256 report
# numbers differ from 2), the thread count does not (2 devices on 1 core: all 256 the same), so the
# README's table reproduces on any machine. (Before jax starts; a device count in XLA_FLAGS wins.)
DEVICES = 2
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "jax" not in sys.modules and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}")

from kd_jax.base.allocator import restart_with_allocator  # noqa: E402
from kd_jax.base.cli import setup_logging  # noqa: E402
from kd_jax.base.errors import reported  # noqa: E402
from kd_jax.demo import prune, recipe  # noqa: E402
from kd_jax.demo.args import parse  # noqa: E402


def main(argv=None) -> None:
    setup_logging()
    args = parse(argv, __doc__)
    with reported(args.debug):
        if args.recipe == "prune":
            prune.run(args.out or "runs/prune", args.steps, args.seeds or prune.SEEDS, args.rows, args.fresh,
                      tuple(args.overrides), args.held_out_docs or prune.HELD_OUT_DOCS)
        else:
            recipe.run(args.out or "runs/demo", args.scale or 1.0, args.problems or recipe.PROBLEMS,
                       args.max_examples or 512, args.fresh, args.seed or 0, args.rows or recipe.DEFAULT_ROWS,
                       args.teacher_scale, args.seeds)


if __name__ == "__main__":
    restart_with_allocator("kd_jax.demo", sys.argv[1:])  # glibc settings for XLA on CPU: kd_jax/base/allocator.py
    main()
