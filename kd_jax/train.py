"""`python -m kd_jax.train --config X.yaml [key=value ...]`: distill the student on a KD store.

Run again with the same command, it resumes from the newest complete checkpoint, data order
included; SIGTERM saves at the current step and exits 0. `--dry-run` sizes the run instead
(kd_jax/fit/dryrun.py); `--max-seq-len` finds the longest data.seq_len that fits. The loop is kd_jax/core/loop.py.
"""

from __future__ import annotations

from kd_jax.base.cli import parse_command
from kd_jax.base.errors import reported
from kd_jax.core import distributed
from kd_jax.core.loop import train
from kd_jax.fit import dryrun


def main(argv=None) -> None:
    cfg, flags = parse_command(argv, description="Distill a student from a KD store", dry_run=True)
    with reported(flags.debug):
        if flags.dry_run:  # size the run on abstract arrays, check it fits, exit
            return dryrun.main(cfg, "train", compile=not flags.no_compile, max_seq_len=flags.max_seq_len,
                               topology=flags.topology)
        distributed.maybe_initialize()
        train(cfg)


if __name__ == "__main__":
    main()
