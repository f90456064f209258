"""`python -m kd_jax.precompute --config X.yaml [key=value ...]`: traces -> KD store.

Process 0 tokenizes the traces into the store (once: a store that exists is reused when it was
made from the same inputs); then every process runs the teacher over its own chunks of the store
(`kd_jax.core.precompute.precompute`). With data.top_k=0 the store holds tokens only (no teacher is run):
for hard-label training, e.g. of a teacher. Re-running the same command resumes: only chunks
without a completion mark are computed. `--dry-run` sizes the teacher pass instead;
`--max-seq-len` finds the longest data.seq_len whose teacher pass fits. With
precompute.import_logprobs the teacher rows come from a served teacher's prompt log-probs
(launch/vllm_prompt_logprobs.py) and no teacher runs here.
"""

from __future__ import annotations

from kd_jax.base.cli import parse_command
from kd_jax.base.errors import reported
from kd_jax.core import distributed
from kd_jax.core.precompute import precompute
from kd_jax.fit import dryrun


def main(argv=None) -> None:
    cfg, flags = parse_command(argv, description="Tokenize traces and store the teacher's top-K next-token log-probs",
                               dry_run=True)
    with reported(flags.debug):
        if flags.dry_run:  # size the run on abstract arrays, check it fits, exit
            return dryrun.main(cfg, "precompute", compile=not flags.no_compile, max_seq_len=flags.max_seq_len,
                               topology=flags.topology)
        distributed.maybe_initialize()
        precompute(cfg)


if __name__ == "__main__":
    main()
