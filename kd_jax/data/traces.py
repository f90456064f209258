"""Reasoning traces in, per-token arrays out: the first stage of the KD data path.

Each trace becomes one token sequence laid out as

    <rendered generation prompt><think>\\n{reasoning}\\n</think>\\n\\n{answer}<eos>
    role:  0 ..................  1 ............................  2 ..........
    step: -1 ..................  0, 1, ... (one per paragraph)    -1 .........

The chat template renders the prompt only (with `add_generation_prompt=True`); the target is
appended here as text. Templates are written for inference and chat history, not for training
targets: several (DeepSeek-R1-Distill's among them) strip `<think>...</think>` out of assistant
turns, which would silently drop the very reasoning we distill. Prompt and target are then
tokenized as one string, and each token is labelled from the character span its first character
falls in, so BPE merges across piece boundaries never shift a label.

Traces are read as r1 rows (prompt / reasoning / answer fields), `messages` chats (the last
assistant turn's think block, or its `reasoning_content`) or `sharegpt` chats (from/value turns,
as Bespoke-Stratos and OpenThoughts ship them). Plain documents (`text`: human-written text for
healing a pruned student, continued pretraining) skip the chat template: the tokenizer's own
special tokens (a BOS where it adds one), the text, EOS; every token is a target (role 2, as an
answer; step -1; no reasoning). The tags that mark the reasoning (and optionally
the answer) in the traces are configurable (data.think_*, data.answer_*); the stored layout above
always uses kd_jax's own `<think>` tags, so training and evaluation do not depend on the source.

Two optional inputs of the objective also come from the traces. Per-step weights: a row's
`data.steps.weights_field` (one float >= 0 per reasoning step as data.steps.separator splits it), or
for rows without it `data.steps.scorer` (module:function scoring each step's text), become the
per-token `step_weight` (a reasoning token gets its step's weight; 1 elsewhere and by default).
Curriculum difficulty: `data.curriculum.difficulty_field` (e.g. a generator's `pass_rate`) becomes
one `difficulty` per trace, ascending = easiest first (1 - value when data.curriculum.easy=high).
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import importlib
import inspect
import json
import math
import os

import datasets
import numpy as np

from kd_jax.base.errors import KDJaxError
from kd_jax.base.schema import DataConfig
from kd_jax.data.roles import Role

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
CLOSE_TEXT = "\n" + THINK_CLOSE + "\n\n"  # between the reasoning and the answer
_LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class TraceError(KDJaxError, ValueError):
    """Traces that cannot be read or do not fit the configured format."""


# ---------------------------------------------------------------- loading


def load_traces(data_cfg: DataConfig) -> datasets.Dataset:
    """Reads `data_cfg.traces`: a JSONL/JSON/Parquet file, a folder of them, or a hub dataset id."""
    files = trace_files(data_cfg.traces)
    if files is not None:
        dataset = _load_files(files)
    else:
        try:
            dataset = datasets.load_dataset(data_cfg.traces, split="train")
        except Exception as e:  # the hub client raises many types; all mean "cannot get it"
            raise TraceError(f"data.traces={data_cfg.traces!r} is neither a local file or folder nor a reachable "
                             f"hub dataset ({type(e).__name__}: {_first_line(e)}); pass an existing path, or a hub "
                             "id with network access") from None
    if dataset.num_rows == 0:
        raise TraceError(f"data.traces={data_cfg.traces!r} has no rows; point it at traces with at least one")
    check_fields(dataset, data_cfg)
    return dataset


def trace_files(source: str | None) -> list[str] | None:
    """The local files `data.traces` names (sorted), or None for a hub dataset id."""
    if not source:
        raise TraceError("data.traces is not set; point it at a JSONL/Parquet file, a folder of them or a hub dataset")
    if os.path.isfile(source):
        return [source]
    if os.path.isdir(source):
        files = sorted(f for suffix in _LOCAL_SUFFIXES for f in glob.glob(os.path.join(source, "**", "*" + suffix),
                                                                         recursive=True))
        if not files:
            raise TraceError(f"data.traces={source!r} is a folder with no *.jsonl, *.json or *.parquet files in it")
        return files
    # A hub id is `name` or `owner/name`: anything else that is not on disk is a missing path.
    if (os.path.splitext(source)[1] in _LOCAL_SUFFIXES or source.startswith((".", "/", "~"))
            or source.count("/") > 1):
        raise TraceError(f"data.traces={source!r} does not exist; check the path")
    return None


def traces_fingerprint(data_cfg: DataConfig, dataset: datasets.Dataset) -> str:
    """sha256 of the traces as read: the bytes of the local files (with their names), or every row
    of a hub dataset; what the KD store records so that changed traces are never mistaken for it."""
    digest = hashlib.sha256()
    files = trace_files(data_cfg.traces)
    if files is None:
        for batch in dataset.iter(batch_size=1024):
            digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
        return digest.hexdigest()
    root = data_cfg.traces if os.path.isdir(data_cfg.traces) else os.path.dirname(data_cfg.traces)
    for path in files:
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def tokenization_inputs(data_cfg: DataConfig, dataset: datasets.Dataset) -> dict:
    """Everything the tokenized store depends on besides the tokenizer: the traces' content hash
    and the data.* settings that read, filter, cut and label them (KD store identity)."""
    fields = {"r1": ("prompt_field", "reasoning_field", "answer_field"), "messages": ("messages_field",),
              "sharegpt": ("conversations_field",), "text": ("text_field",)}[data_cfg.format.kind]
    # The identity keys keep the flat names the settings had when stores first recorded them
    # (data.format, data.step_separator, data.overlong, ...), so a store written before they moved
    # into sections (data.format.kind, data.steps.separator, data.filter.overlong) still matches.
    fmt, steps, filt = data_cfg.format, data_cfg.steps, data_cfg.filter
    values = {"format": fmt.kind, **{k: getattr(fmt, k) for k in fields}, "think_open": fmt.think_open,
              "think_close": fmt.think_close, "answer_open": fmt.answer_open, "answer_close": fmt.answer_close,
              "step_separator": steps.separator, "seq_len": data_cfg.seq_len, "overlong": filt.overlong,
              "min_reasoning_tokens": filt.min_reasoning_tokens, "max_reasoning_tokens": filt.max_reasoning_tokens}
    inputs = {"traces": traces_fingerprint(data_cfg, dataset), **{f"data.{k}": v for k, v in values.items()}}
    # The per-step weights and difficulties, recorded only when used, so that stores built without
    # them keep their identity: the traces' hash covers the values, these keys where they are read.
    if data_cfg.steps.weights_field and data_cfg.steps.weights_field in dataset.column_names:
        inputs["data.step_weights_field"] = data_cfg.steps.weights_field
    if data_cfg.steps.scorer:
        inputs["data.step_scorer"] = f"{data_cfg.steps.scorer}@{_source_hash(step_scorer(data_cfg.steps.scorer))}"
    if data_cfg.curriculum.difficulty_field:
        inputs["data.curriculum_difficulty_field"] = data_cfg.curriculum.difficulty_field
        inputs["data.curriculum_easy"] = data_cfg.curriculum.easy
    return inputs


def step_scorer(spec: str):
    """The function `module.path:function` of data.steps.scorer."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise TraceError(f"data.steps.scorer={spec!r}: cannot import {name!r} from {module!r} ({e}); use an "
                         f"importable module.path:function, or null") from None


def _source_hash(fn) -> str:
    """12 hex digits of sha256 of a function's source (its name when the source is not available):
    a changed scorer is a changed store input."""
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        text = getattr(fn, "__qualname__", repr(fn))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _load_files(files: list[str]) -> datasets.Dataset:
    by_builder: dict[str, list[str]] = {}
    for path in files:
        builder = _LOCAL_SUFFIXES.get(os.path.splitext(path)[1])
        if builder is None:
            raise TraceError(f"{path!r}: unsupported trace file type; use .jsonl, .json or .parquet")
        by_builder.setdefault(builder, []).append(path)
    parts = []
    for builder, paths in by_builder.items():
        if builder == "json":  # Arrow keeps invalid UTF-8 and fails only when the row is read
            for path in paths:
                _check_utf8(path)
        try:
            parts.append(datasets.load_dataset(builder, data_files=paths, split="train"))
        except Exception as e:  # Arrow, UnicodeDecodeError, StopIteration (empty file): find the bad line
            if builder == "json":
                for path in paths:
                    _check_json_lines(path)
            raise TraceError(f"cannot read the traces {', '.join(paths)} ({type(e).__name__}: {_first_line(e)}); "
                             f"check that they are valid {builder.upper()}") from None
    try:
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except ValueError as e:
        raise TraceError(f"the JSON and Parquet trace files have different columns ({_first_line(e)}); keep one "
                         "schema") from None


def _check_utf8(path: str) -> None:
    """Streams `path` through a UTF-8 decoder (GB/s); on a bad byte, finds its line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        try:
            for block in iter(lambda: f.read(1 << 24), b""):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            _check_json_lines(path)


def _check_json_lines(path: str) -> None:
    """Raises TraceError naming the file and line when `path` is empty, not UTF-8 or not JSON (lines)."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise TraceError(f"trace file {path} is empty; remove it or fill it with one JSON object per line")
    try:
        json.loads(raw)
        return  # one JSON document (a .json list of rows): valid
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TraceError(f"{path}:{number}: not UTF-8 text (byte {line[e.start]:#04x} at column {e.start + 1}); "
                             f"re-encode the file as UTF-8 or remove that line") from None
        if text.strip():
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                raise TraceError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno}); fix or remove "
                                 f"that line (one JSON object per line)") from None


def check_fields(dataset: datasets.Dataset, data_cfg: DataConfig) -> None:
    """Raises TraceError naming the config key when a configured field is not a column."""
    if data_cfg.format.kind == "r1":
        wanted = {"format.prompt_field": data_cfg.format.prompt_field,
                  "format.reasoning_field": data_cfg.format.reasoning_field,
                  "format.answer_field": data_cfg.format.answer_field}
    elif data_cfg.format.kind == "sharegpt":
        wanted = {"format.conversations_field": data_cfg.format.conversations_field}
    elif data_cfg.format.kind == "text":
        wanted = {"format.text_field": data_cfg.format.text_field}
    else:
        wanted = {"format.messages_field": data_cfg.format.messages_field}
    if data_cfg.curriculum.difficulty_field:
        wanted["curriculum.difficulty_field"] = data_cfg.curriculum.difficulty_field
    for key, field in wanted.items():
        if field not in dataset.column_names:
            raise TraceError(f"traces have no field {field!r} (format={data_cfg.format.kind}); available columns: "
                             f"{', '.join(dataset.column_names)}; set data.{key} to one of them (or data.format.kind)")


# ---------------------------------------------------------------- row formats


def parse_row(row: dict, data_cfg: DataConfig) -> tuple[list[dict], str, str]:
    """One dataset row -> (prompt messages, reasoning, answer), reasoning and answer stripped, the
    configured think/answer tags (data.think_*, data.answer_*) removed."""
    tags = dict(think_open=data_cfg.format.think_open, think_close=data_cfg.format.think_close)
    if data_cfg.format.kind == "messages":
        prompt, reasoning, answer = split_messages(_as_messages(row[data_cfg.format.messages_field],
                                                                data_cfg.format.messages_field), **tags)
    elif data_cfg.format.kind == "sharegpt":
        prompt, reasoning, answer = split_messages(_sharegpt_messages(row[data_cfg.format.conversations_field],
                                                                      data_cfg.format.conversations_field), **tags)
    else:
        value = row[data_cfg.format.prompt_field]
        prompt = [{"role": "user", "content": value}] if isinstance(value, str) else _as_messages(
            value, data_cfg.format.prompt_field)
        reasoning = _text(row[data_cfg.format.reasoning_field])
        # Some dumps keep the tags in the reasoning field; they are added back once by encode_example.
        if reasoning.startswith(data_cfg.format.think_open) and reasoning.endswith(data_cfg.format.think_close):
            reasoning = reasoning[len(data_cfg.format.think_open):-len(data_cfg.format.think_close)].strip()
        answer = _text(row[data_cfg.format.answer_field])
    if data_cfg.format.answer_open and answer.startswith(data_cfg.format.answer_open):
        answer = answer[len(data_cfg.format.answer_open):].strip()
    if data_cfg.format.answer_close and answer.endswith(data_cfg.format.answer_close):
        answer = answer[:-len(data_cfg.format.answer_close)].strip()
    return prompt, reasoning, answer


def _preview(value, chars: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= chars else text[:chars - 3] + "..."


def _text(value) -> str:
    """Stripped field text; None is empty, numbers (JSON answers like 42) become their text."""
    return "" if value is None else str(value).strip()


def split_messages(messages: list[dict], *, think_open: str = THINK_OPEN,
                   think_close: str = THINK_CLOSE) -> tuple[list[dict], str, str]:
    """Chat turns -> (turns before the last assistant turn, reasoning, answer) of that last turn.

    The reasoning is the turn's `reasoning_content` when it has one (DeepSeek API / OpenAI-style
    messages; `content` is then the answer), else the text between the think tags of `content`."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise TraceError(f"a chat row has no assistant turn to learn from (roles: "
                         f"{[m['role'] for m in messages]}); each row needs one (or check data.format.kind)")
    turn = messages[last]
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    content = turn["content"]
    if turn.get("reasoning_content") is not None:
        return prompt, turn["reasoning_content"].strip(), content.strip()
    if think_close not in content:
        if think_open in content:  # reasoning cut off before its end: no answer, dropped as empty_answer
            return prompt, content.split(think_open, 1)[1].strip(), ""
        return prompt, "", content.strip()
    # R1 outputs may lack the opening tag when the template wrote it; text before the close is reasoning.
    reasoning, answer = content.split(think_close, 1)
    return prompt, reasoning.split(think_open, 1)[-1].strip(), answer.strip()


def _as_messages(value, field: str) -> list[dict]:
    """role/content turns (plus an assistant turn's `reasoning_content` when it is a string)."""
    def is_turn(m) -> bool:
        return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
    if not isinstance(value, list) or not all(is_turn(m) for m in value):
        hint = ("; these are from/value turns: set data.format.kind=sharegpt"
                if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]
                else "")
        raise TraceError(f"field {field!r} must be a list of {{'role': str, 'content': str}} turns, got "
                         f"{str(value)[:200]!r}{hint}")
    turns = []
    for m in value:
        turn = {"role": m["role"], "content": m["content"]}
        if isinstance(m.get("reasoning_content"), str):
            turn["reasoning_content"] = m["reasoning_content"]
        turns.append(turn)
    return turns


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


def _sharegpt_messages(value, field: str) -> list[dict]:
    """ShareGPT turns ({"from": human|gpt|system, "value": str}) -> role/content turns."""
    def is_turn(m) -> bool:
        return isinstance(m, dict) and m.get("from") in _SHAREGPT_ROLES and isinstance(m.get("value"), str)
    if not isinstance(value, list) or not all(is_turn(m) for m in value):
        hint = ("; these are role/content turns: set data.format.kind=messages"
                if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0] else "")
        raise TraceError(f"field {field!r} must be a list of {{'from': human|gpt|system, 'value': str}} turns, "
                         f"got {str(value)[:200]!r}{hint}")
    return [{"role": _SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in value]


# ---------------------------------------------------------------- encoding


@dataclasses.dataclass
class Encoded:
    """One tokenized trace; all arrays are [n] over the same tokens."""

    tokens: np.ndarray  # int32 token ids
    role: np.ndarray  # uint8: 0 prompt, 1 reasoning (tags included), 2 answer (EOS included)
    step: np.ndarray  # int32 reasoning step index; -1 outside the reasoning
    reasoning_span: tuple[int, int]  # [start, end) token indices of the reasoning text, tags excluded
    step_weight: np.ndarray | None = None  # float32 [n]: the token's step weight (reasoning), 1 elsewhere; None = all 1
    difficulty: float | None = None  # the curriculum's difficulty of the trace (data.curriculum.difficulty_field)

    @property
    def num_reasoning_tokens(self) -> int:
        return self.reasoning_span[1] - self.reasoning_span[0]

    def __len__(self) -> int:
        return len(self.tokens)


def render_prompt(tokenizer, prompt_messages: list[dict]) -> str:
    """The chat template's text for the prompt turns plus the assistant generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise TraceError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template; use an "
                         "instruct/chat tokenizer or set tokenizer.chat_template")
    text = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    if text.rstrip().endswith(THINK_CLOSE):
        raise TraceError("the chat template's generation prompt already closes a think block (e.g. Qwen3 with "
                         "enable_thinking=False); use a template that leaves the reasoning to the assistant")
    return text


def encode_example(tokenizer, prompt_messages: list[dict], reasoning: str, answer: str, *,
                   step_separator: str = "\n\n") -> Encoded:
    """Tokenizes one trace: the template renders the prompt, the target is appended as text.

    Returns tokens int32 [n], role uint8 [n], step int32 [n] (see the module docstring), the EOS
    id last; reasoning and answer are used as given (parse_row strips them).
    """
    return _encode_rendered(tokenizer, render_prompt(tokenizer, prompt_messages), reasoning, answer, step_separator)


def _encode_rendered(tokenizer, prompt_text: str, reasoning: str, answer: str, step_separator: str) -> Encoded:
    if tokenizer.eos_token_id is None:
        raise TraceError("tokenizer has no eos_token_id; set tokenizer.eos_token so the student learns to stop")
    # DeepSeek-R1-Distill and some Qwen3 templates open the think block themselves; that tag is
    # then prompt (role 0): at inference the template writes it, the student never predicts it.
    opening = THINK_OPEN + "\n"
    if prompt_text.endswith(THINK_OPEN + "\n"):
        opening = ""
    elif prompt_text.endswith(THINK_OPEN):
        opening = "\n"

    # Character spans in token order: (text, role, step). Pieces 2 .. len-3 are the paragraphs.
    paragraphs = reasoning.split(step_separator) if step_separator else [reasoning]
    last_step = len(paragraphs) - 1
    pieces = [(prompt_text, Role.PROMPT, -1), (opening, Role.REASONING, 0)]
    pieces += [(p + (step_separator if k < last_step else ""), Role.REASONING, k) for k, p in enumerate(paragraphs)]
    pieces += [(CLOSE_TEXT, Role.REASONING, last_step), (answer, Role.ANSWER, -1)]
    text = "".join(piece for piece, _, _ in pieces)
    piece_ends = np.cumsum([len(piece) for piece, _, _ in pieces])

    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except NotImplementedError as e:  # slow (Python) tokenizers have no offsets
        raise TraceError("encoding traces needs a fast tokenizer (offsets); load it with use_fast=True") from e
    starts_N = np.asarray([start for start, _ in encoding["offset_mapping"]], dtype=np.int64)
    # side="right": a token starting exactly at a piece's end belongs to the next (non-empty) piece.
    piece_N = np.minimum(np.searchsorted(piece_ends, starts_N, side="right"), len(pieces) - 1)
    roles = np.asarray([role for _, role, _ in pieces], dtype=np.uint8)
    steps = np.asarray([step for _, _, step in pieces], dtype=np.int32)
    # Tokens are in text order, so piece_N is sorted and each piece's tokens are one run.
    reasoning_span = (int(np.searchsorted(piece_N, 2)), int(np.searchsorted(piece_N, len(pieces) - 2)))

    tokens = np.append(np.asarray(encoding["input_ids"], dtype=np.int32), np.int32(tokenizer.eos_token_id))
    return Encoded(tokens=tokens, role=np.append(roles[piece_N], np.uint8(Role.ANSWER)),
                   step=np.append(steps[piece_N], np.int32(-1)), reasoning_span=reasoning_span)


def encode_text(tokenizer, text: str) -> Encoded:
    """One plain document (data.format.kind=text): the tokenizer's special tokens as it adds them
    (Llama 3's BOS; none for SmolLM2 or Qwen), the text, then EOS; every token role 2 (a target),
    step -1, an empty reasoning span."""
    if tokenizer.eos_token_id is None:
        raise TraceError("tokenizer has no eos_token_id; set tokenizer.eos_token so documents are separated")
    ids = tokenizer(text, verbose=False)["input_ids"]
    tokens = np.asarray([*ids, tokenizer.eos_token_id], dtype=np.int32)
    return Encoded(tokens=tokens, role=np.full(len(tokens), Role.ANSWER, np.uint8),
                   step=np.full(len(tokens), -1, np.int32), reasoning_span=(0, 0))


def truncate_text(example: Encoded, seq_len: int) -> Encoded:
    """A document cut to its first seq_len - 1 tokens and EOS (data.filter.overlong=truncate)."""
    kept_N = np.r_[0:seq_len - 1, len(example) - 1]
    return Encoded(tokens=example.tokens[kept_N], role=example.role[kept_N], step=example.step[kept_N],
                   reasoning_span=(0, 0))


def truncate_reasoning(example: Encoded, seq_len: int) -> Encoded | None:
    """Cuts reasoning tokens from the end of the reasoning so the example is exactly seq_len tokens.

    Keeps the prompt, the opening tag, the start of the reasoning, the closing tag and the whole
    answer + EOS; None when those alone do not fit.
    """
    start, end = example.reasoning_span
    keep = seq_len - (len(example) - example.num_reasoning_tokens)
    if keep < 0:
        return None
    keep = min(keep, end - start)
    kept_N = np.r_[0:start + keep, end:len(example)]
    step = example.step[kept_N].copy()
    # The closing tag belonged to the last step, which may be cut: it closes the last step kept.
    close_N = np.flatnonzero(example.role[kept_N[start + keep:]] == Role.REASONING) + start + keep
    step[close_N] = step[start + keep - 1] if keep else 0
    return Encoded(tokens=example.tokens[kept_N], role=example.role[kept_N], step=step,
                   reasoning_span=(start, start + keep))


# ---------------------------------------------------------------- the filtered set


@dataclasses.dataclass
class FilterReport:
    """How many traces each filter removed (or truncated), in the order the filters run."""

    read: int = 0
    empty_answer: int = 0
    empty_document: int = 0  # data.format.kind=text: the text field missing, null or blank
    duplicate: int = 0
    reasoning_too_short: int = 0
    reasoning_too_long: int = 0
    overlong_dropped: int = 0
    overlong_truncated: int = 0  # kept, with the end of the reasoning cut
    kept: int = 0

    def __str__(self) -> str:
        lines = [f"traces: read {self.read}, kept {self.kept}"]
        for field in dataclasses.fields(self):
            count = getattr(self, field.name)
            if field.name not in ("read", "kept") and count:
                lines.append(f"  {field.name}: {count}")
        return "\n".join(lines)


def encode_traces(dataset: datasets.Dataset, tokenizer, data_cfg: DataConfig) -> tuple[list[Encoded], FilterReport]:
    """Parses, filters and tokenizes every row, keeping the input order of the survivors."""
    check_fields(dataset, data_cfg)
    if data_cfg.format.kind == "text":
        return _encode_documents(dataset, tokenizer, data_cfg)
    report = FilterReport()
    seen: set[bytes] = set()
    encoded = []
    for index, row in enumerate(dataset):
        report.read += 1
        try:
            prompt_messages, reasoning, answer = parse_row(row, data_cfg)
        except TraceError as e:
            raise TraceError(f"trace row {index}: {e}") from None
        if not answer:
            report.empty_answer += 1
            continue
        prompt_text = render_prompt(tokenizer, prompt_messages)
        # A digest, not the strings: the set must stay small for millions of long traces.
        key = hashlib.sha256("\0".join((prompt_text, reasoning, answer)).encode()).digest()
        if key in seen:
            report.duplicate += 1
            continue
        seen.add(key)
        example = _encode_rendered(tokenizer, prompt_text, reasoning, answer, data_cfg.steps.separator)
        if example.num_reasoning_tokens < data_cfg.filter.min_reasoning_tokens:
            report.reasoning_too_short += 1
            continue
        if data_cfg.filter.max_reasoning_tokens is not None and example.num_reasoning_tokens > data_cfg.filter.max_reasoning_tokens:
            report.reasoning_too_long += 1
            continue
        if len(example) > data_cfg.seq_len:
            example = truncate_reasoning(example, data_cfg.seq_len) if data_cfg.filter.overlong == "truncate" else None
            if example is None:
                report.overlong_dropped += 1
                continue
            report.overlong_truncated += 1
        weights = step_weights(row, index, reasoning, data_cfg)
        if weights is not None:
            example.step_weight = token_step_weights(example, weights)
        if data_cfg.curriculum.difficulty_field:
            example.difficulty = trace_difficulty(row, index, data_cfg)
        encoded.append(example)
    report.kept = len(encoded)
    return encoded, report


def _encode_documents(dataset: datasets.Dataset, tokenizer, data_cfg: DataConfig) -> tuple[list[Encoded], FilterReport]:
    """encode_traces for data.format.kind=text: empty and repeated documents dropped, overlong ones
    dropped or cut (data.filter.overlong); the reasoning-length filters do not apply."""
    report, seen, encoded = FilterReport(), set(), []
    for index, row in enumerate(dataset):
        report.read += 1
        value = row[data_cfg.format.text_field]
        if value is not None and not isinstance(value, str):
            raise TraceError(f"trace row {index}: data.format.text_field {data_cfg.format.text_field!r} holds "
                             f"{type(value).__name__} {_preview(value)}, not a string; a document is one string: "
                             f"join its pieces into one, or point data.format.text_field at a column of text")
        text = _text(value)
        if not text:
            report.empty_document += 1
            continue
        if (key := hashlib.sha256(text.encode()).digest()) in seen:
            report.duplicate += 1
            continue
        seen.add(key)
        example = encode_text(tokenizer, text)
        if len(example) > data_cfg.seq_len:
            if data_cfg.filter.overlong != "truncate":
                report.overlong_dropped += 1
                continue
            example = truncate_text(example, data_cfg.seq_len)
            report.overlong_truncated += 1
        if data_cfg.curriculum.difficulty_field:
            example.difficulty = trace_difficulty(row, index, data_cfg)
        encoded.append(example)
    report.kept = len(encoded)
    return encoded, report


def step_weights(row: dict, index: int, reasoning: str, data_cfg: DataConfig) -> np.ndarray | None:
    """float64 [steps]: the row's weight of each reasoning step (split by data.steps.separator), from
    data.steps.weights_field, else data.steps.scorer; None when neither gives any (every step weighs 1)."""
    steps = reasoning.split(data_cfg.steps.separator) if data_cfg.steps.separator else [reasoning]
    field = data_cfg.steps.weights_field
    given = row.get(field) if field else None
    if given is not None:
        if not isinstance(given, (list, tuple)):
            raise TraceError(f"trace row {index}: field {field!r} (data.steps.weights_field) must be a list of "
                             f"{len(steps)} numbers, one per reasoning step, got {str(given)[:100]!r}")
        if len(given) != len(steps):
            raise TraceError(f"trace row {index}: {len(steps)} reasoning steps (split by data.steps.separator="
                             f"{data_cfg.steps.separator!r}) but {field!r} holds {len(given)} weights; give one "
                             f"weight per step")
        source = f"field {field!r}"
    elif data_cfg.steps.scorer:
        scorer = step_scorer(data_cfg.steps.scorer)
        given = []
        for k, text in enumerate(steps):
            try:
                given.append(scorer(text, k, row))
            except Exception as e:  # the user's function: any failure names the trace and step
                raise TraceError(f"trace row {index}: data.steps.scorer={data_cfg.steps.scorer!r} failed on step {k} "
                                 f"({type(e).__name__}: {_first_line(e)})") from None
        source = f"data.steps.scorer={data_cfg.steps.scorer!r}"
    else:
        return None
    values = [_number(w) for w in given]
    bad = [w for w, v in zip(given, values) if v is None or v < 0]
    if bad:
        raise TraceError(f"trace row {index}: step weights from {source} must be finite numbers >= 0, got "
                         f"{bad[0]!r}")
    return np.asarray(values, np.float64)


def _number(value) -> float | None:
    """A finite real number as a float (numpy scalars included); None for anything else."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def token_step_weights(example: Encoded, weights: np.ndarray) -> np.ndarray:
    """float32 [n]: each reasoning token's step weight (tags included, after any truncation), 1 on
    prompt and answer tokens (the answer's weight is loss.answer_weight)."""
    out = np.ones(len(example), np.float32)
    reasoning = example.role == Role.REASONING
    out[reasoning] = weights[example.step[reasoning]]
    return out


def trace_difficulty(row: dict, index: int, data_cfg: DataConfig) -> float:
    """The trace's curriculum difficulty, ascending = easier first: the field's value, or 1 - value
    when data.curriculum.easy=high (a pass rate of 0.9 is easier than one of 0.2)."""
    field = data_cfg.curriculum.difficulty_field
    value = _number(row.get(field))
    if value is None:
        raise TraceError(f"trace row {index}: field {field!r} (data.curriculum.difficulty_field) must be a finite "
                         f"number, got {row.get(field)!r}")
    return 1.0 - value if data_cfg.curriculum.easy == "high" else value


def stored_extras(encoded: list[Encoded]) -> dict[str, np.ndarray]:
    """The store's optional arrays for these traces: `step_weight` float32 [N_tok] when a trace has
    step weights, `difficulty` float32 [N_seq] when they have difficulties (KDStore.create)."""
    out = {}
    if any(e.step_weight is not None for e in encoded):
        out["step_weight"] = np.concatenate([np.ones(len(e), np.float32) if e.step_weight is None
                                             else e.step_weight for e in encoded])
    if encoded and encoded[0].difficulty is not None:
        out["difficulty"] = np.asarray([e.difficulty for e in encoded], np.float32)
    return out
