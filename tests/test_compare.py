"""The equal-compute comparison (kd_jax.core.compare, `python -m kd_jax.compare`): the rows file and its
checks, stages recorded with their inputs (reused, redone, never over a folder it did not write), the
table and verdicts read off seed ranges (none with one seed), and a two-row, two-seed comparison on the
tiny store end to end, as a user runs it from the docs."""

from __future__ import annotations

import json
import os

import pytest
import tiny_kd
import yaml

from kd_jax.core import compare


def _rows_file(tmp_path, **kw) -> str:
    cfg = tmp_path / "base.yaml"
    cfg.write_text("run:\n  log_every: 1\n")
    doc = {"config": "base.yaml", "rows": [{"name": "cross-entropy", "overrides": ["loss.alpha=0"]},
                                           {"name": "top-K"}], **kw}
    path = tmp_path / "rows.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.mark.parametrize("extra, message", [
    ({"colour": "red"}, "unknown keys ['colour']"),
    ({"rows": [{"name": "a"}, {"name": "a"}]}, "repeat"),
    ({"rows": [{"name": "a", "continues": "b"}, {"name": "b"}]}, "not an earlier row"),
    ({"seeds": [0, 0]}, "distinct non-negative"),
    ({"seeds": [-1]}, "distinct non-negative"),
    ({"eval": {"kind": "text"}}, "needs eval.data"),
    ({"eval": {"kind": "vibes"}}, "choose store"),
    ({"checkpoints": "some"}, "choose all or last"),
    ({"rows": [{"name": "a", "loss": "x"}]}, "unknown keys ['loss']"),
])
def test_rows_file_is_checked_before_anything_runs(tmp_path, extra, message):
    with pytest.raises(compare.CompareError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compare.load_rows(_rows_file(tmp_path, **extra))


def test_overrides_name_only_known_variables(tmp_path):
    c = compare.load_rows(_rows_file(tmp_path, overrides=["data.store=${out}/store", "run.name=${where}"]))
    with pytest.raises(compare.CompareError, match=r"names \$\{where\}; the variables are out"):
        compare.row_configs(c, str(tmp_path / "out"))
    c = compare.load_rows(_rows_file(tmp_path, overrides=["data.store=${out}/store"]))
    configs = compare.row_configs(c, str(tmp_path / "out"))
    assert {k: v.data.store for k, v in configs.items()} == {("cross-entropy", 0): f"{tmp_path}/out/store",
                                                            ("top-K", 0): f"{tmp_path}/out/store"}
    assert configs[("top-K", 0)].run.name == "top_k_s0" and configs[("cross-entropy", 0)].loss.alpha == 0


def test_stages_are_reused_redone_or_refused(tmp_path, capsys):
    out = tmp_path / "cmp"
    ws = compare.Workspace(str(out))
    built = []

    def build(path):
        os.makedirs(path)
        built.append(path)
        return {"n": len(built)}
    assert ws.stage("a", {"x": 1}, build) == {"n": 1}
    assert compare.Workspace(str(out)).stage("a", {"x": 1}, build) == {"n": 1} and len(built) == 1  # reused
    (out / "a" / "old.txt").write_text("stale")
    assert compare.Workspace(str(out)).stage("a", {"x": 2}, build) == {"n": 2}  # redone, the folder anew
    assert not (out / "a" / "old.txt").exists() and "x: 1 -> 2" in capsys.readouterr().out
    # a folder (or file) it did not write is never written over, and --fresh leaves it alone
    (out / "mine").mkdir()
    (out / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(compare.CompareError, match="was not written by this comparison"):
        compare.Workspace(str(out)).stage("mine", {}, build)
    with pytest.raises(compare.CompareError, match="was not written by this comparison"):
        compare.Workspace(str(out)).claim("mine")
    ws = compare.Workspace(str(out))
    assert ws.fresh() == ["a"]
    assert (out / "mine" / "notes.txt").read_text() == "keep" and not (out / "a").exists()
    # adopted: used as it is, never removed
    (out / "given").mkdir()
    assert ws.stage("given", {"x": 1}, build, adopt=lambda p: True) is None
    ws.fresh()
    assert (out / "given").exists()


def _run(row, seed, ce, task):
    return {"row": row, "learns": "-", "seed": seed, "steps": 4, "gflop": 1.0, "tokens_per_s": 10.0, "ce": ce,
            "kl": 1.0, "top1_agree": 0.5, "task": task, "task_right": round(task * 100), "task_n": 100}


def test_verdicts_read_the_seed_ranges_and_need_two_seeds():
    runs = [_run("cross-entropy", 0, 5.0, 0.30), _run("cross-entropy", 1, 5.1, 0.34),
            _run("top-K", 0, 4.8, 0.33), _run("top-K", 1, 4.9, 0.42),  # CE beyond the range; task overlaps
            _run("sampled", 0, 5.05, 0.20), _run("sampled", 1, 5.3, 0.25)]  # CE overlaps; task below the range
    teacher = {"row": "teacher", "ce": 3.0, "kl": 0.0, "top1_agree": 1.0, "task": 0.9, "task_right": 90,
               "task_n": 100}
    lines = compare.summarize([teacher] + runs)
    top = next(line for line in lines if line["row"] == "top-K")
    assert top["ce"] == pytest.approx(4.85) and top["ce_range"] == (4.8, 4.9)
    assert (top["task_low"], top["task_high"]) == pytest.approx(compare.wilson_interval(75, 200))
    assert compare.verdicts(lines, "cross-entropy", {"teacher"}) == [
        "top-K: held-out CE 4.850 beats cross-entropy's 5.050; task 37.5% ties cross-entropy's 32.0%",
        "sampled: held-out CE 5.175 ties cross-entropy's 5.050; task 22.5% loses to cross-entropy's 32.0%"]
    assert compare.teacher_check(lines, "cross-entropy").endswith("the teacher is better beyond the intervals")
    table = compare.format_table(lines)
    assert "4.850 (4.800-4.900)" in table and "37.5% (33.0%-42.0%) [31.1%, 44.4%]" in table
    one = compare.summarize([teacher] + [r for r in runs if r["seed"] == 0])
    said = compare.verdicts(one, "cross-entropy", {"teacher"})
    assert len(said) == 1 and said[0].startswith("no verdict: 1 seed per row")
    assert "beats" not in " ".join(said) and "loses" not in " ".join(said)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("compare_store"))
    tiny_kd.build_store(root)
    return root


@pytest.mark.slow
def test_two_rows_two_seeds_end_to_end(tiny_store, tmp_path, capsys):
    """What docs/compare.md tells a user to do, on the tiny store: a config, a two-row rows file, two
    seeds; the rows get equal compute, every run is scored, the verdicts are printed; a rerun with one
    seed reuses its runs and prints no verdict; a changed override redoes the runs it changes."""
    config = tmp_path / "student.yaml"
    args = tiny_kd.train_args(tiny_store, "unused", 8, **{"checkpoint.every_steps": 2, "eval.max_new_tokens": 8})
    config.write_text("run:\n  log_every: 1\n")  # every other setting is an override of the rows file
    rows = tmp_path / "rows.yaml"
    rows.write_text(yaml.safe_dump({
        "config": "student.yaml", "overrides": [a for a in args if not a.startswith(("run.name=", "run.output_dir="))],
        "seeds": [0, 1], "eval": {"kind": "store", "examples": 8, "curve_examples": 8},
        "rows": [{"name": "cross-entropy", "learns": "CE", "overrides": ["loss.alpha=0"]},
                 {"name": "top-K", "learns": "top-8 KL + CE"}]}))
    out = tmp_path / "cmp"
    from kd_jax.compare import main
    main(["--rows", str(rows), "--out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads((out / compare.REPORT).read_text())
    by_row = {line["row"]: line for line in report["rows"]}
    assert list(by_row) == ["teacher", "cross-entropy", "top-K"]
    assert by_row["cross-entropy"]["seeds"] == by_row["top-K"]["seeds"] == 2
    assert report["gflop"]["cross-entropy"] == report["gflop"]["top-K"]  # equal compute
    assert len(report["runs"]) == 4 and all(r["steps"] == 8 for r in report["runs"])
    for r in report["runs"]:
        assert 0 <= r["task_low"] <= r["task"] <= r["task_high"] <= 1 and r["ce"] > 0
        assert [p["step"] for p in r["curve"]] == [4, 6, 8]  # every kept checkpoint (max_to_keep 3)
    assert len(report["verdicts"]) == 1 and report["verdicts"][0].startswith("top-K: held-out CE")
    assert report["verdicts"][0] in printed and "held-out CE" in printed and (out / "compare.png").exists()
    # one seed: its runs reused, no verdict
    main(["--rows", str(rows), "--out", str(out), "--seeds", "0"])
    printed = capsys.readouterr().out
    again = json.loads((out / compare.REPORT).read_text())
    assert again["verdicts"][0].startswith("no verdict") and again["verdicts"][0] in printed
    assert [r["ce"] for r in again["runs"]] == [r["ce"] for r in report["runs"] if r["seed"] == 0]
    assert "built again" not in printed
    # a changed override: every run is made again from it
    main(["--rows", str(rows), "--out", str(out), "--seeds", "0", "optim.lr=1e-3"])
    assert "built again" in capsys.readouterr().out
    # a foreign folder named like a run is refused before anything is written
    (tmp_path / "cmp2" / "top_k_s0").mkdir(parents=True)
    with pytest.raises(SystemExit):
        main(["--rows", str(rows), "--out", str(tmp_path / "cmp2")])
    assert "was not written by this comparison" in capsys.readouterr().err
    assert not (tmp_path / "cmp2" / "cross_entropy_s0").exists()
