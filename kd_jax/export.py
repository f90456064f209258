"""`python -m kd_jax.export --run RUN_DIR [--step N] [--out DIR] [--dtype bfloat16] [--overwrite]`:
a trained student as a Hugging Face folder (config.json, safetensors, tokenizer).

Reads only the parameters of the checkpoint (no optimizer state), whatever the number of
processes that wrote it, onto this host's devices: run it on one host, not on every worker of a
slice. An existing non-empty --out folder is refused unless --overwrite."""

from __future__ import annotations

import argparse

from kd_jax.base.cli import setup_logging
from kd_jax.base.errors import reported
from kd_jax.core.runs import export_run


def main(argv=None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory written by kd_jax.train (holds config.yaml)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/hf, or RUN/hf-STEP with --step)")
    parser.add_argument("--dtype", default=None, help="saved dtype, e.g. bfloat16 (default: the parameters')")
    parser.add_argument("--overwrite", action="store_true", help="replace the model files of an existing --out folder")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    with reported(args.debug):
        print(f"exported to {export_run(args.run, args.out, args.step, args.dtype, overwrite=args.overwrite)}")


if __name__ == "__main__":
    main()
