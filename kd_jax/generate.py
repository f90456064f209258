"""`python -m kd_jax.generate --config X.yaml [key=value ...]`: the teacher writes the traces.

The teacher (`teacher.*`) samples `generate.samples_per_prompt` completions for every prompt of
`generate.prompts`; each is split into reasoning and answer at `</think>`, checked against the
reference answer (`eval.matcher`), filtered (unfinished, empty answer, too long, duplicate, mixed
scripts) and kept by `generate.keep`. Writes r1 traces to `<generate.out>/traces/shard-*.jsonl`
(`python -m kd_jax.precompute ... data.traces=<generate.out>/traces` reads them) and prints the
report (pass rates, pass@k, dropped by reason, tokens/s), also in `<generate.out>/report.json`.
Re-running the same command resumes: only shards without a completion mark are sampled. With
several processes, each samples its own shards (kd_jax/core/tracegen.py).
"""

from __future__ import annotations

from kd_jax.base.cli import parse_command
from kd_jax.base.errors import reported
from kd_jax.core import distributed
from kd_jax.core.tracegen import format_trace_report, tracegen


def main(argv=None) -> None:
    cfg, flags = parse_command(argv, description="The teacher samples reasoning traces for prompts, verified and filtered")
    with reported(flags.debug):
        distributed.maybe_initialize()
        report = tracegen(cfg)
    if report:
        print(format_trace_report(report), flush=True)
        print(f"traces in {cfg.generate.out}/traces (data.traces for precompute); report in "
              f"{cfg.generate.out}/report.json", flush=True)


if __name__ == "__main__":
    main()
