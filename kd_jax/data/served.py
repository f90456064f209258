"""A served teacher's prompt log-probs (vLLM's `prompt_logprobs`), read into KD store rows.

Teachers too large for kd_jax (R1-class MoE/MLA models) run in vLLM or SGLang; asked for
`prompt_logprobs=K` on kd_jax's own token ids (`launch/vllm_prompt_logprobs.py`), the server
returns, per position t, a map of the K most likely ids at t (plus the actual token t when it is not
among them) to their log-probs given tokens 0..t-1: exactly a KD store row t ("target" alignment).
`precompute.import_logprobs` names such a file (or folder of them); `kd_jax.core.precompute` reads it
with `ServedLogprobs` instead of running the teacher.

The format: one JSON object per line (JSONL), one line per kd_jax sequence, in the store's order:

    {"index": 0, "prompt_token_ids": [151646, 151644, ...], "prompt_logprobs": [null, {"7": -0.01, "9": -4.6}, ...]}

  index             int: the sequence's number in the KD store (0, 1, ...: the traces kd_jax keeps
                    after its data.* filters, in trace order); row r of the file must have index r
  prompt_token_ids  [n] ints: the token ids the server scored; must equal kd_jax's exactly
  prompt_logprobs   [n]: null (or {}) at position 0, then one {id: log-prob} map per position
                    with at least K = data.top_k entries; ids as JSON string keys or ints, log-probs
                    as numbers (or {"logprob": x} objects)

A folder holds several such files (*.jsonl, *.parquet), read in sorted path order as one sequence
of rows. Parquet files have the same three columns, `prompt_logprobs` a list of map<int|string,
float> (null for position 0). Each position keeps the K largest log-probs among its ids below the
store's vocabulary (a padded teacher vocabulary's ids are dropped, as precompute does); ties go to
the smaller id, as jax.lax.top_k's do. A file that is not log-probs is refused at its first bad
position: an id outside the teacher's vocabulary, a log-prob that is not finite or is above 0
(probabilities), or a position whose probabilities add up past 1.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import os

import numpy as np

from kd_jax.data.store import StoreError

FIELDS = ("index", "prompt_token_ids", "prompt_logprobs")
_SUFFIXES = (".jsonl", ".parquet")
_FIX_TOKENS = ("the server tokenized the text itself (another chat template or tokenizer, or an added BOS); send it "
               "kd_jax's token ids instead, with this config's traces and data.* settings: "
               "launch/vllm_prompt_logprobs.py does (vLLM TokensPrompt(prompt_token_ids=...))")


class ServedLogprobsError(StoreError):
    """A served log-prob file that does not fit the store being built."""


LOGPROB_TOLERANCE = 1e-6  # a served log-prob may round to just above 0
MASS_TOLERANCE = 1e-3  # a position's probabilities may add up to just above 1 (fp16 rounding)


def served_files(source: str) -> list[str]:
    """The files `precompute.import_logprobs` names: one file, or a folder's *.jsonl / *.parquet, sorted."""
    if os.path.isfile(source):
        if not source.endswith(_SUFFIXES):
            raise ServedLogprobsError(f"precompute.import_logprobs={source!r}: not a .jsonl or .parquet file")
        return [source]
    if os.path.isdir(source):
        files = sorted(f for suffix in _SUFFIXES for f in glob.glob(os.path.join(source, "**", "*" + suffix),
                                                                    recursive=True))
        if not files:
            raise ServedLogprobsError(f"precompute.import_logprobs={source!r} is a folder with no *.jsonl or "
                                      f"*.parquet files in it")
        return files
    raise ServedLogprobsError(f"precompute.import_logprobs={source!r} does not exist; write it with "
                              f"launch/vllm_prompt_logprobs.py (or null to run the teacher in kd_jax)")


@dataclasses.dataclass(frozen=True)
class _Scan:
    files: tuple[str, ...]
    rows: np.ndarray  # [len(files) + 1] cumulative row counts
    lines: tuple  # per file: (starts, ends, line numbers) of its JSON lines, or None for Parquet
    groups: tuple  # per file: cumulative row counts of its Parquet row groups, or None for JSONL
    fingerprint: str  # sha256 of the files' names (relative to the source) and bytes


def _stat_key(source: str) -> tuple:
    return tuple((f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in served_files(source))


def _jsonl_lines(path: str, digest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[start, end) byte ranges and 1-based line numbers of the non-empty lines of `path`."""
    starts, ends, pos, line_start = [], [], 0, 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
            newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n")) + pos
            if len(newlines):
                starts.append(np.concatenate([[line_start], newlines[:-1] + 1]))
                ends.append(newlines)
                line_start = int(newlines[-1]) + 1
            pos += len(block)
    if line_start < pos:  # a last line without its newline
        starts.append(np.array([line_start]))
        ends.append(np.array([pos]))
    starts_L = np.concatenate(starts or [np.zeros(0, np.int64)]).astype(np.int64)
    ends_L = np.concatenate(ends or [np.zeros(0, np.int64)]).astype(np.int64)
    keep = ends_L > starts_L
    return starts_L[keep], ends_L[keep], np.flatnonzero(keep) + 1


@functools.lru_cache(maxsize=8)
def _scan(source: str, stats: tuple) -> _Scan:
    """One pass over the files: where each row is, and their fingerprint (cached per file sizes/mtimes)."""
    files = [f for f, _, _ in stats]
    root = source if os.path.isdir(source) else os.path.dirname(source)
    digest = hashlib.sha256()
    counts, lines, groups = [], [], []
    for path in files:
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        if path.endswith(".jsonl"):
            found = _jsonl_lines(path, digest)
            lines.append(found)
            groups.append(None)
            counts.append(len(found[0]))
        else:
            import pyarrow.parquet as pq
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
            meta = pq.ParquetFile(path).metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            lines.append(None)
            groups.append(np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))
            counts.append(meta.num_rows)
    return _Scan(tuple(files), np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]), tuple(lines), tuple(groups),
                 digest.hexdigest())


def fingerprint(source: str) -> str:
    """sha256 of the served files (names and bytes): what the KD store records as the imported teacher."""
    return _scan(source, _stat_key(source)).fingerprint


class ServedLogprobs:
    """Row access to a served log-prob file or folder (the module doc's format). Every process
    that reads it scans it once (line offsets, fingerprint), then reads only the rows it asks for."""

    def __init__(self, source: str):
        self.source = source
        self._scan = _scan(source, _stat_key(source))
        self._parquet: tuple | None = None  # (file, row group, table) last read

    @property
    def num_rows(self) -> int:
        return int(self._scan.rows[-1])

    @property
    def fingerprint(self) -> str:
        return self._scan.fingerprint

    def row(self, r: int) -> tuple[dict, str]:
        """Row r as a dict of FIELDS, and where it is (file:line or file row) for messages."""
        scan = self._scan
        f = int(np.searchsorted(scan.rows, r, side="right")) - 1
        path, local = scan.files[f], r - int(scan.rows[f])
        if scan.lines[f] is not None:
            starts, ends, numbers = scan.lines[f]
            where = f"{path}:{int(numbers[local])}"
            with open(path, "rb") as fh:
                fh.seek(int(starts[local]))
                raw = fh.read(int(ends[local] - starts[local]))
            try:
                row = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ServedLogprobsError(f"{where}: not a JSON object ({e}); the file must hold one JSON object per "
                                          f"line ({', '.join(FIELDS)})") from None
        else:
            where = f"{path} row {local}"
            row = self._parquet_row(path, scan.groups[f], local)
        if not isinstance(row, dict) or any(k not in row for k in FIELDS):
            have = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise ServedLogprobsError(f"{where}: a row needs the fields {', '.join(FIELDS)} (has {have}); write the "
                                      f"file with launch/vllm_prompt_logprobs.py")
        return row, where

    def _parquet_row(self, path: str, groups: np.ndarray, local: int) -> dict:
        import pyarrow.parquet as pq
        g = int(np.searchsorted(groups, local, side="right")) - 1
        if self._parquet is None or self._parquet[:2] != (path, g):
            try:
                table = pq.ParquetFile(path).read_row_group(g, columns=list(FIELDS))
            except Exception as e:  # pyarrow raises several types for a missing column or a bad file
                raise ServedLogprobsError(f"{path}: cannot read the columns {', '.join(FIELDS)} "
                                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
            self._parquet = (path, g, table)
        return self._parquet[2].slice(local - int(groups[g]), 1).to_pylist()[0]


def check_row(row: dict, where: str, sequence: int, tokens: np.ndarray, tokenizer) -> None:
    """The row is sequence `sequence` and scored exactly kd_jax's `tokens`; else an error naming the
    first position they differ at and both tokens, decoded."""
    if row["index"] != sequence:
        raise ServedLogprobsError(f"{where}: index {row['index']!r} where sequence {sequence} was expected: the rows "
                                  f"must list kd_jax's sequences in order (index 0, 1, ...; a folder's files in "
                                  f"sorted name order), as launch/vllm_prompt_logprobs.py writes them")
    served = np.asarray(row["prompt_token_ids"], np.int64)
    ours = np.asarray(tokens, np.int64)
    n = min(len(served), len(ours))
    differ = np.flatnonzero(served[:n] != ours[:n])
    if len(differ) or len(served) != len(ours):
        t = int(differ[0]) if len(differ) else n

        def shown(ids, side):
            if t >= len(ids):
                return f"{side} ends there ({len(ids)} tokens)"
            return f"{side} {int(ids[t])} {tokenizer.decode([int(ids[t])])!r}"
        raise ServedLogprobsError(f"sequence {sequence} ({where}): the served token ids differ from kd_jax's at "
                                  f"position {t}: {shown(served, 'served')}, {shown(ours, 'kd_jax')}; {_FIX_TOKENS}")
    if len(row["prompt_logprobs"]) != len(ours):
        raise ServedLogprobsError(f"sequence {sequence} ({where}): {len(row['prompt_logprobs'])} prompt_logprobs "
                                  f"entries for {len(ours)} tokens; there must be one per token (null first)")


def _as_map(entry, where: str, t: int) -> dict:
    if entry is None:
        return {}
    if isinstance(entry, dict):
        return entry
    if isinstance(entry, list):  # a Parquet map column reads back as (key, value) pairs
        return dict(entry)
    raise ServedLogprobsError(f"{where}: prompt_logprobs[{t}] is a {type(entry).__name__}; each position needs an "
                              f"{{id: log-prob}} map")


def _logprob(value) -> float:
    if isinstance(value, dict):
        return value["logprob"]
    return getattr(value, "logprob", value)


def _check_values(ids_E: np.ndarray, vals_E: np.ndarray, rows_E: np.ndarray, n: int, teacher_vocab: int,
                  where: str) -> None:
    """Every served entry is an id of the teacher's vocabulary with a finite log-prob <= 0, and each
    position's probabilities add up to at most 1; else an error naming the file, line and position."""
    nan, above = np.isnan(vals_E), ~(vals_E <= LOGPROB_TOLERANCE)  # above: > 0, +-inf, NaN
    outside = (ids_E < 0) | (ids_E >= teacher_vocab)
    bad = np.flatnonzero(outside | above | np.isneginf(vals_E))
    if len(bad):
        e = int(bad[0])
        t, i, v = int(rows_E[e]) + 1, int(ids_E[e]), float(vals_E[e])
        if outside[e]:
            problem = (f"id {i} is outside the teacher's vocabulary [0, {teacher_vocab}) (teacher.hf_path's "
                       f"config.json vocab_size, or the tokenizer's length without it): the file was written by "
                       f"another model, or is corrupt; write it again with this config's teacher "
                       f"(launch/vllm_prompt_logprobs.py), or set teacher.hf_path to the served model")
        elif nan[e] or not np.isfinite(v):
            problem = (f"log-prob {v} for id {i}: every log-prob must be finite and <= 0; the server's output is "
                       f"broken there: score this sequence again (launch/vllm_prompt_logprobs.py)")
        else:
            problem = (f"log-prob {v:.6g} for id {i} is above 0 (probabilities in the file instead of log-probs?): "
                       f"each value must be a log-prob <= 0, as vLLM's Logprob.logprob (write log(p), or the file "
                       f"again with launch/vllm_prompt_logprobs.py)")
        raise ServedLogprobsError(f"{where}: position {t}: {problem}")
    mass = np.bincount(rows_E, weights=np.exp(vals_E), minlength=n - 1)
    over = np.flatnonzero(mass > 1 + MASS_TOLERANCE)
    if len(over):
        t = int(over[0])
        raise ServedLogprobsError(f"{where}: position {t + 1}: its probabilities sum to {mass[t]:.4g}, above 1: "
                                  f"these are not one distribution's log-probs (unnormalized logits, a temperature, "
                                  f"or probabilities?); write log_softmax values, as vLLM's Logprob.logprob "
                                  f"(launch/vllm_prompt_logprobs.py)")


def topk_rows(entries: list, k: int, vocab_size: int, where: str, *,
              teacher_vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sequence's served maps -> its store rows: ids [n, k] int32 and log-probs [n, k] float32,
    row 0 the store's "no teacher" fill (ids -1, log-probs 0), row t the k largest log-probs of map t
    over ids < vocab_size (ties to the smaller id). A map with fewer than k entries is an error; so
    is an id outside [0, teacher_vocab), a log-prob that is not finite or is above 0, and a position
    whose probabilities add up past 1 (`_check_values`). Ids in [vocab_size, teacher_vocab), a
    padded teacher vocabulary's, are dropped.

    Also returns which positions [n] are not the teacher's exact top-k over those ids: a server asked
    for its top-P (P = the sequence's smallest map; a larger one adds the actual token) returns
    exact rows where at least k of its top P are below vocab_size; where ids past it (a padded
    vocabulary) take their place, the row keeps what was served (the actual token, then id -1,
    which the loss ignores)."""
    n = len(entries)
    ids = np.full((n, k), -1, np.int32)
    lps = np.zeros((n, k), np.float32)
    if n < 2:
        return ids, lps, np.zeros(n, bool)
    maps = [_as_map(e, where, t) for t, e in enumerate(entries[1:], start=1)]
    counts = np.fromiter(map(len, maps), np.int64, len(maps))
    short = np.flatnonzero(counts < k)
    if len(short):
        t, c = int(short[0]) + 1, int(counts[short[0]])
        raise ServedLogprobsError(f"{where}: position {t} holds {c} log-probs, fewer than data.top_k={k} (the file "
                                  f"was written for top-{c}): ask the server for prompt_logprobs >= {k} "
                                  f"(launch/vllm_prompt_logprobs.py --top-k {k}) or lower data.top_k")
    try:
        ids_E = np.asarray(list(itertools.chain.from_iterable(maps))).astype(np.int64)
    except ValueError as e:
        raise ServedLogprobsError(f"{where}: prompt_logprobs keys must be token ids ({e})") from None
    values = list(itertools.chain.from_iterable(m.values() for m in maps))
    try:
        vals_E = np.asarray(values, np.float64)
    except (TypeError, ValueError):
        vals_E = np.asarray([_logprob(v) for v in values], np.float64)
    rows_E = np.repeat(np.arange(n - 1), counts)
    _check_values(ids_E, vals_E, rows_E, n, teacher_vocab, where)
    cols_E = np.arange(len(ids_E)) - np.repeat(np.cumsum(counts) - counts, counts)
    width = int(counts.max())
    ids_NxM = np.full((n - 1, width), np.iinfo(np.int64).max, np.int64)
    vals_NxM = np.full((n - 1, width), -np.inf)
    ids_NxM[rows_E, cols_E] = ids_E
    vals_NxM[rows_E, cols_E] = vals_E
    valid_NxM = (ids_NxM >= 0) & (ids_NxM < vocab_size) & np.isfinite(vals_NxM)
    # the served top-P as ranked: are k of them below vocab_size?
    ranked = np.lexsort((ids_NxM, -vals_NxM), axis=-1)[:, :int(counts.min())]
    inexact = np.take_along_axis(valid_NxM, ranked, -1).sum(axis=1) < k
    vals_NxM = np.where(valid_NxM, vals_NxM, -np.inf)
    order = np.lexsort((ids_NxM, -vals_NxM), axis=-1)[:, :k]  # largest first, ties to the smaller id
    top_ids, top_vals = np.take_along_axis(ids_NxM, order, -1), np.take_along_axis(vals_NxM, order, -1)
    kept = np.isfinite(top_vals)
    ids[1:] = np.where(kept, top_ids, -1)
    lps[1:] = np.where(kept, top_vals, 0.0)
    return ids, lps, np.concatenate([[False], inexact])
