"""Traces -> tokens: roles and steps by character span, the think-tag layout, both row formats,
every filter, and loading JSONL / Parquet / folders. A tiny in-process BPE tokenizer stands in for
a real one; one slow test uses SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import dataclasses
import itertools
import json

import datasets
import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kd_jax.base.schema import CurriculumConfig, DataConfig, FilterConfig, StepsConfig, TraceFormat
from kd_jax.data.traces import (
    TraceError,
    encode_example,
    encode_traces,
    load_traces,
    render_prompt,
    split_messages,
    stored_extras,
    tokenization_inputs,
)

EOS = "<|endoftext|>"
SPECIALS = [EOS, "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QUESTION = [{"role": "user", "content": "What is six times seven?"}]
THREE_STEPS = "first paragraph\n\nsecond paragraph\n\nthird paragraph"


def make_tokenizer(corpus: list[str], *, split_words: bool = True, template: str = CHATML):
    """A byte-level BPE trained on `corpus`; split_words=False lets merges cross whitespace."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 5, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                                     clean_up_tokenization_spaces=False)
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(["first paragraph second paragraph third paragraph", "What is six times seven? 42"])


def groups(tokenizer, example) -> list[tuple[int, int, str]]:
    """(role, step, decoded text) for each run of tokens with the same role and step."""
    runs = itertools.groupby(range(len(example.tokens)), key=lambda t: (int(example.role[t]), int(example.step[t])))
    return [(role, step, tokenizer.decode(example.tokens[list(ts)].tolist())) for (role, step), ts in runs]


def check_arrays(example):
    n = len(example.tokens)
    assert example.tokens.dtype == np.int32 and example.role.dtype == np.uint8 and example.step.dtype == np.int32
    assert example.role.shape == example.step.shape == (n,)


def assert_three_steps(tokenizer, answer: str, eos_text: str):
    """The hand-written three-paragraph trace decodes, group by (role, step), to exactly this."""
    example = encode_example(tokenizer, QUESTION, THREE_STEPS, answer)
    check_arrays(example)
    prompt = render_prompt(tokenizer, QUESTION)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert groups(tokenizer, example) == [
        (0, -1, prompt),
        (1, 0, "<think>\nfirst paragraph\n\n"),
        (1, 1, "second paragraph\n\n"),
        (1, 2, "third paragraph\n</think>\n\n"),
        (2, -1, answer + eos_text),
    ]
    return example


def test_three_paragraphs_roles_and_steps(tokenizer):
    example = assert_three_steps(tokenizer, "42", EOS)
    assert example.tokens[-1] == tokenizer.eos_token_id and example.role[-1] == 2
    start, end = example.reasoning_span
    assert tokenizer.decode(example.tokens[start:end].tolist()) == THREE_STEPS
    assert example.num_reasoning_tokens == end - start


def test_one_step_and_empty_reasoning(tokenizer):
    one = encode_example(tokenizer, QUESTION, "first paragraph\nsecond paragraph", "42")
    assert groups(tokenizer, one)[1:] == [(1, 0, "<think>\nfirst paragraph\nsecond paragraph\n</think>\n\n"),
                                          (2, -1, "42" + EOS)]
    empty = encode_example(tokenizer, QUESTION, "", "42")
    assert groups(tokenizer, empty)[1:] == [(1, 0, "<think>\n\n</think>\n\n"), (2, -1, "42" + EOS)]
    assert empty.num_reasoning_tokens == 0


def test_custom_step_separator(tokenizer):
    example = encode_example(tokenizer, QUESTION, "first paragraph\nsecond paragraph", "42", step_separator="\n")
    assert groups(tokenizer, example)[1:3] == [(1, 0, "<think>\nfirst paragraph\n"),
                                               (1, 1, "second paragraph\n</think>\n\n")]


def test_token_straddling_a_boundary_takes_its_first_character():
    # No pre-tokenizer split: BPE learns "ab\n\ncd" as one token across the step-0/step-1 boundary.
    tokenizer = make_tokenizer(["ab\n\ncd"], split_words=False)
    example = encode_example(tokenizer, [{"role": "user", "content": "q"}], "ab\n\ncd", "x")
    pieces = [tokenizer.decode([int(t)]) for t in example.tokens]
    straddler = pieces.index("ab\n\ncd")
    assert (example.role[straddler], example.step[straddler]) == (1, 0)
    assert tokenizer.decode(example.tokens[example.step == 1].tolist()) == "\n</think>\n\n"


@pytest.mark.parametrize("opening", ["<think>\n", "<think>"])
def test_template_that_opens_the_think_block(opening):
    template = CHATML.replace("assistant\n{% endif %}", "assistant\n" + opening + "{% endif %}")
    tokenizer = make_tokenizer(["first paragraph second paragraph third paragraph"], template=template)
    example = encode_example(tokenizer, QUESTION, THREE_STEPS, "42")
    text = tokenizer.decode(example.tokens.tolist())
    assert text.count("<think>") == 1 and text.count("</think>") == 1
    found = groups(tokenizer, example)
    # The template's tag is prompt: at inference the template writes it, the student never predicts it.
    assert found[0] == (0, -1, render_prompt(tokenizer, QUESTION)) and found[0][2].endswith(opening)
    first_step = "first paragraph\n\n" if opening.endswith("\n") else "\nfirst paragraph\n\n"
    assert found[1] == (1, 0, first_step)


def test_split_messages():
    system = {"role": "system", "content": "Be brief."}
    turn = {"role": "user", "content": "2+2?"}
    think = {"role": "assistant", "content": "<think>\n  add them \n</think>\n\n 4 "}
    assert split_messages([system, turn, think]) == ([system, turn], "add them", "4")
    assert split_messages([turn, {"role": "assistant", "content": " 4\n"}]) == ([turn], "", "4")
    # Generation cut off inside the think block: no answer, so the empty_answer filter drops it.
    assert split_messages([turn, {"role": "assistant", "content": "<think>add"}]) == ([turn], "add", "")
    # The opening tag written by the template is absent from the output; </think> alone still splits.
    assert split_messages([turn, {"role": "assistant", "content": "add\n</think>\n4"}]) == ([turn], "add", "4")
    multi = [system, turn, {"role": "assistant", "content": "4"}, {"role": "user", "content": "times 3?"}, think]
    assert split_messages(multi) == (multi[:4], "add them", "4")
    with pytest.raises(TraceError, match="no assistant turn"):
        split_messages([turn])


def test_bad_rows_name_the_row(tokenizer):
    rows = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(TraceError, match="trace row 0: .*no assistant turn"):
        encode_traces(rows, tokenizer, DataConfig(format=TraceFormat(kind='messages')))
    numeric = datasets.Dataset.from_list([{"prompt": "6*7?", "reasoning": None, "answer": 42}])
    (example,), _ = encode_traces(numeric, tokenizer, DataConfig())
    assert tokenizer.decode(example.tokens.tolist()).endswith("<think>\n\n</think>\n\n42" + EOS)


def test_messages_format_encodes_like_r1(tokenizer):
    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = [{"messages": earlier + QUESTION + [{"role": "assistant", "content": f"<think>{THREE_STEPS}</think>42"}]}]
    (example,), report = encode_traces(datasets.Dataset.from_list(rows), tokenizer, DataConfig(format=TraceFormat(kind='messages')))
    assert report.kept == 1
    expected = encode_example(tokenizer, earlier + QUESTION, THREE_STEPS, "42")
    np.testing.assert_array_equal(example.tokens, expected.tokens)
    np.testing.assert_array_equal(example.step, expected.step)
    assert "<|im_start|>assistant\nhello<|im_end|>" in groups(tokenizer, example)[0][2]  # earlier turns kept


def filter_rows(tokenizer):
    """Rows hitting each filter, and a config whose limits sit between their measured lengths."""
    def row(reasoning, answer="42", prompt="What is six times seven?"):
        return {"prompt": prompt, "reasoning": reasoning, "answer": answer}
    fits = row(THREE_STEPS)
    overlong = row("\n\n".join([THREE_STEPS] * 3))
    too_long = row("\n\n".join([THREE_STEPS] * 4))
    too_short = row("first")
    long_prompt = row("first paragraph", prompt=" ".join(["What is six times seven?"] * 10))
    empty_answers = [row("thinking", answer="  \n"), row("thinking", answer=None)]
    rows = empty_answers + [fits, dict(fits), too_short, too_long, overlong, long_prompt]

    def measure(r):
        return encode_example(tokenizer, [{"role": "user", "content": r["prompt"]}], r["reasoning"], r["answer"])
    seq_len = len(measure(fits)) + 5  # `fits` fits; `overlong` gets cut inside a paragraph
    assert len(measure(overlong)) > seq_len
    assert len(measure(long_prompt)) - measure(long_prompt).num_reasoning_tokens > seq_len  # cannot be truncated
    limits = dict(seq_len=seq_len, min_reasoning_tokens=measure(too_short).num_reasoning_tokens + 1,
                  max_reasoning_tokens=measure(overlong).num_reasoning_tokens)  # DataConfig / FilterConfig keys
    return datasets.Dataset.from_list(rows), limits, measure(fits), measure(overlong)


def _limited(limits: dict, overlong: str) -> DataConfig:
    return DataConfig(seq_len=limits["seq_len"], filter=FilterConfig(
        min_reasoning_tokens=limits["min_reasoning_tokens"], max_reasoning_tokens=limits["max_reasoning_tokens"],
        overlong=overlong))


def test_filters_drop(tokenizer):
    dataset, limits, fits, _ = filter_rows(tokenizer)
    encoded, report = encode_traces(dataset, tokenizer, _limited(limits, "drop"))
    assert (report.read, report.empty_answer, report.duplicate, report.reasoning_too_short, report.reasoning_too_long,
            report.overlong_dropped, report.overlong_truncated, report.kept) == (8, 2, 1, 1, 1, 2, 0, 1)
    np.testing.assert_array_equal(encoded[0].tokens, fits.tokens)
    assert str(report).splitlines() == ["traces: read 8, kept 1", "  empty_answer: 2", "  duplicate: 1",
                                        "  reasoning_too_short: 1", "  reasoning_too_long: 1", "  overlong_dropped: 2"]


def test_filters_truncate_keeps_answer_and_closing_tag(tokenizer):
    dataset, limits, fits, overlong = filter_rows(tokenizer)
    seq_len = limits["seq_len"]
    encoded, report = encode_traces(dataset, tokenizer, _limited(limits, "truncate"))
    assert (report.overlong_truncated, report.overlong_dropped, report.kept) == (1, 1, 2)  # the long prompt cannot fit
    first, cut = encoded  # input order kept
    np.testing.assert_array_equal(first.tokens, fits.tokens)
    assert len(cut.tokens) == len(cut.role) == len(cut.step) == seq_len
    start, end = cut.reasoning_span
    np.testing.assert_array_equal(cut.tokens[:end], overlong.tokens[:end])  # prompt + start of reasoning
    kept_reasoning = tokenizer.decode(cut.tokens[start:end].tolist())
    assert "\n\n".join([THREE_STEPS] * 3).startswith(kept_reasoning)
    assert kept_reasoning.startswith(THREE_STEPS + "\n\nfirst")
    assert groups(tokenizer, cut)[-2] == (1, 3, "first paragraph\n\n</think>\n\n")  # cut inside step 3's separator
    assert tokenizer.decode(cut.tokens[end:].tolist()) == "\n</think>\n\n42" + EOS
    assert cut.role[-1] == 2 and cut.tokens[-1] == tokenizer.eos_token_id
    # Steps stay contiguous: the closing tag closes the last step that survived the cut.
    reasoning_steps = cut.step[cut.role == 1]
    assert reasoning_steps[0] == 0 and np.all(np.diff(reasoning_steps) >= 0) and np.all(np.diff(reasoning_steps) <= 1)
    assert groups(tokenizer, cut)[-2][2].endswith("\n</think>\n\n")


ROWS = [{"prompt": "What is six times seven?", "reasoning": "first paragraph", "answer": "42"},
        {"prompt": "What is six times seven?", "reasoning": "second paragraph", "answer": "42"}]


def test_load_jsonl_parquet_and_folder(tmp_path):
    jsonl = tmp_path / "folder" / "a.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    parquet = tmp_path / "folder" / "b.parquet"
    datasets.Dataset.from_list(ROWS[:1]).to_parquet(str(parquet))
    assert load_traces(DataConfig(traces=str(jsonl)))["reasoning"] == ["first paragraph", "second paragraph"]
    assert load_traces(DataConfig(traces=str(parquet)))["reasoning"] == ["first paragraph"]
    assert load_traces(DataConfig(traces=str(jsonl.parent))).num_rows == 3


def test_load_errors(tmp_path):
    jsonl = tmp_path / "traces.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    with pytest.raises(TraceError) as error:
        load_traces(DataConfig(traces=str(jsonl), format=TraceFormat(reasoning_field='thoughts')))
    assert "'thoughts'" in str(error.value) and "prompt, reasoning, answer" in str(error.value)
    assert "data.format.reasoning_field" in str(error.value)
    with pytest.raises(TraceError, match="data.format.messages_field"):
        load_traces(DataConfig(traces=str(jsonl), format=TraceFormat(kind='messages')))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match="no \\*.jsonl"):
        load_traces(DataConfig(traces=str(tmp_path / "empty")))
    with pytest.raises(TraceError, match="does not exist"):
        load_traces(DataConfig(traces=str(tmp_path / "missing.jsonl")))


@pytest.mark.slow
def test_real_smollm2_tokenizer(smollm2_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    example = assert_three_steps(tokenizer, "The answer is 42.", tokenizer.eos_token)
    assert example.tokens[-1] == tokenizer.eos_token_id


# ---------------------------------------------------------------- real R1-distillation formats

STRATOS = DataConfig(format=TraceFormat(kind='sharegpt', think_open='<|begin_of_thought|>', think_close='<|end_of_thought|>', answer_open='<|begin_of_solution|>', answer_close='<|end_of_solution|>'))


def test_sharegpt_bespoke_stratos_tags(tokenizer):
    """Bespoke-Stratos / OpenThoughts rows: from/value turns, their own thought and solution tags;
    the stored sequence is kd_jax's <think> layout, the same as the r1 row would give."""
    value = (f"<|begin_of_thought|>\n\n{THREE_STEPS}\n\n<|end_of_thought|>\n\n"
             "<|begin_of_solution|>\n\n42\n\n<|end_of_solution|>")
    system = {"from": "system", "value": "Think first."}
    rows = [{"conversations": [system, {"from": "human", "value": QUESTION[0]["content"]},
                               {"from": "gpt", "value": value}]}]
    (example,), report = encode_traces(datasets.Dataset.from_list(rows), tokenizer, STRATOS)
    assert report.kept == 1
    prompt = [{"role": "system", "content": "Think first."}] + QUESTION
    expected = encode_example(tokenizer, prompt, THREE_STEPS, "42")
    np.testing.assert_array_equal(example.tokens, expected.tokens)
    np.testing.assert_array_equal(example.role, expected.role)
    np.testing.assert_array_equal(example.step, expected.step)


def test_messages_reasoning_content(tokenizer):
    """DeepSeek API / OpenAI-style turns: `reasoning_content` is the reasoning, `content` the answer."""
    rows = [{"messages": QUESTION + [{"role": "assistant", "content": " 42 ", "reasoning_content": THREE_STEPS}]},
            {"messages": QUESTION + [{"role": "assistant", "content": f"<think>{THREE_STEPS}</think>42"}]}]
    encoded, report = encode_traces(datasets.Dataset.from_list(rows), tokenizer, DataConfig(format=TraceFormat(kind='messages')))
    assert report.duplicate == 1 and len(encoded) == 1  # the two rows are the same trace
    expected = encode_example(tokenizer, QUESTION, THREE_STEPS, "42")
    np.testing.assert_array_equal(encoded[0].tokens, expected.tokens)


def test_r1_configurable_think_tags(tokenizer):
    rows = [{"prompt": QUESTION[0]["content"], "reasoning": f"[think]{THREE_STEPS}[/think]", "answer": "42"}]
    cfg = DataConfig(format=TraceFormat(think_open='[think]', think_close='[/think]'))
    (example,), _ = encode_traces(datasets.Dataset.from_list(rows), tokenizer, cfg)
    np.testing.assert_array_equal(example.tokens, encode_example(tokenizer, QUESTION, THREE_STEPS, "42").tokens)


# ---------------------------------------------------------------- one-line errors for bad traces


def one_line_error(call, *needles) -> str:
    with pytest.raises(TraceError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and error.value.__cause__ is None, message
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_traces_path_without_suffix(tmp_path):
    missing = str(tmp_path / "data" / "traces")  # no suffix: once taken for a hub id
    one_line_error(lambda: load_traces(DataConfig(traces=missing)), "does not exist", missing)


def test_wrong_field_names_name_the_data_key(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "42"}]}]
    jsonl = tmp_path / "sharegpt.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    one_line_error(lambda: load_traces(DataConfig(traces=str(jsonl), format=TraceFormat(kind='sharegpt', conversations_field='turns'))),
                   "'turns'", "data.format.conversations_field")
    # ShareGPT turns read as messages: the error names the format to set.
    cfg = DataConfig(traces=str(jsonl), format=TraceFormat(kind='messages', messages_field='conversations'))
    one_line_error(lambda: encode_traces(load_traces(cfg), None, cfg), "trace row 0", "data.format.kind=sharegpt")


def test_chat_row_without_assistant_turn_names_the_row(tokenizer):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "42"}]},
            {"conversations": [{"from": "human", "value": "hi again"}]}]
    one_line_error(lambda: encode_traces(datasets.Dataset.from_list(rows), tokenizer, STRATOS),
                   "trace row 1", "no assistant turn")


def test_empty_traces_file(tmp_path):
    empty = tmp_path / "traces.jsonl"
    empty.write_text("\n")
    one_line_error(lambda: load_traces(DataConfig(traces=str(empty))), str(empty), "is empty")


def test_non_utf8_line_names_file_and_line(tmp_path):
    bad = tmp_path / "traces.jsonl"
    bad.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"prompt": "caf\xe9", "reasoning": "r", "answer": "a"}\n')
    one_line_error(lambda: load_traces(DataConfig(traces=str(bad))), f"{bad}:2", "not UTF-8")


def test_malformed_json_line_names_file_and_line(tmp_path):
    bad = tmp_path / "traces.jsonl"
    bad.write_text("".join(json.dumps(row) + "\n" for row in ROWS) + '{"prompt": "x",, "answer": "a"}\n')
    one_line_error(lambda: load_traces(DataConfig(traces=str(bad))), f"{bad}:3", "malformed JSON")


# --- Per-step weights and curriculum difficulty ------------------------------------------------

def score_step(text: str, index: int, row: dict) -> float:
    """A data.step_scorer for the tests: longer steps weigh more, the trace's `boost` adds."""
    return len(text) / 10 + index + row.get("boost", 0)


def weighted_rows(**extra):
    return [{"prompt": "What is six times seven?", "reasoning": THREE_STEPS, "answer": "42", **extra}]


def test_step_weights_field_per_token(tokenizer):
    rows = weighted_rows(step_weights=[2, 0.5, 3]) + [
        {"prompt": "What is seven times six?", "reasoning": "first paragraph", "answer": "42"}]  # no field: None
    (weighted, plain), _ = encode_traces(datasets.Dataset.from_list(rows), tokenizer, DataConfig())
    reasoning = weighted.role == 1
    np.testing.assert_array_equal(weighted.step_weight[reasoning], np.float32([2, 0.5, 3])[weighted.step[reasoning]])
    assert (weighted.step_weight[~reasoning] == 1).all() and weighted.step_weight.dtype == np.float32
    # the tags go with their steps: <think> with step 0, </think> with the last
    first_reasoning, last_reasoning = np.flatnonzero(reasoning)[[0, -1]]
    assert weighted.step_weight[first_reasoning] == 2 and weighted.step_weight[last_reasoning] == 3
    assert plain.step_weight is None
    extras = stored_extras([weighted, plain])
    assert list(extras) == ["step_weight"] and len(extras["step_weight"]) == len(weighted) + len(plain)
    assert (extras["step_weight"][len(weighted):] == 1).all()
    none, _ = encode_traces(datasets.Dataset.from_list(rows), tokenizer, DataConfig(steps=StepsConfig(weights_field=None)))
    assert stored_extras(none) == {}


def test_wrong_step_weights_name_the_trace(tokenizer):
    rows = weighted_rows(step_weights=[1.0, 2.0, 3.0]) + weighted_rows(step_weights=[1.0, 2.0])
    rows[1]["prompt"] = "What is seven times six?"
    one_line_error(lambda: encode_traces(datasets.Dataset.from_list(rows), tokenizer, DataConfig()),
                   "trace row 1", "3 reasoning steps", "2 weights")
    for bad in ([1.0, -1.0, 2.0], [1.0, float("nan"), 2.0]):
        one_line_error(lambda: encode_traces(datasets.Dataset.from_list(weighted_rows(step_weights=bad)), tokenizer,
                                             DataConfig()), "trace row 0", ">= 0")


def test_step_scorer(tokenizer, tmp_path):
    rows = weighted_rows(boost=1, step_weights=None) + weighted_rows(boost=0, step_weights=[5, 5, 5])
    rows[1]["prompt"] = "What is seven times six?"
    cfg = DataConfig(steps=StepsConfig(scorer=f'{__name__}:score_step'))
    (scored, given), _ = encode_traces(datasets.Dataset.from_list(rows), tokenizer, cfg)
    steps = THREE_STEPS.split("\n\n")
    want = np.float32([score_step(text, k, rows[0]) for k, text in enumerate(steps)])
    reasoning = scored.role == 1
    np.testing.assert_array_equal(scored.step_weight[reasoning], want[scored.step[reasoning]])
    assert (given.step_weight[given.role == 1] == 5).all()  # a row's own field wins over the scorer
    cfg = dataclasses.replace(cfg, traces=write_jsonl(tmp_path / "t.jsonl", rows))
    assert tokenization_inputs(cfg, load_traces(cfg))["data.step_scorer"].startswith(f"{__name__}:score_step@")
    one_line_error(lambda: encode_traces(datasets.Dataset.from_list(rows), tokenizer,
                                         DataConfig(steps=StepsConfig(scorer='no_such_module:f'))), "data.steps.scorer")


def test_difficulty_from_pass_rate(tokenizer):
    rows = weighted_rows(pass_rate=0.75)
    (example,), _ = encode_traces(datasets.Dataset.from_list(rows), tokenizer,
                                  DataConfig(curriculum=CurriculumConfig(difficulty_field='pass_rate')))
    assert example.difficulty == 0.25  # easy = high pass rate = low difficulty
    (low,), _ = encode_traces(datasets.Dataset.from_list(rows), tokenizer,
                              DataConfig(curriculum=CurriculumConfig(difficulty_field='pass_rate', easy='low')))
    assert low.difficulty == 0.75
    assert stored_extras([example])["difficulty"].tolist() == [0.25]
    one_line_error(lambda: encode_traces(datasets.Dataset.from_list(rows), tokenizer,
                                         DataConfig(curriculum=CurriculumConfig(difficulty_field='level'))),
                   "'level'", "data.curriculum.difficulty_field")


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_store_identity_keys_only_when_used(tmp_path):
    """Stores built before per-step weights keep their identity: the new keys appear only when the
    traces have the field, a scorer or a difficulty field is set."""
    def inputs(rows, **sections):
        cfg = DataConfig(traces=write_jsonl(tmp_path / "t.jsonl", rows), **sections)
        return tokenization_inputs(cfg, load_traces(cfg))
    base = inputs(ROWS)
    assert not any(k.startswith(("data.step_weights", "data.step_scorer", "data.curriculum")) for k in base)
    weighted = [dict(r, step_weights=[1.0]) for r in ROWS]
    assert inputs(weighted)["data.step_weights_field"] == "step_weights"
    assert "data.step_weights_field" not in inputs(weighted, steps=StepsConfig(weights_field=None))
    assert inputs(ROWS, curriculum=CurriculumConfig(difficulty_field="answer"))["data.curriculum_difficulty_field"] == "answer"


def test_text_format_supervises_every_token_and_cuts_or_drops(tokenizer):
    """data.format.kind=text: no chat template, the tokenizer's tokens then EOS, every token a target
    (role 2, step -1); empty and repeated documents dropped; an overlong one cut to its first
    seq_len - 1 tokens + EOS (truncate) or dropped; the identity names text_field."""
    docs = ["first paragraph second paragraph", "", "first paragraph second paragraph",
            " ".join(["third paragraph"] * 20)]
    dataset = datasets.Dataset.from_list([{"body": d} for d in docs])
    cfg = DataConfig(format=TraceFormat(kind="text", text_field="body"), seq_len=16,
                     filter=FilterConfig(overlong="truncate"))
    encoded, report = encode_traces(dataset, tokenizer, cfg)
    assert (report.read, report.empty_document, report.duplicate, report.overlong_truncated,
            report.kept) == (4, 1, 1, 1, 2)
    assert report.empty_answer == 0 and "empty_document: 1" in str(report)
    first, cut = encoded
    check_arrays(first)
    assert tokenizer.decode(first.tokens.tolist()) == docs[0] + EOS  # no template, nothing before the text
    assert (first.role == 2).all() and (first.step == -1).all() and first.reasoning_span == (0, 0)
    full = tokenizer(docs[3])["input_ids"]
    assert len(cut.tokens) == 16 and cut.tokens[:15].tolist() == full[:15] and cut.tokens[-1] == tokenizer.eos_token_id
    dropped, report = encode_traces(dataset, tokenizer, dataclasses.replace(cfg, filter=FilterConfig(overlong="drop")))
    assert len(dropped) == 1 and report.overlong_dropped == 1
    assert tokenization_inputs(dataclasses.replace(cfg, traces="hub/id"), dataset)["data.text_field"] == "body"
    with pytest.raises(TraceError, match="no field 'text'.*data.format.text_field"):
        encode_traces(dataset, tokenizer, dataclasses.replace(cfg, format=TraceFormat(kind="text")))


def test_text_rows_must_hold_one_string(tokenizer, tmp_path):
    """data.format.kind=text: a list (or any non-string) is refused naming the row and the field, never
    stored as its Python repr; a missing or null text is an empty document, not an empty answer."""
    cfg = DataConfig(format=TraceFormat(kind="text"), seq_len=64)
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one document"}\n{"text": ["a", "b"]}\n')
    with pytest.raises(TraceError, match=r"trace row 1: data.format.text_field 'text' holds list \['a', 'b'\], not "
                                         r"a string; .*join its pieces"):
        encode_traces(load_traces(dataclasses.replace(cfg, traces=str(path))), tokenizer, cfg)
    path.write_text('{"text": "one document"}\n{"text": null}\n{"other": 1}\n')
    encoded, report = encode_traces(load_traces(dataclasses.replace(cfg, traces=str(path))), tokenizer, cfg)
    assert (report.read, report.empty_document, report.empty_answer, report.kept) == (3, 2, 0, 1)
