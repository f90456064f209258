"""`python -m kd_jax.demo` (`make demo`): the R1-style recipe end to end, offline, on CPU, as an
experiment: traces and tokenizer, a teacher trained from scratch, its top-16 store, its verified
traces, one student per way of using the teacher at equal training compute, an evaluation table with
95% intervals and what they show, and the best student exported and answered by transformers
(kd_jax/demo/recipe.py).

`python -m kd_jax.demo --recipe prune` (`make demo-prune`): a real pretrained model instead:
SmolLM2-135M-Instruct pruned to a third of its non-embedding parameters and healed on human-written
text by each way of using the teacher, at equal compute and two seeds (kd_jax/demo/prune.py).
"""

from __future__ import annotations

import os
import sys

# The demo runs on CPU (its budget is planned there; libtpu or a CUDA plugin in the environment would
# otherwise be probed for hardware that is not here). One CPU device per core (at most 8, a power
# of two): data parallel on CPU. (Before jax starts.)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "jax" not in sys.modules and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    _n = 1 << (min(os.cpu_count() or 1, 8).bit_length() - 1)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_n}")

import argparse  # noqa: E402

from kd_jax.base.allocator import restart_with_allocator  # noqa: E402
from kd_jax.base.cli import setup_logging  # noqa: E402
from kd_jax.base.errors import reported  # noqa: E402
from kd_jax.demo.prune import HELD_OUT_DOCS as PRUNE_HELD_OUT_DOCS  # noqa: E402
from kd_jax.demo.prune import ROWS as PRUNE_ROWS  # noqa: E402
from kd_jax.demo.prune import run as run_prune  # noqa: E402
from kd_jax.demo.recipe import DEFAULT_ROWS, PROBLEMS, ROWS, run  # noqa: E402


def main(argv=None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=("r1", "prune"), default="r1",
                        help="r1: the R1-style recipe on the embedded arithmetic task (default); prune: "
                             "SmolLM2-135M-Instruct pruned and healed on human-written text")
    parser.add_argument("--out", default=None, help="folder for data, stores, runs and the report "
                                                    "(default runs/demo, runs/prune for --recipe prune)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the problem count and step budgets")
    parser.add_argument("--teacher-scale", type=float, default=None,
                        help="multiplies the teacher's steps instead of --scale (a reduced demo whose teacher "
                             "still answers some prompts right, so the teacher-traces row has traces)")
    parser.add_argument("--problems", type=int, default=PROBLEMS, help="number of generated problems (before --scale)")
    parser.add_argument("--max-examples", type=int, default=512, help="fresh held-out problems generated for accuracy")
    parser.add_argument("--seed", type=int, default=0, help="parameter-init seed of every model (run.seed)")
    parser.add_argument("--seeds", default="0,1", help="--recipe prune: the seeds of every row (data.shuffle_seed)")
    parser.add_argument("--steps", type=int, default=None,
                        help="--recipe prune: the offline rows' steps (default: kd_jax/demo/configs/prune.yaml's)")
    parser.add_argument("--rows", default=None,
                        help=f"students to train, comma-separated, from: {', '.join(ROWS)} (hard is always in); "
                             f"--recipe prune: from {', '.join(r.name for r in PRUNE_ROWS)} (cross-entropy always in)")
    parser.add_argument("--held-out-docs", type=int, default=PRUNE_HELD_OUT_DOCS,
                        help="--recipe prune: held-out documents scored (fewer: a quicker, noisier table)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first (else finished stages are reused)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="--recipe prune: overrides of kd_jax/demo/configs/prune.yaml, e.g. data.seq_len=128")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip()) if args.rows else None
    if args.overrides and args.recipe != "prune":
        parser.error(f"KEY=VALUE overrides ({' '.join(args.overrides)}) are for --recipe prune; the r1 recipe "
                     "is sized by --scale, --teacher-scale and --problems")
    with reported(args.debug):
        if args.recipe == "prune":
            run_prune(args.out or "runs/prune", args.steps, tuple(int(s) for s in args.seeds.split(",")), rows,
                      args.fresh, tuple(args.overrides), args.held_out_docs)
        else:
            run(args.out or "runs/demo", args.scale, args.problems, args.max_examples, args.fresh, args.seed,
                rows or DEFAULT_ROWS, args.teacher_scale)


if __name__ == "__main__":
    restart_with_allocator("kd_jax.demo", sys.argv[1:])  # glibc settings for XLA on CPU: kd_jax/base/allocator.py
    main()
