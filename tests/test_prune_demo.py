"""The prune-and-distill experiment (kd_jax.demo.prune, `make demo-prune`): its text, its task, its
verdicts, and a reduced run end to end on the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import os

import demo_cli
import pytest
import transformers

from kd_jax.core import evaluation
from kd_jax.core.runs import load_run_config
from kd_jax.demo import text


def _module(root, name: str, doc: str) -> None:
    path = root / f"{name}.py"
    path.write_text(f'"""{doc}"""\n\n\ndef f():\n    """Too short to keep."""\n')


def test_documents_are_prose_and_held_out_by_whole_module(tmp_path):
    long = "This module explains how the frobnicator turns widgets into gadgets, and why it does so slowly."
    doctest = ">>> frobnicate(1)\n2"
    names = [f"mod{i}" for i in range(40)]
    for name in names:
        second = f"A second paragraph of {name} prose, long enough to be kept."
        _module(tmp_path, name, f"{long} It is {name}.\n\n{doctest}\n\n{second}")
    (tmp_path / "test").mkdir()
    _module(tmp_path / "test", "test_x", long)  # test folders are skipped
    train, held = text.documents(chars=10_000, held_out=0.25, root=str(tmp_path))
    assert len(train) + len(held) == 40 and held and train
    assert text.documents(chars=10_000, held_out=0.25, root=str(tmp_path)) == (train, held)  # deterministic
    for doc in train + held:
        assert ">>>" not in doc and "Too short" not in doc
        assert doc.count("\n\n") == 1  # two prose paragraphs, the doctest line gone
    held_names = {d.split("It is ")[1].split(".")[0] for d in held}
    assert held_names == {n for n in names if text.is_held_out(n, 0.25)}
    # chars small: each paragraph its own document, never split
    train_small, held_small = text.documents(chars=10, held_out=0.25, root=str(tmp_path))
    assert len(train_small) + len(held_small) == 80


def test_sentence_final_words():
    doc = "A context of more than sixty characters, all written out in full right here. It ends well. Then Caps. Go on."
    spans = evaluation.sentence_final_words(doc)
    assert [doc[a:b] for a, b in spans] == ["here", "well"]  # lowercase, >= 4 letters, after 60 characters


def test_held_out_items_point_at_the_word_tokens(smollm2_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    docs = ["Return the number of items in the container, counting each of them once. The result is an integer. "
            "Nothing else is returned by this method.",
            "Short one. Too short to hold a word after sixty characters of context here."]
    data = evaluation.held_out_text(tokenizer, docs, seq_len=64)
    assert data.tokens.shape == data.mask.shape == (2, 64)
    words = []
    for r, first, last in data.items:
        # positions first..last predict the tokens first+1..last+1: the word with its space
        words.append(tokenizer.decode(data.tokens[r, first + 1:last + 2].tolist()))
        assert data.mask[r, first:last + 1].all()
    assert words == [" once", " integer", " method", " here"]
    n = len(tokenizer(docs[0])["input_ids"]) + 1  # + EOS
    assert data.mask[0].sum() == n - 1 and not data.mask[0, n - 1:].any()


@pytest.mark.slow
def test_reduced_experiment_end_to_end(smollm2_dir, tmp_path):
    """Every stage on the real model, small: 4 steps of 8 rows x 64 tokens, one seed, three rows, run as
    a user runs it (`python -m kd_jax.demo --recipe prune`) on 2 CPU devices, as `make demo-prune` on
    the 2-core CI machine (a child process: its 7.6 GB peak is returned when it ends, not kept by this
    one). The pruned student is a third of the teacher's non-embedding parameters and loads in
    transformers; the teacher scores itself perfectly; every healed row is better than the pruned
    student it started from; the sampled store is smaller per token than the top-64 store."""
    out = tmp_path / "prune"
    out.mkdir()
    os.symlink(smollm2_dir, out / "teacher")  # the tests' converted SmolLM2 (stage 1 finds it)
    stdout = demo_cli.run_demo(out, "--recipe", "prune", "--steps", "4", "--seeds", "0",
                               "--rows", "sampled,online + hidden", "--held-out-docs", "8", "data.seq_len=64",
                               "train.global_batch_size=8", "student.prune.calibration_tokens=2048", devices=2)
    with open(out / "prune_report.json") as f:
        report = json.load(f)
    pruned = report["pruned"]
    assert pruned["non_embedding"] / pruned["teacher_non_embedding"] == pytest.approx(1 / 3, abs=0.01)
    assert len(pruned["kept_layers"]) == 16 and pruned["kept_layers"] == sorted(pruned["kept_layers"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "student_init")
    assert (hf.config.num_hidden_layers, hf.config.intermediate_size) == (16, 768)
    by_row = {r["row"]: r for r in report["references"] + report["runs"]}
    teacher, start = by_row["teacher"], by_row["pruned, not healed"]
    assert teacher["kl"] < 1e-4 and teacher["top1_agree"] == 1.0 and teacher["task"] == 1.0
    assert start["kl"] > 1.0
    for name in ("cross-entropy", "sampled", "online + hidden"):
        assert by_row[name]["ce"] < start["ce"] and by_row[name]["steps"] >= 4
    assert report["stores"]["sampled"]["bytes_per_token"] < report["stores"]["topk"]["bytes_per_token"]
    assert report["verdicts"][0].startswith("no verdict: 1 seed") and (out / "prune.png").exists()
    assert report["rows"][0]["row"] == "teacher" and "=== [5/5] student 3/3: online + hidden" in stdout
    hidden = load_run_config(str(out / "online_hidden_s0")).loss.hidden  # each layer to the one it was cut from
    assert hidden.distance == "cosine" and dict(hidden.layers) == dict(enumerate(pruned["kept_layers"]))
    assert report["scorer"]["task_candidates"] > 0
    for run, name in (("cross_entropy_s0", "cross-entropy"), ("sampled_s0", "sampled"),
                      ("online_hidden_s0", "online + hidden")):  # scored, then only the last step kept
        assert os.listdir(out / run / "checkpoints") == [str(by_row[name]["steps"])]


def test_overrides_are_refused_outside_the_prune_recipe(capsys):
    from kd_jax.demo.__main__ import main
    with pytest.raises(SystemExit) as exit_:
        main(["data.seq_len=64"])
    assert exit_.value.code == 2 and "is for --recipe prune" in capsys.readouterr().err
