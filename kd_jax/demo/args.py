"""`python -m kd_jax.demo`'s flags, each checked before any stage runs: what a recipe does not take
is refused, and so is an out-of-range value."""

from __future__ import annotations

import argparse

from kd_jax.demo import prune, recipe

# flags each recipe takes (besides --recipe, --out, --rows, --fresh, --debug)
ONLY = {"r1": ("scale", "teacher_scale", "problems", "max_examples", "seed"),
        "prune": ("steps", "held_out_docs", "overrides")}


def parse(argv, description: str) -> argparse.Namespace:
    """The flags, checked; `seeds` and `rows` as tuples."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=("r1", "prune"), default="r1",
                        help="r1: the R1-style recipe on the embedded arithmetic task (default); prune: "
                             "SmolLM2-135M-Instruct pruned and healed on human-written text")
    parser.add_argument("--out", default=None, help="folder for data, stores, runs and the report "
                                                    "(default runs/demo, runs/prune for --recipe prune)")
    parser.add_argument("--scale", type=float, default=None, help="multiplies the problem count and step budgets")
    parser.add_argument("--teacher-scale", type=float, default=None,
                        help="multiplies the teacher's steps instead of --scale (a reduced demo whose teacher "
                             "still answers some prompts right, so the teacher-traces row has traces)")
    parser.add_argument("--problems", type=int, default=None,
                        help=f"number of generated problems (before --scale; default {recipe.PROBLEMS})")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="fresh held-out problems generated for accuracy (default 512)")
    parser.add_argument("--seed", type=int, default=None, help="parameter-init seed of every model (run.seed)")
    parser.add_argument("--seeds", default=None,
                        help="the seeds of every row (r1: run.seed, default --seed's; prune: data.shuffle_seed and "
                             "run.seed, default 0,1); two or more give verdicts")
    parser.add_argument("--steps", type=int, default=None,
                        help="--recipe prune: the reference row's steps (default: kd_jax/demo/configs/prune.yaml's)")
    parser.add_argument("--rows", default=None,
                        help=f"students to train, comma-separated, from: {', '.join(recipe.ROWS)} (hard is always "
                             f"in); --recipe prune: from {', '.join(prune.ROWS)} (cross-entropy always in)")
    parser.add_argument("--held-out-docs", type=int, default=None,
                        help=f"--recipe prune: held-out documents scored (default {prune.HELD_OUT_DOCS}; fewer: a "
                             f"quicker, noisier table)")
    parser.add_argument("--fresh", action="store_true",
                        help="remove what an earlier run of the demo wrote in --out first (nothing else)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="--recipe prune: overrides of kd_jax/demo/configs/prune.yaml, e.g. data.seq_len=128")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    given = {k for k in ("scale", "teacher_scale", "problems", "max_examples", "seed", "seeds", "steps",
                         "held_out_docs") if getattr(args, k) is not None}
    given |= {"overrides"} if args.overrides else set()
    other = "prune" if args.recipe == "r1" else "r1"
    wrong = sorted(given & set(ONLY[other]))
    if wrong:
        flags = " ".join("KEY=VALUE overrides" if w == "overrides" else "--" + w.replace("_", "-") for w in wrong)
        parser.error(f"{flags} {'is' if len(wrong) == 1 else 'are'} for --recipe {other}, not --recipe {args.recipe}"
                     + (" (the r1 recipe is sized by --scale, --teacher-scale and --problems)"
                        if args.recipe == "r1" else ""))
    for name in ("scale", "teacher_scale"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be above 0")
    for name in ("problems", "max_examples", "steps", "held_out_docs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed {args.seed}: must be 0 or more")
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip()) if args.rows else None
    seeds = None
    if args.seeds is not None:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(","))
        except ValueError:
            parser.error(f"--seeds {args.seeds!r}: comma-separated integers, e.g. 0,1,2")
    args.rows, args.seeds = rows, seeds
    return args
