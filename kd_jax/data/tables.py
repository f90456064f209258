"""Rows of prompts (and their reference answers) read with `datasets`: a JSONL/JSON/Parquet file, a
folder of them (searched recursively), or a hub dataset id. One reader for the commands that take
such a table: `generate.prompts` (kd_jax/core/tracegen.py) and `eval.data`
(kd_jax/core/evaluation.py). Errors name the config key that points at the table, as `what`.
"""

from __future__ import annotations

import glob
import os

import datasets

from kd_jax.base.errors import KDJaxError

SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class TableError(KDJaxError, ValueError):
    """A table of prompts that cannot be read or lacks a configured field."""


def load_table(source: str | None, fields: dict[str, str | None], what: str, *, error: type = TableError,
               hints: dict[str, str] | None = None) -> datasets.Dataset:
    """`source` read as one dataset, checked for rows and for every field of `fields` ({config key:
    field name}; a None field is not checked). `what` is the config key of `source` (for messages);
    `error` the exception class raised; `hints` an extra sentence per config key. Read without
    datasets' progress bars: an error then stays the only line on stderr."""
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return _load(source, fields, what, error, hints or {})
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _load(source, fields, what, error, hints) -> datasets.Dataset:
    if not source:
        raise error(f"{what} is not set; point it at a JSONL/Parquet file, a folder of them or a hub dataset of "
                    f"prompts")
    if os.path.isfile(source):
        files = [source]
    elif os.path.isdir(source):
        files = sorted(f for suffix in SUFFIXES for f in glob.glob(os.path.join(source, "**", "*" + suffix),
                                                                   recursive=True))
        if not files:
            raise error(f"{what}={source!r} is a folder with no *.jsonl, *.json or *.parquet files")
    elif os.path.splitext(source)[1] in SUFFIXES or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise error(f"{what}={source!r} does not exist; check the path")
    else:
        files = None
    for path in files or ():  # datasets fails on an empty JSON file with a bare StopIteration
        if _is_empty(path):
            fix = "remove it from the folder or fill it" if path != source else f"fill it or point {what} elsewhere"
            raise error(f"{path} is empty ({what}={source!r}); {fix}")
    try:
        if files is None:
            dataset = datasets.load_dataset(source, split="train")
        else:
            by_builder: dict[str, list[str]] = {}
            for path in files:
                by_builder.setdefault(SUFFIXES.get(os.path.splitext(path)[1], "?"), []).append(path)
            if "?" in by_builder:
                raise error(f"{by_builder['?'][0]!r}: unsupported file type for {what}; use .jsonl, .json or "
                            f".parquet")
            parts = [datasets.load_dataset(b, data_files=p, split="train") for b, p in by_builder.items()]
            dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except error:
        raise
    except Exception as e:  # Arrow, JSON, hub and network errors all mean "cannot read the table"
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise error(f"cannot read {what}={source!r} ({type(e).__name__}: {first}); pass valid JSONL/Parquet "
                    f"files or a reachable hub dataset") from None
    if dataset.num_rows == 0:
        raise error(f"{what}={source!r} has no rows")
    for key, field in fields.items():
        if field is not None and field not in dataset.column_names:
            raise error(f"{what} has no field {field!r}; available columns: {', '.join(dataset.column_names)}; "
                        f"set {key} to one of them{hints.get(key, '')}")
    return dataset


def _is_empty(path: str) -> bool:
    """No bytes, or (a small file) only whitespace."""
    size = os.path.getsize(path)
    if size == 0:
        return True
    if size > 1 << 16:
        return False
    with open(path, "rb") as f:
        return not f.read().strip()


def prompt_messages(value, index: int, key: str, error: type = TableError) -> list[dict]:
    """A prompt field's value (text, or role/content turns) as chat messages; `key` is the config
    key naming the field (for messages)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise error(f"prompt row {index}: the prompt must be text or a list of {{'role', 'content'}} turns, got "
                f"{str(value)[:200]!r}; check {key}")
