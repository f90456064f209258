"""`python -m kd_jax.config --config X.yaml [key=value ...]`: check a config and print it resolved
(every key, defaults filled in). The schema is kd_jax/core/config.py; configs/base.yaml lists it."""

from __future__ import annotations

import yaml

from kd_jax.core.config import parse_args, to_dict


def main(argv=None) -> None:
    cfg = parse_args(argv, description="Check a kd_jax config and print it resolved")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")


if __name__ == "__main__":
    main()
