"""KD store -> packed training batches, with Grain.

  StoreSource (random access over a split) -> [curriculum head +] seeded shuffle -> repeat ->
  split into data.streams streams (default: one per process) -> shift each sequence by one ->
  pack to seq_len (Grain's first/best-fit packer) -> batch to the stream's rows -> finish (rename,
  dtypes, loss mask) -> this process's streams side by side -> worker processes (mp_prefetch)
  when data.num_workers > 0.

The next-token shift happens per sequence BEFORE packing: example position t holds input token t
and everything about label token t+1 (label, role, step, teacher top-K). Packing then only moves
whole examples, so no packing boundary can put a label next to the wrong input.

Batch (numpy, B = process-local batch, L = data.seq_len, K = store top-K):
  inputs, labels, positions, segment_ids, role, reasoning_step: int32 [B, L]; loss_mask: bool [B, L];
  step_weight: float32 [B, L]; topk_ids: int32 [B, L, K]; topk_logprobs: float32 [B, L, K].
segment_ids are 1.. per packed sequence in a row and 0 on padding; positions restart at 0 per
segment. Padding: inputs/labels 0, role 0, reasoning_step -1, step_weight 1, topk_ids -1,
topk_logprobs 0, loss_mask False. role is a `Role` (kd_jax.data.roles); reasoning_step the index of
the label's reasoning step (-1 outside the reasoning); step_weight that step's stored weight (1 for
non-reasoning labels and for stores without per-step weights).

Iterators are Grain DatasetIterators: `it.get_state()` / `it.set_state(state)` give the exact
position (JSON-serializable), and Orbax saves them with `grain.checkpoint.CheckpointSave(it)`.
"""

from __future__ import annotations

import functools
import os

import grain
import numpy as np
from absl import flags
from grain.experimental import (
    BestFitPackIterDataset,
    FirstFitPackIterDataset,
    ZipIterDataset,
)

from kd_jax.base.schema import DataConfig
from kd_jax.data.roles import Role
from kd_jax.data.store import KDStore, StoreError

# Per-token features that are packed, with the value that fills padding.
_PAD = {"inputs": 0, "labels": 0, "role": 0, "reasoning_step": -1, "step_weight": 1.0, "topk_ids": -1,
        "topk_logprobs": 0}
_PACKERS = {"first_fit": FirstFitPackIterDataset, "best_fit": BestFitPackIterDataset}
# Sequences read ahead by threads (per process): enough to pack a few batches, while bounding
# host memory (~0.8 MB per 2048-token sequence at K = 64).
_READ = grain.ReadOptions(num_threads=16, prefetch_buffer_size=128)
# MapDataset.concatenate refuses infinite parts, so after a curriculum head the shuffled epochs
# repeat this many times instead of forever: ~forever at any realistic dataset size.
_MANY_EPOCHS = 10**9


class StoreSource:
    """Grain random-access source: item i is sequence `indices[i]` of the KD store, target-aligned
    (tokens, role, step [n]; topk_ids, topk_logprobs [n, K]) plus its store `index`.

    Pickles as the path only: a Grain worker process opens the store again on its first read, because
    TensorStore handles must not cross fork/spawn; in the process that made it, the open store is used."""

    def __init__(self, store: KDStore, indices: np.ndarray):
        self.path, self.indices = store.path, np.asarray(indices, np.int64)
        self._store: KDStore | None = store
        self._pid: int | None = os.getpid()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid = KDStore.open(self.path), os.getpid()
        index = int(self.indices[i])
        return {**self._store.read(index), "index": index}

    def __getstate__(self):
        return {"path": self.path, "indices": self.indices}  # no TensorStore handles

    def __setstate__(self, state):  # in a worker process: opened again on the first read
        self.path, self.indices, self._store, self._pid = state["path"], state["indices"], None, None

    def __repr__(self) -> str:
        return f"StoreSource({self.path!r}, {len(self)} sequences)"


def shift_example(seq: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """Target-aligned sequence (length n) -> next-token example (length n - 1): at position t the
    input is token t and labels/role/reasoning_step/topk describe token t + 1, the one being predicted."""
    n = len(seq["tokens"])
    if n - 1 > seq_len:
        raise StoreError(f"sequence {seq.get('index')} has {n} tokens, more than data.seq_len + 1 = "
                         f"{seq_len + 1}; rebuild the store with this seq_len (precompute drops or "
                         f"truncates longer ones, data.filter.overlong) or raise data.seq_len")
    return {"inputs": seq["tokens"][:-1], "labels": seq["tokens"][1:], "role": seq["role"][1:],
            "reasoning_step": seq["step"][1:], "step_weight": seq["step_weight"][1:],
            "topk_ids": seq["topk_ids"][1:], "topk_logprobs": seq["topk_logprobs"][1:], "index": seq["index"]}


def split_indices(num_sequences: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic disjoint (train_idx, eval_idx), each sorted, over range(num_sequences).
    At least one eval sequence when eval_fraction > 0 (and at least one train sequence). To split
    only the usable sequences `u` (KDStore.check), split len(u) and index: u[train_idx]."""
    n_eval = int(round(num_sequences * eval_fraction))
    if eval_fraction > 0 and num_sequences >= 2:
        n_eval = min(max(n_eval, 1), num_sequences - 1)
    perm = np.random.default_rng(seed).permutation(num_sequences)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def reasoning_lengths(store: KDStore) -> np.ndarray:
    """int64 [N_seq]: role == 1 (reasoning) tokens per sequence, the default curriculum difficulty.
    Reads the whole role array once (1 byte per token)."""
    is_reasoning = np.concatenate([[0], np.cumsum(store.read_range("role", 0, store.meta.num_tokens) == Role.REASONING)])
    return is_reasoning[store.offsets[1:]] - is_reasoning[store.offsets[:-1]]


def _checked_indices(store: KDStore, indices: np.ndarray, seq_len: int) -> np.ndarray:
    """Fail here, before any worker starts, if a sequence cannot fit; drop 1-token sequences
    (nothing to predict: their example would be empty)."""
    indices = np.asarray(indices, np.int64)
    lengths = np.diff(store.offsets)[indices]
    if (lengths - 1 > seq_len).any():
        bad = int(indices[np.argmax(lengths)])
        raise StoreError(f"store {store.path}: sequence {bad} has {int(lengths.max())} tokens, more than "
                         f"data.seq_len + 1 = {seq_len + 1}; rebuild the store with this seq_len (precompute "
                         f"drops or truncates longer ones, data.filter.overlong) or raise data.seq_len")
    indices = indices[lengths >= 2]
    if len(indices) == 0:
        raise StoreError(f"store {store.path}: no usable sequences in this split; check the store "
                         f"(KDStore.check) and data.eval_fraction")
    return indices


def _finish(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Packed, batched features -> the batch contract above; pads missing rows (the last eval
    batch) with empty ones so every batch has shape [batch_size, L]."""
    segment_ids_BxL = batch["inputs_segment_ids"]
    out = {"inputs": batch["inputs"].astype(np.int32), "labels": batch["labels"].astype(np.int32),
           "positions": batch["inputs_positions"].astype(np.int32),
           "segment_ids": segment_ids_BxL.astype(np.int32),
           "role": batch["role"].astype(np.int32), "reasoning_step": batch["reasoning_step"].astype(np.int32),
           "step_weight": batch["step_weight"].astype(np.float32),
           "topk_ids": batch["topk_ids"].astype(np.int32),
           "topk_logprobs": batch["topk_logprobs"].astype(np.float32)}
    # Prompt labels (role 0) are never supervised; padding has role 0 too, but say it explicitly.
    out["loss_mask"] = (segment_ids_BxL > 0) & (out["role"] != Role.PROMPT)
    missing = batch_size - len(segment_ids_BxL)
    if missing > 0:
        pad = dict(_PAD, positions=0, segment_ids=0, loss_mask=False)
        out = {k: np.concatenate([v, np.full((missing, *v.shape[1:]), pad[k], v.dtype)]) for k, v in out.items()}
    return out


def _pack_and_batch(ds: grain.IterDataset, data_cfg: DataConfig, batch_size: int, seed: int,
                    shuffle_bins: bool, drop_remainder: bool) -> grain.IterDataset:
    lengths = {k: data_cfg.seq_len for k in _PAD}
    # One packed batch of `batch_size` bins at a time: the packer emits all bins as soon as an
    # example fits none, so more bins would pack tighter but hold more examples in memory.
    ds = _PACKERS[data_cfg.packing](ds, length_struct=lengths, num_packing_bins=batch_size, seed=seed,
                                    shuffle_bins=shuffle_bins, padding_struct=dict(_PAD))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.map(functools.partial(_finish, batch_size=batch_size))


def _concat_rows(batches: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
    """One batch of the streams' batches, stream 0's rows first (a module-level function: Grain
    pickles the pipeline into its worker processes)."""
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def curriculum_difficulty(store: KDStore, data_cfg: DataConfig) -> np.ndarray:
    """[N_seq], ascending = easiest: the store's `difficulty` when data.curriculum.difficulty_field
    names a field (precompute stored it from that field), else reasoning tokens per sequence."""
    field = data_cfg.curriculum.difficulty_field
    if field is None:
        return reasoning_lengths(store)
    stored = store.difficulty
    if stored is None:
        raise StoreError(f"store {store.path} holds no curriculum difficulty, but data.curriculum.difficulty_field="
                         f"{field!r}; rebuild the store with precompute and that setting (the traces need the field), "
                         f"or set it to null (reasoning length)")
    built = (store.meta.inputs.get("data.curriculum_difficulty_field"), store.meta.inputs.get("data.curriculum_easy"))
    if built != (field, data_cfg.curriculum.easy):
        raise StoreError(f"store {store.path} orders its curriculum by {built[0]!r} (easy = {built[1]}), this run "
                         f"asks for {field!r} (easy = {data_cfg.curriculum.easy}); set data.curriculum.difficulty_field"
                         f" and data.curriculum.easy as the store was built, or rebuild it")
    return stored


def _curriculum_head(store: KDStore, train_idx: np.ndarray, difficulty: np.ndarray,
                     count: int, seed: int, stages: int = 0) -> np.ndarray:
    """The first `count` training examples: train_idx easiest first (cycled if count exceeds it,
    ties in a seeded random order); with `stages` > 0, cut into that many consecutive stages of
    count / stages examples (increasing difficulty), each shuffled within (seeded)."""
    difficulty = np.asarray(difficulty)
    if len(difficulty) != len(store):
        raise ValueError(f"difficulty has {len(difficulty)} entries; give one per store sequence ({len(store)})")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(train_idx)
    head = np.resize(perm[np.argsort(difficulty[perm], kind="stable")], count)
    for s in range(stages):
        lo, hi = count * s // stages, count * (s + 1) // stages
        if hi - lo > 1:
            head[lo:hi] = rng.permutation(head[lo:hi])
    return head


def train_examples(store: KDStore, train_idx: np.ndarray, data_cfg: DataConfig, *, global_batch_size: int,
                   seed: int, process_index: int = 0, process_count: int = 1,
                   difficulty: np.ndarray | None = None, steps: int | None = None) -> grain.MapDataset:
    """This process's endless stream of shifted examples (before packing), each a dict of
    [n - 1] / [n - 1, K] arrays plus its store `index`.

    Examples are the store sequences `train_idx` in a seeded shuffle, a new order each epoch. The
    global stream is one sequence for all processes and process p takes every process_count-th
    example from p, so processes read disjoint examples and together read each epoch once.
    Curriculum (data.curriculum.fraction > 0 and `steps`): the stream starts with
    curriculum_fraction * steps * global_batch_size examples ordered easiest first by `difficulty`
    ([N_seq], indexed by store sequence; default `curriculum_difficulty`: the store's difficulty
    from data.curriculum.difficulty_field, else reasoning tokens per sequence) in
    order (or data.curriculum.stages stages, each shuffled within), then the shuffled epochs. The count is in
    examples and a packed row holds one or more, so the easy phase lasts at most that fraction of
    the steps.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    train_idx = _checked_indices(store, train_idx, data_cfg.seq_len)
    ds = grain.MapDataset.source(StoreSource(store, train_idx)).shuffle(seed=seed)
    head = int(data_cfg.curriculum.fraction * (steps or 0) * global_batch_size)
    if head > 0:
        if difficulty is None:
            difficulty = curriculum_difficulty(store, data_cfg)
        easy = _curriculum_head(store, train_idx, difficulty, head, seed, data_cfg.curriculum.stages)
        ds = grain.MapDataset.concatenate([grain.MapDataset.source(StoreSource(store, easy)),
                                           ds.repeat(_MANY_EPOCHS)])
    else:
        ds = ds.repeat()  # forever; each epoch reshuffled
    ds = ds[process_index::process_count]
    return ds.map(functools.partial(shift_example, seq_len=data_cfg.seq_len))


def make_train_iter(store: KDStore, train_idx: np.ndarray, data_cfg: DataConfig, *, global_batch_size: int,
                    seed: int, process_index: int = 0, process_count: int = 1,
                    difficulty: np.ndarray | None = None, steps: int | None = None) -> grain.DatasetIterator:
    """Endless iterator of packed batches for this process: dicts of numpy arrays [B, L] / [B, L, K]
    (module doc), B = global_batch_size // process_count.

    The global batch is data.streams (0: process_count) streams of examples (`train_examples`,
    stream s of S) side by side, each packed into its own global_batch_size // S rows; this
    process reads and packs its S // process_count streams. So a fixed data.streams gives the same
    global batches on any process count that divides it."""
    streams = data_cfg.streams or process_count
    if streams % process_count or global_batch_size % streams:
        raise ValueError(f"data.streams={streams} must be a multiple of the {process_count} processes and divide "
                         f"train.global_batch_size={global_batch_size}; set data.streams (0 = one per process) "
                         f"or the batch size")
    rows = global_batch_size // streams
    per_process = streams // process_count
    parts = []
    for s in range(process_index * per_process, (process_index + 1) * per_process):
        ds = train_examples(store, train_idx, data_cfg, global_batch_size=global_batch_size, seed=seed,
                            process_index=s, process_count=streams, difficulty=difficulty, steps=steps)
        parts.append(_pack_and_batch(ds.to_iter_dataset(_READ), data_cfg, rows, seed, shuffle_bins=True,
                                     drop_remainder=True))
    ds = parts[0] if len(parts) == 1 else ZipIterDataset(parts).map(_concat_rows)
    if data_cfg.num_workers > 0:
        # Each worker packs its own slice of the stream: batches are deterministic for a given
        # num_workers but differ between worker counts (Grain slices before packing).
        if not flags.FLAGS.is_parsed():
            # Grain 0.2.18 reads its absl flags when starting workers and raises
            # UnparsedFlagAccessError unless something parsed them (absl.app); we use argparse.
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
    return iter(ds)


def pack_examples(examples: list[dict[str, np.ndarray]], data_cfg: DataConfig,
                  batch_size: int) -> tuple[dict[str, np.ndarray], int]:
    """(one batch, examples in it): shifted examples (`shift_example`'s keys but `index`) packed in
    order by the configured packer into `batch_size` rows of data.seq_len, like training batches;
    examples that do not fit in those rows are left out (the count says how many went in)."""
    ds = grain.MapDataset.source(examples).to_iter_dataset()
    batch = next(iter(_pack_and_batch(ds, data_cfg, batch_size, seed=0, shuffle_bins=False, drop_remainder=False)))
    return batch, int(batch["segment_ids"].max(axis=1).sum())


def make_eval_iter(store: KDStore, eval_idx: np.ndarray, data_cfg: DataConfig, *,
                   batch_size: int) -> grain.DatasetIterator:
    """One deterministic pass over the store sequences `eval_idx` (in order), packed and batched
    like training; the last batch is padded with empty rows (segment 0) to [batch_size, L].
    Runs in this process (no workers): evaluation reads a few batches at a time and starting
    worker processes each time would cost more than it saves."""
    eval_idx = _checked_indices(store, eval_idx, data_cfg.seq_len)
    ds = grain.MapDataset.source(StoreSource(store, eval_idx))
    ds = ds.map(functools.partial(shift_example, seq_len=data_cfg.seq_len)).to_iter_dataset(_READ)
    return iter(_pack_and_batch(ds, data_cfg, batch_size, seed=0, shuffle_bins=False, drop_remainder=False))
