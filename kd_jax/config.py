"""`python -m kd_jax.config --config X.yaml [key=value ...]`: check a config and print it resolved
(every key, defaults filled in). `--defaults` prints the reference YAML (configs/base.yaml) and
`--reference` the Markdown reference (docs/config.md), both generated from kd_jax/base/schema.py."""

from __future__ import annotations

import yaml

from kd_jax.base.cli import parse_command
from kd_jax.base.loader import to_dict
from kd_jax.base.reference import defaults_yaml, reference_markdown


def _flags(parser) -> None:
    parser.add_argument("--defaults", action="store_true", help="print every key with its default (configs/base.yaml)")
    parser.add_argument("--reference", action="store_true", help="print the config reference (docs/config.md)")


def main(argv=None) -> None:
    cfg, args = parse_command(argv, description="Check a kd_jax config and print it resolved", add_arguments=_flags)
    if args.defaults or args.reference:
        print(defaults_yaml() if args.defaults else reference_markdown(), end="")
        return
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")


if __name__ == "__main__":
    main()
