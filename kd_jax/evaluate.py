"""`python -m kd_jax.evaluate --config X.yaml [--model student|teacher] [--untrained] [key=value ...]`.

Three axes, on the held-out split of the KD store: the KD losses and top-1 agreement with the
teacher, task accuracy by generation (the text after `</think>` is compared with the reference
answer by `eval.matcher`), and cost: generation tokens/s and the parameters' memory. The student is
read from the run's latest checkpoint (`--untrained`: the student as initialized, a baseline).
Writes `<run_dir>/eval_<model>.json` and prints a table (kd_jax/core/evaluation.py).
"""

from __future__ import annotations

from kd_jax.core.config import parse_command
from kd_jax.core.errors import reported
from kd_jax.core.evaluation import evaluate, format_report


def _arguments(parser) -> None:
    parser.add_argument("--model", choices=("student", "teacher"), default="student")
    parser.add_argument("--untrained", action="store_true",
                        help="evaluate the student as initialized, without a checkpoint (a baseline)")
    parser.add_argument("--max-examples", type=int, default=None, help="held-out sequences to generate for")


def main(argv=None) -> None:
    cfg, args = parse_command(argv, description=__doc__, add_arguments=_arguments)
    with reported(args.debug):
        report = evaluate(cfg, args.model, args.max_examples, untrained=args.untrained)
    print(format_report(report))
    for s in report["samples"]:
        print(f"  {'ok ' if s['correct'] else 'bad'} predicted {s['prediction']!r} reference {s['reference']!r}")


if __name__ == "__main__":
    main()
