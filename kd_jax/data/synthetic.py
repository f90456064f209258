"""Synthetic R1-style traces (arithmetic word problems, one reasoning step per paragraph) for
smoke runs and benchmarks: `python -m kd_jax.data.synthetic --out traces.jsonl --n 256`."""

from __future__ import annotations

import argparse
import json
import os


def synthetic_traces(n: int, seed: int = 0) -> list[dict]:
    rows = []
    for i in range(seed, seed + n):
        a, b, c = 3 + i % 50, 7 + (2 * i) % 40, 2 + i % 5
        steps = [f"First, Ana has {a} apples and buys {b} more, so she has {a} + {b} = {a + b} apples.",
                 f"Then she gives away {c} apples, leaving {a + b} - {c} = {a + b - c} apples.",
                 f"Finally she splits them between 2 friends: {a + b - c} / 2 = {(a + b - c) / 2} each."]
        rows.append({"prompt": f"Ana has {a} apples, buys {b} more, gives {c} away and shares the rest "
                               f"equally with 2 friends. How many does each friend get?",
                     "reasoning": "\n\n".join(steps[:1 + i % 3]), "answer": f"{(a + b - c) / 2}"})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--n", type=int, default=256, help="number of traces")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        for row in synthetic_traces(args.n, args.seed):
            f.write(json.dumps(row) + "\n")
    print(f"wrote {args.n} traces to {args.out}")


if __name__ == "__main__":
    main()
