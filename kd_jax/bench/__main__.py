"""`python -m kd_jax.bench <name> [flags]`: run one benchmark (see `--help` of each)."""

from __future__ import annotations

import argparse

from kd_jax.bench import (  # `input_`: not the builtin
    flops_table,
    generate,
    loss,
    memory,
    onpolicy,
    precompute,
    step,
    store,
    torch_baseline,
)
from kd_jax.bench import input as input_

# Sub-command name -> module with `add_arguments(parser)` and `run(args)`.
BENCHMARKS = {"flops": flops_table, "generate": generate, "input": input_, "loss": loss, "memory": memory,
              "onpolicy": onpolicy, "precompute": precompute, "step": step, "store": store, "torch": torch_baseline}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kd_jax.bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in BENCHMARKS.items():
        module.add_arguments(commands.add_parser(name, help=module.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    BENCHMARKS[args.command].run(args)


if __name__ == "__main__":
    main()
