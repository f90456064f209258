"""The KD store: tokenized traces and the teacher's top-K next-token log-probs, as zarr v3 arrays
through TensorStore, at any kvstore path (a local folder, gs://bucket/path, memory:// for tests).

Ragged layout: sequences are concatenated on the token axis and `offsets` says where each begins.

  tokens [N_tok] int32, role [N_tok] uint8, step [N_tok] int32, offsets [N_seq + 1] int64,
  topk_ids [N_tok, K] int32, topk_logprobs [N_tok, K] float16|bfloat16, done [N_seq] uint8

Alignment ("target"): every per-token array describes the token at its own index. Row t of
`topk_*` is the teacher's distribution OF token t given the tokens before it in its sequence,
just as role[t] and step[t] are token t's. A consumer that predicts token t from position t-1
shifts all of them together; nothing can be off by one relative to anything else. The first row
of every sequence has no prediction: ids -1, log-probs 0 (it is a prompt token, never supervised).

Writers own whole chunks of the token axis (`chunk_tokens`), so processes never write the same
chunk; a chunk is marked complete by an empty key `progress/<chunk>` once all its rows are in.
`done[i]` is derived from those marks (all chunks that sequence i touches are complete).

K = 0 is a tokens-only store (`data.top_k=0` in precompute): no teacher arrays, complete at
creation, for hard-label training (loss.alpha=0), e.g. of the demo's teacher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np
import tensorstore as ts

from kd_jax.errors import KDJaxError

FORMAT_VERSION = 1
_LOGPROB_DTYPES = ("float16", "bfloat16")


class StoreError(KDJaxError, ValueError):
    """A KD store that cannot be used as asked, with what is wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class StoreMeta:
    """The contents of kd_store.json."""
    k: int  # teacher ids kept per token
    vocab_size: int  # stored ids are < this: the student's output rows (or the tokenizer's length)
    teacher_vocab_size: int  # rows of the teacher's output layer (may be padded past vocab_size)
    tokenizer: str  # tokenizer name or path
    chat_template_hash: str  # sha256 of the tokenizer's chat template ("" if none)
    teacher: str  # teacher name or path
    teacher_revision: str | None
    logprob_dtype: str  # float16 or bfloat16
    num_sequences: int
    num_tokens: int
    chunk_tokens: int  # rows per chunk on the token axis: the unit of writing and of completion
    alignment: str = "target"  # row t of topk_* is the teacher's distribution of token t (see module doc)
    version: int = FORMAT_VERSION

    @property
    def num_chunks(self) -> int:
        return -(-self.num_tokens // self.chunk_tokens)


def template_hash(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    return hashlib.sha256(template.encode()).hexdigest() if template else ""


def kvstore_url(path: str) -> str:
    """A TensorStore kvstore URL for a local folder or an URL (gs://, memory://, file://)."""
    if "://" not in path:
        path = "file://" + os.path.abspath(path)
    return path.rstrip("/") + "/"


def _codecs(typesize: int) -> list[dict[str, Any]]:
    # blosc+zstd with shuffling: top-K ids use few of their 32 bits and sorted log-probs vary
    # slowly, so byte/bit shuffling before zstd is what brings bytes per token well under 6K.
    shuffle = "bitshuffle" if typesize == 4 else "shuffle"
    return [{"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "blosc", "configuration": {"cname": "zstd", "clevel": 5, "shuffle": shuffle,
                                                "typesize": typesize, "blocksize": 0}}]


_PER_TOKEN = ("tokens", "role", "step", "topk_ids", "topk_logprobs")


class KDStore:
    """Reader and writer of one KD store. Arrays are opened lazily on first use, so an instance can
    be built in a parent process and used in forked workers (TensorStore is not fork-safe)."""

    def __init__(self, path: str, meta: StoreMeta):
        self.path, self.url, self.meta = path, kvstore_url(path), meta
        self._arrays: dict[str, ts.TensorStore] = {}
        self._offsets: np.ndarray | None = None
        self._pid = os.getpid()

    # --- creating and opening --------------------------------------------------------------

    @classmethod
    def create(cls, path: str, meta: StoreMeta, tokens: np.ndarray, role: np.ndarray, step: np.ndarray,
               offsets: np.ndarray) -> "KDStore":
        """Write the token-side arrays and create empty teacher arrays (process 0 only)."""
        if meta.logprob_dtype not in _LOGPROB_DTYPES:
            raise StoreError(f"logprob_dtype={meta.logprob_dtype!r}; use one of {_LOGPROB_DTYPES}")
        store = cls(path, meta)
        n, k, c = meta.num_tokens, meta.k, meta.chunk_tokens
        store._create("offsets", "int64", [meta.num_sequences + 1], [max(meta.num_sequences + 1, 1)])[...] = offsets
        for name, values in (("tokens", tokens), ("role", role), ("step", step)):
            store._create(name, str(values.dtype), [n], [c])[...] = values
        if k > 0:  # k = 0: a tokens-only store (hard-label training, no teacher)
            store._create("topk_ids", "int32", [n, k], [c, k], fill=-1)
            store._create("topk_logprobs", meta.logprob_dtype, [n, k], [c, k], fill=0)
        store._create("done", "uint8", [meta.num_sequences], [max(meta.num_sequences, 1)])
        # Metadata last: a store without kd_store.json is one whose creation did not finish.
        store._kv().write("kd_store.json", json.dumps(dataclasses.asdict(meta), indent=2).encode()).result()
        return store

    @classmethod
    def open(cls, path: str) -> "KDStore":
        raw = ts.KvStore.open(kvstore_url(path)).result().read("kd_store.json").result()
        if raw.state != "value":
            raise StoreError(f"no KD store at {path} (kd_store.json missing); build one with "
                             f"`python -m kd_jax.precompute --config X.yaml` and set data.store to it")
        fields = json.loads(raw.value)
        if fields.get("version") != FORMAT_VERSION:
            raise StoreError(f"{path}: store format version {fields.get('version')}, this kd_jax reads "
                             f"{FORMAT_VERSION}; rebuild it with this version's precompute")
        return cls(path, StoreMeta(**fields))

    def _kv(self) -> ts.KvStore:
        return ts.KvStore.open(self.url).result()

    def _create(self, name, dtype, shape, chunk, fill=0) -> ts.TensorStore:
        itemsize = np.dtype("uint16" if dtype == "bfloat16" else dtype).itemsize
        spec = {"driver": "zarr3", "kvstore": self.url + name + "/",
                "metadata": {"shape": shape, "data_type": dtype, "fill_value": fill,
                             "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
                             "codecs": _codecs(itemsize)}}
        self._arrays[name] = ts.open(spec, create=True, delete_existing=True).result()
        return self._arrays[name]

    def array(self, name: str) -> ts.TensorStore:
        if self._pid != os.getpid():  # forked: handles from the parent must not be used
            self._arrays, self._pid = {}, os.getpid()
        if name not in self._arrays:
            self._arrays[name] = ts.open({"driver": "zarr3", "kvstore": self.url + name + "/"}).result()
        return self._arrays[name]

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = self.array("offsets").read().result()
        return self._offsets

    # --- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.meta.num_sequences

    def read(self, i: int) -> dict[str, np.ndarray]:
        """Sequence i: tokens, role, step [n] and topk_ids, topk_logprobs [n, K], target-aligned."""
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range [0, {len(self)})")
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        names = _PER_TOKEN if self.meta.k > 0 else _PER_TOKEN[:3]
        futures = {name: self.array(name)[start:end].read() for name in names}
        out = {name: f.result() for name, f in futures.items()}
        if self.meta.k == 0:  # tokens only: empty teacher rows keep the batch layout the same
            out["topk_ids"] = np.zeros((end - start, 0), np.int32)
            out["topk_logprobs"] = np.zeros((end - start, 0), np.float32)
        return out

    # --- teacher rows and completion -------------------------------------------------------

    def write_rows(self, start: int, ids_NxK: np.ndarray, logprobs_NxK: np.ndarray) -> None:
        """Write teacher rows [start, start + N) (synchronously: completion marks follow writes)."""
        end = start + len(ids_NxK)
        a = self.array("topk_ids")[start:end].write(ids_NxK)
        b = self.array("topk_logprobs")[start:end].write(logprobs_NxK)
        a.result()
        b.result()

    def mark_chunk(self, chunk: int) -> None:
        self._kv().write(f"progress/{chunk:09d}", b"").result()

    def done_chunks(self) -> np.ndarray:
        """Boolean [num_chunks]: chunks whose teacher rows are all written."""
        done = np.full(self.meta.num_chunks, self.meta.k == 0)  # a tokens-only store has no teacher rows
        for key in self._kv().list(ts.KvStore.KeyRange("progress/", "progress0")).result():
            done[int(key.decode().split("/")[1])] = True
        return done

    def done_sequences(self, chunks_done: np.ndarray | None = None) -> np.ndarray:
        """Boolean [N_seq]: sequences all of whose chunks are complete."""
        chunks_done = self.done_chunks() if chunks_done is None else chunks_done
        c = self.meta.chunk_tokens
        first, last = self.offsets[:-1] // c, np.maximum(self.offsets[1:] - 1, self.offsets[:-1]) // c
        bad = np.concatenate([[0], np.cumsum(~chunks_done)])  # prefix count of incomplete chunks
        return (bad[last + 1] - bad[first]) == 0

    def finalize(self) -> None:
        """Write `done` from the chunk marks (process 0, after every writer finished)."""
        self.array("done")[...] = self.done_sequences().astype(np.uint8)

    @property
    def complete(self) -> bool:
        return bool(self.done_chunks().all())

    def check(self, *, vocab_size: int | None = None, k: int | None = None, tokenizer=None,
              allow_incomplete: bool = False) -> np.ndarray:
        """Fail clearly if the store does not fit the run; returns the usable sequence indices."""
        m = self.meta
        if vocab_size is not None and vocab_size < m.vocab_size:
            raise StoreError(f"store {self.path} holds teacher ids up to vocab size {m.vocab_size} but the student "
                             f"has only {vocab_size} output rows; rebuild the store with the student configured "
                             f"(student.hf_path) or pick a student that shares the teacher's tokenizer")
        if k is not None and k != m.k:
            raise StoreError(f"store {self.path} holds top-{m.k} teacher ids but the config asks for data.top_k={k}; "
                             f"set data.top_k={m.k} or rebuild the store")
        if tokenizer is not None and template_hash(tokenizer) != m.chat_template_hash:
            raise StoreError(f"store {self.path} was tokenized with a different chat template (tokenizer "
                             f"{m.tokenizer!r}); use that tokenizer or rebuild the store")
        done = self.done_sequences()
        if not done.all() and not allow_incomplete:
            raise StoreError(f"store {self.path} is incomplete: {int(done.sum())} of {len(done)} sequences have "
                             f"teacher rows. Resume `python -m kd_jax.precompute` with the same config, or pass "
                             f"allow_incomplete to train on the done part")
        return np.flatnonzero(done)

    def describe(self) -> dict[str, Any]:
        """Sequences, tokens, K, bytes on disk, bytes per token (teacher arrays), completeness."""
        sizes: dict[str, int] = {}
        if self.url.startswith("file://"):  # stat the files; other kvstores have no stat: read
            root = self.url[len("file://"):]
            for dirpath, _, files in os.walk(root):
                name = os.path.relpath(dirpath, root).split(os.sep)[0]
                sizes[name] = sizes.get(name, 0) + sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        else:
            kv = self._kv()
            for key in kv.list().result():
                name = key.decode().split("/")[0]
                sizes[name] = sizes.get(name, 0) + len(kv.read(key).result().value)
        n = max(self.meta.num_tokens, 1)
        done = self.done_sequences()
        return {
            "path": self.path, "sequences": self.meta.num_sequences, "tokens": self.meta.num_tokens,
            "k": self.meta.k, "logprob_dtype": self.meta.logprob_dtype, "bytes_on_disk": sum(sizes.values()),
            "teacher_bytes_per_token": (sizes.get("topk_ids", 0) + sizes.get("topk_logprobs", 0)) / n,
            "bytes_per_token": sum(sizes.values()) / n,
            "sequences_done": int(done.sum()), "complete": bool(done.all()),
        }
