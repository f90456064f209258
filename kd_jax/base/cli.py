"""The command line shared by the commands: `--config file.yaml key=value ...` (plus `--debug` and,
for the commands that compile, the dry-run flags) into a `Config`, and kd_jax's log lines on stdout.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping

from kd_jax.base.loader import load_config
from kd_jax.base.schema import Config, ConfigError

# What says an accelerator is on this machine: its device files (TPU v2-v4 /dev/accelN, v5e and
# later /dev/vfio/N; NVIDIA, WSL2, AMD) or the variables a TPU VM, GKE or a GPU scheduler sets.
_ACCELERATOR_FILES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/nvidiactl", "/dev/dxg",
                      "/dev/kfd")
_ACCELERATOR_VARIABLES = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES", "TPU_NAME",
                          "MEGASCALE_COORDINATOR_ADDRESS", "JAX_FORCE_TPU_INIT", "CUDA_VISIBLE_DEVICES",
                          "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")


def local_platforms(env: Mapping[str, str], files: Callable[[str], list] | None = None) -> str | None:
    """The jax platforms a command starts: None (jax's own choice) when the user set JAX_PLATFORMS
    or an accelerator may be here (`files(pattern)` lists the device files that match), else "cpu".
    Left to itself on a machine without a TPU, jax starts libtpu when it is installed (the test
    extra brings it), which prints its start-up errors before the command's first line."""
    if "JAX_PLATFORMS" in env:
        return None
    files = files or glob.glob
    if any(env.get(k) for k in _ACCELERATOR_VARIABLES) or any(files(f) for f in _ACCELERATOR_FILES):
        return None
    return "cpu"


def choose_platforms() -> None:
    """Before jax starts a backend: only the CPU where no accelerator is here (`local_platforms`)."""
    platforms = local_platforms(os.environ)
    if platforms is None:
        return
    os.environ["JAX_PLATFORMS"] = platforms  # what jax reads at import, and a command's child processes
    if "jax" in sys.modules:
        import jax
        if not jax.config.jax_platforms:
            jax.config.update("jax_platforms", platforms)


def setup_logging() -> None:
    """The start of every command: jax's platforms chosen before it starts (`choose_platforms`), and
    INFO lines of kd_jax on stdout. `force`: grain and absl install root handlers at import, which
    would swallow them; jax's backend probing and Orbax's save chatter stay at WARNING."""
    choose_platforms()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout,
                        force=True)
    for noisy in ("jax", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_args(argv: list[str] | None = None, description: str = "kd_jax") -> Config:
    """`--config file.yaml key=value ...` -> Config, for the entry points (which also get logging
    set up). A config error exits 1 with its one-line message."""
    return parse_command(argv, description)[0]


def parse_command(argv: list[str] | None = None, description: str = "kd_jax", *, dry_run: bool = False,
                  add_arguments=None, flag_keys: dict[str, str] | None = None) -> tuple[Config, argparse.Namespace]:
    """`parse_args` plus the parsed flags: `--debug` (a traceback instead of the one-line error,
    kd_jax.base.errors.reported), with dry_run=True `--dry-run`, `--no-compile`, `--max-seq-len` and `--topology`
    (kd_jax/fit/dryrun.py; both imply --dry-run), and whatever `add_arguments(parser)` adds.
    `flag_keys` maps a flag's dest to the config key it sets (`{"samples": "eval.samples"}`): a flag
    given is one more override, applied last, so the config is checked with it."""
    setup_logging()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file; configs/base.yaml lists every key")
    if dry_run:
        parser.add_argument("--dry-run", action="store_true",
                            help="print parameter counts and per-device memory, check the fit, and exit; "
                                 "reads no weights, store or traces")
        parser.add_argument("--no-compile", action="store_true",
                            help="with --dry-run: analytic estimate only, no ahead-of-time compile (not with "
                                 "--topology, which is a compile)")
        parser.add_argument("--max-seq-len", action="store_true",
                            help="a dry run that searches the longest data.seq_len (multiples of 128, rows per "
                                 "device kept) fitting the device memory by the analytic estimate, and prints it")
        parser.add_argument("--topology", metavar="CHIP:AxB",
                            help="a dry run compiled with the real TPU compiler for this slice (e.g. v5e:4x8, "
                                 "v5p:2x2x2, v6e:4x8; needs libtpu: pip install -e '.[tpu]'): per-chip memory, "
                                 "FLOPs, HBM bytes and the roofline floor of the step (kd_jax/fit/topology.py)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=10")
    args = parser.parse_intermixed_args(argv)
    if getattr(args, "topology", None) and args.no_compile:  # the compile is what --topology asks for
        print(f"error: --topology {args.topology} compiles for that hardware, which --no-compile forbids; drop "
              f"--no-compile, or drop --topology for the analytic estimate alone", file=sys.stderr, flush=True)
        raise SystemExit(1)
    if getattr(args, "max_seq_len", False) or getattr(args, "topology", None):
        args.dry_run = True
    if getattr(args, "topology", None):
        # A compile for a TPU slice or GPU host runs on this machine's CPU: no local accelerator is
        # started, and the CUDA plugin registers without CUDA (kd_jax/fit/topology.py).
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        if "JAX_PLATFORMS" not in os.environ:
            import jax
            jax.config.update("jax_platforms", "cpu")
    flagged = [f"{key}={json.dumps(getattr(args, dest))}" for dest, key in (flag_keys or {}).items()
               if getattr(args, dest, None) is not None]
    try:
        return load_config(args.config, [*args.overrides, *flagged]), args
    except ConfigError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
