"""`python -m kd_jax.compare --rows ROWS.yaml --out DIR [--seeds 0,1,2] [key=value ...]`: does
distillation pay on this data? Every row of the rows file (a named override of one config each:
cross-entropy, top-K, sampled, online, on-policy, ...) trained at every seed with the reference row's
training compute, every run scored on one held-out set, then a table with seed ranges, verdicts only
where two or more seeds support them, a picture (metric vs training compute) and a JSON report.
The rows file format and the rules: kd_jax/core/compare.py and docs/compare.md. A rerun reuses every
run made from the same inputs; key=value overrides apply to every row.
"""

from __future__ import annotations

import argparse

from kd_jax.base.cli import setup_logging
from kd_jax.base.errors import reported
from kd_jax.core.compare import CompareError, run_file


def main(argv=None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", required=True, help="the rows file (YAML): config, rows, seeds, eval")
    parser.add_argument("--out", required=True, help="the comparison's folder: runs, report, picture")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds instead of the rows file's")
    parser.add_argument("--fresh", action="store_true", help="remove what an earlier comparison wrote in --out")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every row")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    with reported(args.debug):
        try:
            seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
        except ValueError:
            raise CompareError(f"--seeds {args.seeds!r}: comma-separated integers, e.g. 0,1,2") from None
        run_file(args.rows, args.out, seeds=seeds, fresh=args.fresh, overrides=tuple(args.overrides))


if __name__ == "__main__":
    main()
