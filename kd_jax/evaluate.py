"""`python -m kd_jax.evaluate --config X.yaml [--model student|teacher] [--untrained] [--samples N] [--latency] [key=value ...]`.

On the held-out split of the KD store, or on an external set of questions and reference answers
(`eval.data`): task accuracy by generation (the text after `</think>` is compared with the
reference answer by `eval.matcher`) with its 95% Wilson interval and the number of problems;
with `--samples N`, pass@1 over N sampled answers per problem and pass@k; with
`eval.step_checker`, the share of correct reasoning steps; the KD losses and top-1 agreement with
the teacher (when there is a store); and cost: generation tokens/s, the parameters' memory and,
with `--latency`, time to first token, per-token decode time and peak memory of generation on
the named hardware. The student is read from the run's latest checkpoint (`--untrained`: the
student as initialized, a baseline). Writes `<run_dir>/eval_<model>.json` and prints a table
(kd_jax/core/evaluation.py).
"""

from __future__ import annotations

from kd_jax.base.cli import parse_command
from kd_jax.base.errors import reported
from kd_jax.core.evaluation import evaluate, format_eval_report


def _arguments(parser) -> None:
    parser.add_argument("--model", choices=("student", "teacher"), default="student")
    parser.add_argument("--untrained", action="store_true",
                        help="evaluate the student as initialized, without a checkpoint (a baseline)")
    parser.add_argument("--max-examples", type=int, default=None, help="problems to generate for (the first ones)")
    parser.add_argument("--samples", type=int, default=None,
                        help="answers sampled per problem (eval.samples; > 1 needs eval.sampling_temperature > 0)")
    parser.add_argument("--latency", action="store_true", default=None,
                        help="also time generation at batch 1 and N and measure its peak memory (eval.latency)")


def main(argv=None) -> None:
    cfg, args = parse_command(argv, description=__doc__, add_arguments=_arguments,
                              flag_keys={"samples": "eval.samples", "latency": "eval.latency"})
    with reported(args.debug):
        report = evaluate(cfg, args.model, args.max_examples, untrained=args.untrained)
    print(format_eval_report(report))
    for s in report["samples"]:
        print(f"  {'ok ' if s['correct'] else 'bad'} predicted {s['prediction']!r} reference {s['reference']!r}")


if __name__ == "__main__":
    main()
