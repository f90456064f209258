"""The KD store: tokenized traces and the teacher's top-K next-token log-probs, as zarr v3 arrays
through TensorStore, at any kvstore path (a local folder, gs://bucket/path, memory:// for tests).

Ragged layout: sequences are concatenated on the token axis and `offsets` says where each begins.

  tokens [N_tok] int32, role [N_tok] uint8, step [N_tok] int32, offsets [N_seq + 1] int64,
  topk_ids [N_tok, K] int32, topk_logprobs [N_tok, K] float16|bfloat16

(with StoreMeta.targets "sampled", the K slots hold the unique ids of K draws from the teacher and
log(count / K) instead of its top-K and their log-probs: the same layout),

and two optional arrays, written only when the traces carry them (kd_jax.data.traces) and listed
in checksums.json like the other token-side arrays; a store without them reads as their default:

  step_weight [N_tok] float32 (the token's reasoning-step weight; 1), difficulty [N_seq] float32
  (the curriculum's order, ascending = easiest; absent: the pipeline uses reasoning length)

Alignment ("target"): every per-token array describes the token at its own index. Row t of
`topk_*` is the teacher's distribution OF token t given the tokens before it in its sequence,
just as role[t] and step[t] are token t's. A consumer that predicts token t from position t-1
shifts all of them together; nothing can be off by one relative to anything else. The first row
of every sequence has no prediction: ids -1, log-probs 0 (it is a prompt token, never supervised).

Writers own whole chunks of the token axis (`chunk_tokens`), so processes never write the same
chunk; a chunk is marked complete by the key `progress/<chunk>` once all its rows are in. A
sequence is done when every chunk it touches is complete.

Nothing lost, nothing silent (format version 2): the mark holds the crc32 of the chunk's teacher
rows as written, and `checksums.json` those of the token-side arrays (complete at creation). The
first time a process reads from a chunk it reads the whole chunk of each array once and checks it,
so a missing (read back as the fill value), altered or undecodable chunk file fails with the
array, chunk and sequences concerned. kd_store.json also records what the store was built from:
the tokenizer's fingerprint (vocab, merges, normalization) and the inputs (the traces' content
hash and every data.* setting that changes the tokens), so a store is never reused for other ones.
Version-1 stores (no checksums, no fingerprints) still open and train, without those checks.

K = 0 is a tokens-only store (`data.top_k=0` in precompute): no teacher arrays, complete at
creation, for hard-label training (loss.alpha=0), e.g. of the demo's teacher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import zlib
from typing import Any

import numpy as np
import tensorstore as ts

from kd_jax.base.errors import KDJaxError
from kd_jax.base.schema import TARGETS, Config

FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # 1: no checksums or fingerprints; read without those checks
_LOGPROB_DTYPES = ("float16", "bfloat16")
# kd_store.json fields older versions wrote and this one no longer has: dropped when a store is opened.
_RETIRED_FIELDS = ("alignment",)  # always "target" (the module doc's "Alignment")
log = logging.getLogger("kd_jax.store")


class StoreError(KDJaxError, ValueError):
    """A KD store that cannot be used as asked, with what is wrong and what to do."""


# Seconds a store has to answer when it is opened (the kvstore, kd_store.json, an array's metadata) before it
# counts as unreachable: an unreachable gs:// bucket (no network, no credentials) would otherwise wait forever.
OPEN_TIMEOUT_S = 60.0


def _answered(future, url: str, what: str):
    """`future.result()`, or a StoreError naming `url` when it has not answered within OPEN_TIMEOUT_S."""
    try:
        return future.result(timeout=OPEN_TIMEOUT_S)
    except TimeoutError:
        raise StoreError(f"KD store {url} did not answer within {OPEN_TIMEOUT_S:g} s ({what}); check the network and "
                         f"credentials (gs://: `gcloud auth application-default login`) or use a local copy") from None


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
    version: int = FORMAT_VERSION
    tokenizer_fingerprint: str = ""  # sha256 of the tokenizer's vocab, merges and normalization ("" in v1)
    inputs: dict = dataclasses.field(default_factory=dict)  # what the tokens came from: traces hash, data.* settings
    # What the teacher rows are (absent in stores written before them: top-K at T = 1). "topk": the
    # teacher's k most likely ids and their log-probs at T = 1; "sampled": k draws with replacement
    # from softmax(logits / sample_temperature) over ids < vocab_size, the unique ids drawn (padding
    # -1) and log(count / k), so exp of a row sums to 1 (to the log-prob dtype's rounding).
    targets: str = "topk"
    sample_temperature: float = 1.0  # sampled: the draws' teacher temperature (1 for top-K)
    sample_seed: int = 0  # sampled: the draws' seed (0 for top-K)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_tokens // self.chunk_tokens)


def template_hash(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    return hashlib.sha256(template.encode()).hexdigest() if template else ""


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what maps text to ids: a fast tokenizer's backend JSON (vocab, merges, added tokens,
    normalizer, pre-tokenizer) without the per-call truncation/padding settings, else the vocab."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def identity_changes(meta: StoreMeta, wanted: dict[str, Any]) -> list[str]:
    """What differs between what a store was built from (`meta`) and what a precompute run would
    build (`wanted`: the StoreMeta fields tokenizer, tokenizer_fingerprint, teacher,
    teacher_revision, k, logprob_dtype, inputs, and optionally targets, sample_temperature,
    sample_seed: absent = top-K at T = 1), as `key old -> new` texts; [] for a version-1 store,
    which records none of it."""
    if meta.version < 2:
        return []
    changes = []
    for key in sorted(set(meta.inputs) | set(wanted["inputs"])):
        old, new = meta.inputs.get(key), wanted["inputs"].get(key)
        if old != new:
            changes.append("traces changed (content hash)" if key == "traces"
                           else f"{key} {_shown(old)} -> {_shown(new)}")
    if meta.tokenizer_fingerprint != wanted["tokenizer_fingerprint"]:
        changes.append(f"tokenizer {meta.tokenizer!r} -> {wanted['tokenizer']!r} (other vocab/merges)")
    if (meta.teacher, meta.teacher_revision) != (wanted["teacher"], wanted["teacher_revision"]):
        changes.append(f"teacher {meta.teacher}@{meta.teacher_revision} -> "
                       f"{wanted['teacher']}@{wanted['teacher_revision']}")
    if meta.k != wanted["k"]:
        changes.append(f"data.top_k {meta.k} -> {wanted['k']}")
    if meta.k and meta.logprob_dtype != wanted["logprob_dtype"]:
        changes.append(f"precompute.logprob_dtype {meta.logprob_dtype} -> {wanted['logprob_dtype']}")
    if meta.k:  # what the teacher rows are: top-K, or draws at a temperature from a seed
        for key, default in (("targets", "topk"), ("sample_temperature", 1.0), ("sample_seed", 0)):
            old, new = getattr(meta, key), wanted.get(key, default)
            if old != new:
                changes.append(f"precompute.{key} {_shown(old)} -> {_shown(new)}")
    return changes


def _crc(values: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(values).tobytes())


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
_OPTIONAL = ("step_weight", "difficulty")  # float32 [N_tok] / [N_seq], only when the traces carry them
_TEACHER = ("topk_ids", "topk_logprobs")  # complete when their chunk's progress mark is written
# (store url, array, chunk) whose bytes this process has checked against their checksum.
_VERIFIED: set[tuple[str, str, int]] = set()
_VERIFYING: dict[tuple[str, str, int], threading.Lock] = {}  # one lock per chunk being verified
os.register_at_fork(after_in_child=_VERIFYING.clear)  # a lock held at fork time would never be released
_WARNED_V1: set[str] = set()


class KDStore:
    """Reader and writer of one KD store. Arrays are opened lazily on first use, so an instance can
    be built in a parent process and used in forked workers (TensorStore is not fork-safe).

    Reads are verified (version 2): the first read from a chunk in a process reads that chunk of
    every array read whole and checks its crc32, i.e. each chunk is read in full once per process
    (Grain worker processes each verify the chunks they touch); later reads cost nothing extra."""

    def __init__(self, path: str, meta: StoreMeta):
        self.path, self.url, self.meta = path, kvstore_url(path), meta
        self._arrays: dict[str, ts.TensorStore] = {}
        self._offsets: np.ndarray | None = None
        self._sums: dict[str, list[int]] | None = None  # token-side chunk checksums (checksums.json)
        self._marks: dict[int, dict[str, int]] = {}  # teacher chunk checksums (progress marks) read so far
        self._pid = os.getpid()

    @property
    def verified(self) -> bool:
        """Whether reads are checked against chunk checksums (stores of format version 2)."""
        return self.meta.version >= 2

    # --- creating and opening --------------------------------------------------------------

    @classmethod
    def create(cls, path: str, meta: StoreMeta, tokens: np.ndarray, role: np.ndarray, step: np.ndarray,
               offsets: np.ndarray, *, step_weight: np.ndarray | None = None,
               difficulty: np.ndarray | None = None) -> "KDStore":
        """Write the token-side arrays and their checksums, create empty teacher arrays (process 0).
        `step_weight` float32 [N_tok] and `difficulty` float32 [N_seq] are optional (module doc)."""
        if meta.logprob_dtype not in _LOGPROB_DTYPES:
            raise StoreError(f"logprob_dtype={meta.logprob_dtype!r}; use one of {_LOGPROB_DTYPES}")
        if meta.targets not in TARGETS:
            raise StoreError(f"targets={meta.targets!r}; use one of {TARGETS}")
        store = cls(path, meta)
        _VERIFIED.difference_update({v for v in _VERIFIED if v[0] == store.url})  # a store rebuilt here
        n, k, c = meta.num_tokens, meta.k, meta.chunk_tokens
        offsets = np.asarray(offsets, np.int64)
        store._create("offsets", "int64", [meta.num_sequences + 1], [max(meta.num_sequences + 1, 1)])[...] = offsets
        sums = {"offsets": [_crc(offsets)]}
        per_token = [("tokens", tokens), ("role", role), ("step", step)]
        if step_weight is not None:
            per_token.append(("step_weight", np.asarray(step_weight, np.float32)))
        for name, values in per_token:
            if len(values) != n:
                raise StoreError(f"array {name!r} has {len(values)} rows; the store has {n} tokens")
            store._create(name, str(values.dtype), [n], [c])[...] = values
            sums[name] = [_crc(values[i:i + c]) for i in range(0, n, c)]
        if difficulty is not None:
            difficulty = np.asarray(difficulty, np.float32)
            if len(difficulty) != meta.num_sequences:
                raise StoreError(f"difficulty has {len(difficulty)} entries; the store has {meta.num_sequences} "
                                 f"sequences")
            store._create("difficulty", "float32", [meta.num_sequences], [max(meta.num_sequences, 1)])[...] = difficulty
            sums["difficulty"] = [_crc(difficulty)]
        if k > 0:  # k = 0: a tokens-only store (hard-label training, no teacher)
            store._create("topk_ids", "int32", [n, k], [c, k], fill=-1)
            store._create("topk_logprobs", meta.logprob_dtype, [n, k], [c, k], fill=0)
        kv = store._kv()
        kv.write("checksums.json", json.dumps(sums).encode()).result()
        # Metadata last: a store without kd_store.json is one whose creation did not finish.
        kv.write("kd_store.json", json.dumps(dataclasses.asdict(meta), indent=2).encode()).result()
        return store

    @staticmethod
    def exists(path: str) -> bool:
        """Whether a store's creation finished at `path` (its kd_store.json is written last)."""
        url = kvstore_url(path)
        kv = _answered(ts.KvStore.open(url), url, "opening it")
        return _answered(kv.read("kd_store.json"), url, "reading kd_store.json").state == "value"

    @classmethod
    def open(cls, path: str) -> "KDStore":
        url = kvstore_url(path)
        raw = _answered(_answered(ts.KvStore.open(url), url, "opening it").read("kd_store.json"), url,
                        "reading kd_store.json")
        if raw.state != "value":
            raise StoreError(f"no KD store at {path} (kd_store.json missing); build one with "
                             f"`python -m kd_jax.precompute --config X.yaml` and set data.store to it")
        fields = json.loads(raw.value)
        if fields.get("version") not in _READABLE_VERSIONS:
            raise StoreError(f"{path}: store format version {fields.get('version')}, this kd_jax reads "
                             f"{', '.join(map(str, _READABLE_VERSIONS))}; rebuild it with this version's precompute")
        store = cls(path, StoreMeta(**{k: v for k, v in fields.items() if k not in _RETIRED_FIELDS}))
        if not store.verified and store.url not in _WARNED_V1:
            _WARNED_V1.add(store.url)
            log.warning("KD store %s is format version %d: no chunk checksums, tokenizer or input fingerprints, "
                        "so its reads are not verified and a changed tokenizer/traces go unnoticed; rebuilding it "
                        "with this precompute adds them", path, store.meta.version)
        return store

    def _kv(self) -> ts.KvStore:
        return _answered(ts.KvStore.open(self.url), self.url, "opening it")

    def _create(self, name, dtype, shape, chunk, fill=0) -> ts.TensorStore:
        itemsize = np.dtype("uint16" if dtype == "bfloat16" else dtype).itemsize
        spec = {"driver": "zarr3", "kvstore": self.url + name + "/",
                "metadata": {"shape": shape, "data_type": dtype, "fill_value": fill,
                             "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
                             "codecs": _codecs(itemsize)}}
        self._arrays[name] = ts.open(spec, create=True, delete_existing=True).result()
        return self._arrays[name]

    def array(self, name: str) -> ts.TensorStore:
        """The raw TensorStore array (unverified reads: use read / read_range to read data)."""
        if self._pid != os.getpid():  # forked: handles from the parent must not be used
            self._arrays, self._pid = {}, os.getpid()
        if name not in self._arrays:
            self._arrays[name] = _answered(ts.open({"driver": "zarr3", "kvstore": self.url + name + "/"}), self.url,
                                           f"opening array {name!r}")
        return self._arrays[name]

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            offsets = self._read_whole("offsets", 0, slice(None))
            if self.verified and _crc(offsets) != self._token_sums()["offsets"][0]:
                raise StoreError(f"store {self.path}: array 'offsets' does not match its checksum (chunk file "
                                 f"missing or altered); rebuild the store (delete it, re-run precompute)")
            self._offsets = offsets
        return self._offsets

    def has(self, name: str) -> bool:
        """Whether the store holds optional array `name` (step_weight, difficulty): listed in
        checksums.json; a version-1 store has neither."""
        return name in _OPTIONAL and self.verified and name in self._token_sums()

    @property
    def difficulty(self) -> np.ndarray | None:
        """float32 [N_seq]: the stored curriculum difficulty (ascending = easiest), or None."""
        if not self.has("difficulty"):
            return None
        values = self._read_whole("difficulty", 0, slice(None))
        if _crc(values) != self._token_sums()["difficulty"][0]:
            raise StoreError(f"store {self.path}: array 'difficulty' does not match its checksum (chunk file "
                             f"missing or altered); rebuild the store (delete it, re-run precompute)")
        return values

    # --- verification ----------------------------------------------------------------------

    def _token_sums(self) -> dict[str, list[int]]:
        if self._sums is None:
            raw = self._kv().read("checksums.json").result()
            if raw.state != "value":
                raise StoreError(f"store {self.path}: checksums.json is missing (format version 2 writes it at "
                                 f"creation); rebuild the store (delete it, re-run precompute)")
            self._sums = json.loads(raw.value)
        return self._sums

    def _expected(self, name: str, chunk: int) -> int:
        if name not in _TEACHER:
            return self._token_sums()[name][chunk]
        if chunk not in self._marks:
            raw = self._kv().read(f"progress/{chunk:09d}").result()
            if raw.state != "value":
                raise self._chunk_error(name, chunk, "has no completion mark (its teacher rows were never "
                                                     "written)")
            self._marks[chunk] = json.loads(raw.value)
        return self._marks[chunk][name]

    def _chunk_error(self, name: str, chunk: int, problem: str) -> StoreError:
        lo, hi = chunk * self.meta.chunk_tokens, min((chunk + 1) * self.meta.chunk_tokens, self.meta.num_tokens)
        first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        last = int(np.searchsorted(self.offsets, hi, side="left")) - 1
        fix = (f"delete the mark {self.path}/progress/{chunk:09d} and re-run precompute with the same config to "
               f"rewrite that chunk, or rebuild the store" if name in _TEACHER else
               "rebuild the store (delete it and re-run precompute)")
        return StoreError(f"store {self.path}: array {name!r} chunk {chunk} (tokens {lo}..{hi - 1}, sequences "
                          f"{first}..{last}) {problem}; {fix}")

    def _read_whole(self, name: str, chunk: int, rows: slice) -> np.ndarray:
        try:
            return self.array(name)[rows].read().result()
        except ValueError as e:  # TensorStore's decode errors (corrupt blosc, truncated file)
            if name in ("offsets", "difficulty"):  # per sequence: one chunk
                raise StoreError(f"store {self.path}: array {name!r} cannot be decoded ({str(e).splitlines()[0]}); "
                                 f"rebuild the store (delete it, re-run precompute)") from None
            raise self._chunk_error(name, chunk, f"cannot be decoded ({str(e).splitlines()[0][:200]})") from None

    def _verify(self, name: str, start: int, end: int) -> None:
        """Check every chunk of `name` that rows [start, end) touch, once per process."""
        c = self.meta.chunk_tokens
        for chunk in range(start // c, (max(end, start + 1) - 1) // c + 1):
            key = (self.url, name, chunk)
            if key in _VERIFIED:
                continue
            with _VERIFYING.setdefault(key, threading.Lock()):  # Grain's reader threads: one reads it whole
                if key in _VERIFIED:
                    continue
                expected = self._expected(name, chunk)
                values = self._read_whole(name, chunk, slice(chunk * c, min((chunk + 1) * c, self.meta.num_tokens)))
                if _crc(values) != expected:
                    raise self._chunk_error(name, chunk, "does not match its checksum (chunk file missing or altered)")
                _VERIFIED.add(key)

    # --- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.meta.num_sequences

    def read_range(self, name: str, start: int, end: int) -> np.ndarray:
        """Rows [start, end) of per-token array `name`, verified (see the class doc)."""
        if self.verified and end > start:
            self._verify(name, start, end)
        return self.array(name)[start:end].read().result()

    def read(self, i: int) -> dict[str, np.ndarray]:
        """Sequence i: tokens, role, step, step_weight [n] and topk_ids, topk_logprobs [n, K],
        target-aligned, verified (step_weight all 1 when the store has none)."""
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range [0, {len(self)})")
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        names = _PER_TOKEN if self.meta.k > 0 else _PER_TOKEN[:3]
        if self.has("step_weight"):
            names = names + ("step_weight",)
        if self.verified and end > start:
            for name in names:
                self._verify(name, start, end)
        futures = {name: self.array(name)[start:end].read() for name in names}
        out = {name: f.result() for name, f in futures.items()}
        if "step_weight" not in out:
            out["step_weight"] = np.ones(end - start, np.float32)
        if self.meta.k == 0:  # tokens only: empty teacher rows keep the batch layout the same
            out["topk_ids"] = np.zeros((end - start, 0), np.int32)
            out["topk_logprobs"] = np.zeros((end - start, 0), np.float32)
        return out

    # --- teacher rows and completion -------------------------------------------------------

    def write_chunk(self, chunk: int, ids_NxK: np.ndarray, logprobs_NxK: np.ndarray) -> None:
        """Write chunk `chunk`'s teacher rows (all of them), then its completion mark with their
        checksums: the mark follows the durable writes, so a marked chunk is a complete one."""
        start = chunk * self.meta.chunk_tokens
        ids_NxK = np.asarray(ids_NxK, np.int32)
        logprobs_NxK = np.asarray(logprobs_NxK, ts.dtype(self.meta.logprob_dtype).numpy_dtype)
        end = start + len(ids_NxK)
        a = self.array("topk_ids")[start:end].write(ids_NxK)
        b = self.array("topk_logprobs")[start:end].write(logprobs_NxK)
        a.result()
        b.result()
        sums = {"topk_ids": _crc(ids_NxK), "topk_logprobs": _crc(logprobs_NxK)}
        self._kv().write(f"progress/{chunk:09d}", json.dumps(sums).encode()).result()

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
        fingerprint = m.tokenizer_fingerprint
        if tokenizer is not None and fingerprint and tokenizer_fingerprint(tokenizer) != fingerprint:
            raise StoreError(f"store {self.path} was tokenized with tokenizer {m.tokenizer!r} (fingerprint "
                             f"{m.tokenizer_fingerprint[:12]}), but this run's tokenizer "
                             f"{getattr(tokenizer, 'name_or_path', '')!r} has other vocab/merges; set data.tokenizer "
                             f"to {m.tokenizer!r} or rebuild the store with this one")
        if tokenizer is not None and template_hash(tokenizer) != m.chat_template_hash:
            raise StoreError(f"store {self.path} was tokenized with a different chat template (tokenizer "
                             f"{m.tokenizer!r}); use that tokenizer or rebuild the store")
        done = self.done_sequences()
        if not done.all() and not allow_incomplete:
            raise StoreError(f"store {self.path} is incomplete: {int(done.sum())} of {len(done)} sequences have "
                             f"teacher rows. Resume `python -m kd_jax.precompute` with the same config, or set "
                             f"data.allow_incomplete=true to train on the done part")
        return np.flatnonzero(done)

    def check_targets(self, cfg: Config) -> None:
        """Whether the store's teacher rows can serve `cfg`'s loss. Offline, a soft loss (alpha > 0 now
        or scheduled) needs teacher rows: K > 0. A store of sampled rows (precompute.targets=sampled)
        is the teacher's distribution at its sample temperature, as empirical weights count/K: the
        offline soft loss takes it as the target of the forward KL at that temperature, never
        tempered again, with no tail bucket. (With teacher.mode=online the teacher runs in the step
        and the rows are not read.)"""
        m, loss = self.meta, cfg.loss
        if not loss.soft or cfg.teacher.mode != "offline":
            return
        if m.k == 0:
            scheduled = f" scheduled to {loss.alpha_schedule.end}" if loss.alpha_schedule.end else ""
            raise StoreError(f"store {self.path} holds tokens only (built with data.top_k=0, no teacher log-probs), "
                             f"so loss.alpha={loss.alpha}{scheduled} has no soft targets; set loss.alpha=0 and no "
                             f"alpha_schedule (hard labels only), build a store with data.top_k >= 1, or set "
                             f"teacher.mode=online (the teacher runs in the train step)")
        if m.targets != "sampled":
            return
        where = (f"store {self.path} holds {m.k} draws per token from the teacher at temperature "
                 f"{m.sample_temperature:g} (precompute.targets=sampled, precompute.sample_temperature="
                 f"{m.sample_temperature:g})")
        if loss.temperature != m.sample_temperature or loss.temperature_schedule.kind != "constant":
            scheduled = (f" with a {loss.temperature_schedule.kind} loss.temperature_schedule"
                         if loss.temperature_schedule.kind != "constant" else "")
            raise StoreError(f"{where}, but loss.temperature={loss.temperature:g}{scheduled}: the draws are the "
                             f"teacher's target at {m.sample_temperature:g} and cannot be re-tempered; set "
                             f"loss.temperature={m.sample_temperature:g} and a constant temperature_schedule, or "
                             f"rebuild the store with precompute.sample_temperature={loss.temperature:g}")
        if loss.tail:
            raise StoreError(f"{where}, but loss.tail=true: sampled rows have no mass outside them to bucket (their "
                             f"weights sum to 1); set loss.tail=false")
        if loss.divergence != "forward_kl":
            raise StoreError(f"{where}, but loss.divergence={loss.divergence!r}: only the forward KL (the "
                             f"cross-entropy to the draws) is unbiased with sampled targets; set "
                             f"loss.divergence=forward_kl, or build a top-K store (precompute.targets=topk)")

    def check_teacher_tokenizer(self, tokenizer, teacher: str, *, use: str = "online teacher",
                                harm: str = "it would grade other tokens") -> None:
        """A teacher that reads the store's token ids (an online teacher grades them; a student cut
        from a teacher keeps its embedding): its tokenizer (`tokenizer`, of the teacher folder or
        hub id `teacher`) must be the one the store was tokenized with, whatever the student is.
        `use` and `harm` name the teacher's part and what would go wrong. A version-1 store records
        no fingerprint: nothing to compare."""
        built = self.meta.tokenizer_fingerprint
        if not built:
            return
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint != built:
            raise StoreError(
                f"{use} {teacher} has another tokenizer (fingerprint {fingerprint[:12]}) than the one store "
                f"{self.path} was tokenized with ({self.meta.tokenizer!r}, {built[:12]}): {harm}; set "
                f"data.tokenizer to the teacher's (and rebuild the store), or pick a teacher of that tokenizer")

    def usable_sequences(self, cfg: Config, *, tokenizer, vocab_size: int | None = None) -> np.ndarray:
        """The store checked against a run's config; the usable sequence indices. The teacher rows
        against the loss (`check_targets`), then `check`: the student's `vocab_size` (None = not
        checked), the run's `tokenizer` (cfg.tokenizer, read by the caller) and completeness
        (data.allow_incomplete). K is the store's, whatever data.top_k says."""
        self.check_targets(cfg)
        return self.check(vocab_size=vocab_size, tokenizer=tokenizer, allow_incomplete=cfg.data.allow_incomplete)

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
            "k": self.meta.k, "targets": self.meta.targets, "logprob_dtype": self.meta.logprob_dtype,
            "bytes_on_disk": sum(sizes.values()),
            "teacher_bytes_per_token": (sizes.get("topk_ids", 0) + sizes.get("topk_logprobs", 0)) / n,
            "bytes_per_token": sum(sizes.values()) / n,
            "sequences_done": int(done.sum()), "complete": bool(done.all()),
        }
