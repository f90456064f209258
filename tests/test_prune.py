"""A student cut from its teacher by measured importance (kd_jax/models/prune.py): parity of the cut
with the teacher whose removed units are zeroed (or skipped), the importance measures on
constructed teachers, the HF export, and the config path (student.init=pruned)."""

from __future__ import annotations

import dataclasses
import json
import os

import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from kd_jax.models import build_model, load_hf, num_params, save_hf
from kd_jax.models import prune as P

ATOL = 1e-4  # fp32 logits, as tests/test_models.py
DIFFS: dict[str, float] = {}  # test -> largest |pruned - reference| logit difference, printed at the end
LAYERS = 4


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("prune"))
    out = {}
    for family in ("llama3", "qwen2", "llama_bias_tied"):
        hf_model, path = hf_tiny.save(family, root, num_hidden_layers=LAYERS)
        out[family] = (hf_model, path, load_hf(path, attention="xla"))
    return out


def _batches(seed=0, n=12):
    rng = np.random.RandomState(seed)
    return P.calibration_batches([rng.randint(0, 97, rng.randint(5, 40)) for _ in range(n)], seq_len=32,
                                 batch_size=4, max_tokens=10_000)


def _tokens(seed=1):
    return jnp.asarray(np.random.RandomState(seed).randint(0, 97, (2, 16)))


def _edited(model, **edits):
    """A copy of `model` with parameters replaced: name -> fn(old numpy value) -> new value."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    for name, fn in edits.items():
        var = getattr(copy.layers, name) if hasattr(copy.layers, name) else getattr(copy, name)
        var.set_value(jnp.asarray(fn(np.array(var[...]))))
    return copy


def _close(name, a, b, atol=ATOL):
    diff = float(np.abs(np.asarray(a) - np.asarray(b)).max())
    DIFFS[name] = max(DIFFS.get(name, 0.0), diff)
    assert diff <= atol, f"{name}: {diff}"


def _removed(kept_LxM, size):
    """[L', size] True where a unit is removed."""
    mask = np.ones((len(kept_LxM), size), bool)
    np.put_along_axis(mask, kept_LxM, False, axis=1)
    return mask


def test_nothing_to_prune_is_the_teacher(teachers):
    teacher = teachers["llama_bias_tied"][2]
    student = P.prune(teacher, _batches())
    assert student.cfg == teacher.cfg
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(student)), nnx.to_flat_state(nnx.state(teacher))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    np.testing.assert_array_equal(np.asarray(student(_tokens())), np.asarray(teacher(_tokens())))


@pytest.mark.parametrize("family", ["llama3", "qwen2", "llama_bias_tied"])
def test_width_pruning_equals_the_teacher_with_those_units_zeroed(teachers, family):
    teacher = teachers[family][2]
    cfg = teacher.cfg
    rng = np.random.RandomState(2)
    keep = P.Keep(layers=np.arange(LAYERS),
                  mlp=np.sort(np.stack([rng.permutation(cfg.intermediate_size)[:20] for _ in range(LAYERS)]), 1),
                  kv_groups=np.stack([[rng.randint(cfg.num_kv_heads)] for _ in range(LAYERS)]),
                  hidden=np.arange(cfg.hidden_size))
    student = P.apply(teacher, keep)
    assert (student.cfg.intermediate_size, student.cfg.num_kv_heads, student.cfg.num_heads) == (20, 1, 2)
    mlp_gone = _removed(keep.mlp, cfg.intermediate_size)  # [L, F]
    heads_gone = _removed(keep.heads(cfg.num_heads // cfg.num_kv_heads), cfg.num_heads)  # [L, N]
    zeroed = _edited(teacher, w_down=lambda w: w * ~mlp_gone[:, :, None],
                     wo=lambda w: w * ~heads_gone[:, :, None, None])
    _close(f"width {family}", student(_tokens()), zeroed(_tokens()))


@pytest.mark.parametrize("family", ["llama3", "llama_bias_tied"])
def test_hidden_pruning_is_exact_when_the_channels_are_zero_in_the_teacher(teachers, family):
    """RMSNorm divides by the mean square over D channels; the cut one over D' < D. With the
    removed channels zero in the teacher's residual stream and the norm scales times sqrt(D/D'),
    the two agree up to eps (the denominators differ by eps * (1 - D'/D)). Without zero channels
    there is no exact parity: the cut is an approximation that training recovers."""
    teacher = teachers[family][2]
    D = teacher.cfg.hidden_size
    gone = np.zeros(D, bool)
    gone[[3, 7, 8, 20, 31]] = True
    keep = ~gone
    edits = {"embed": lambda w: w * keep, "wo": lambda w: w * keep, "w_down": lambda w: w * keep}
    if teacher.cfg.o_bias:
        edits.update(bo=lambda b: b * keep, b_down=lambda b: b * keep)
    if not teacher.cfg.tie_word_embeddings:
        edits.update(lm_head=lambda w: w * keep[:, None])
    zero_channels = _edited(teacher, **edits)
    importance = P.measure(zero_channels, _batches())
    np.testing.assert_array_equal(importance.hidden[gone], 0.0)
    assert importance.hidden[keep].min() > 0
    student = P.prune(zero_channels, _batches(), hidden_size=D - 5)
    assert student.cfg.hidden_size == D - 5 and student.layers.wq[...].shape[1] == D - 5
    _close(f"hidden {family}", student(_tokens()), zero_channels(_tokens()))
    unscaled = P.apply(zero_channels, P.choose(importance, teacher.cfg, hidden_size=D - 5), rescale_norms=False)
    assert np.abs(np.asarray(unscaled(_tokens())) - np.asarray(zero_channels(_tokens()))).max() > 1e-3


def test_identity_layer_is_least_important_and_dropping_it_is_exact(teachers):
    teacher = teachers["llama_bias_tied"][2]
    one = np.ones((LAYERS, 1, 1), np.float32)
    one[2] = 0  # layer 2 adds nothing to the residual stream: an identity
    identity = _edited(teacher, wo=lambda w: w * one[..., None], w_down=lambda w: w * one,
                       bo=lambda b: b * one[:, 0], b_down=lambda b: b * one[:, 0])
    importance = P.measure(identity, _batches(), layer_loss=True)
    assert np.argmin(importance.block_influence) == 2 and importance.block_influence[2] < 1e-6
    assert abs(importance.layer_loss[2]) < 1e-6  # skipping it changes no logit
    student = P.prune(identity, _batches(), layers=LAYERS - 1)
    assert student.cfg.num_layers == LAYERS - 1
    np.testing.assert_array_equal(np.asarray(student.layers.wq[...]), np.asarray(identity.layers.wq[...])[[0, 1, 3]])
    _close("depth (identity layer dropped)", student(_tokens()), identity(_tokens()))
    # The LM-loss measure drops the layer whose removal raises the loss least: in a random teacher
    # that can be one whose removal lowers it (a negative increase), not the identity.
    student = P.prune(identity, _batches(), layers=LAYERS - 1, depth_metric="layer_loss")
    kept = [i for i in range(LAYERS) if i != np.argmin(importance.layer_loss)]
    np.testing.assert_array_equal(np.asarray(student.layers.wq[...]), np.asarray(identity.layers.wq[...])[kept])


def test_dropping_layers_equals_skipping_them(teachers):
    teacher = teachers["qwen2"][2]
    keep = P.Keep(layers=np.array([0, 3]), mlp=np.tile(np.arange(48), (2, 1)), kv_groups=np.tile([0, 1], (2, 1)),
                  hidden=np.arange(32))
    student = P.apply(teacher, keep)
    on = np.zeros((LAYERS, 1, 1), np.float32)
    on[[0, 3]] = 1
    skipped = _edited(teacher, wo=lambda w: w * on[..., None], w_down=lambda w: w * on)  # qwen2: no o/down bias
    _close("depth (layers 1, 2 skipped)", student(_tokens()), skipped(_tokens()))


def test_zeroed_mlp_channel_and_kv_group_score_zero_and_go_first(teachers):
    teacher = teachers["llama3"][2]
    dead = _edited(teacher, w_up=lambda w: np.where(np.arange(48) == 5, 0.0, w),  # channel 5 of every layer: act 0
                   wv=lambda w: np.where((np.arange(2) == 1)[:, None], 0.0, w))  # kv group 1: heads 2, 3 output 0
    importance = P.measure(dead, _batches())
    np.testing.assert_array_equal(importance.mlp[:, 5], 0.0)
    np.testing.assert_array_equal(importance.heads[:, 2:], 0.0)
    np.testing.assert_array_equal(importance.kv_groups[:, 1], 0.0)
    assert importance.mlp[:, np.arange(48) != 5].min() > 0 and importance.kv_groups[:, 0].min() > 0
    keep = P.choose(importance, teacher.cfg, intermediate_size=47, num_kv_heads=1)
    assert not (keep.mlp == 5).any() and (keep.kv_groups == 0).all()
    np.testing.assert_array_equal(keep.heads(2), np.tile([0, 1], (LAYERS, 1)))
    student = P.prune(dead, _batches(), intermediate_size=47, num_kv_heads=1)
    _close("zeroed units pruned", student(_tokens()), dead(_tokens()))


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_pruned_export_loads_in_transformers_with_equal_logits(teachers, family, tmp_path):
    teacher = teachers[family][2]
    student = P.prune(teacher, _batches(), layers=3, intermediate_size=24, num_kv_heads=1, hidden_size=24)
    path = save_hf(student, str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    c = hf.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_key_value_heads, c.num_attention_heads, c.hidden_size,
            c.model_type) == (3, 24, 1, 2, 24, family.rstrip("3"))
    tokens = np.asarray(_tokens())
    ref = hf.eval()(torch.tensor(tokens)).logits.detach().numpy()
    _close(f"export {family}", student(jnp.asarray(tokens)), ref)


def test_impossible_targets_are_refused(teachers):
    teacher = teachers["llama3"][2]
    for bad, match in [({"layers": 5}, "prune.layers=5"), ({"num_kv_heads": 3}, "num_key_value_heads=3"),
                       ({"hidden_size": 64}, "hidden_size=64"), ({"intermediate_size": 0}, "intermediate_size=0")]:
        with pytest.raises(P.PruneError, match=match):
            P.prune(teacher, _batches(), **bad)
    with pytest.raises(P.PruneError, match="depth_metric"):
        P.prune(teacher, _batches(), layers=2, depth_metric="magic")


def test_config_builds_a_pruned_student(teachers):
    from kd_jax.base.loader import load_config
    from kd_jax.base.schema import ConfigError
    from kd_jax.models.source import source_config
    path = teachers["llama3"][1]
    cfg = load_config(None, [f"teacher.hf_path={path}", "teacher.param_dtype=float32", "student.init=pruned",
                             "student.prune.layers=2", "student.prune.num_key_value_heads=1",
                             "student.prune.intermediate_size=16", "student.prune.hidden_size=24",
                             "student.dtype=float32", "student.attention=xla"])
    teacher = build_model(cfg.teacher)
    with pytest.raises(ValueError, match="calibration"):
        build_model(cfg.student, teacher=teacher)
    student = build_model(cfg.student, teacher=teacher, calibration=_batches())
    assert student.cfg == source_config(cfg.student, cfg.teacher)  # what restore and export build
    assert (student.cfg.num_layers, student.cfg.num_kv_heads, student.cfg.num_heads, student.cfg.intermediate_size,
            student.cfg.hidden_size, student.cfg.param_dtype) == (2, 1, 2, 16, 24, "float32")
    with pytest.raises(ConfigError, match="init=pruned"):
        load_config(None, ["student.init=teacher_layers", "student.teacher_layers=[0]", "student.prune.layers=2"])
    with pytest.raises(ConfigError, match="depth_metric"):
        load_config(None, ["student.init=pruned", "student.prune.depth_metric=magic"])



PRUNE_ARGS = {"student.init": "pruned", "student.teacher_layers": "null", "student.prune.layers": 1,
              "student.prune.intermediate_size": 16, "student.prune.num_key_value_heads": 1,
              "student.prune.hidden_size": 24, "student.prune.calibration_tokens": 300,
              "student.prune.calibration_batch_size": 2, "mesh.data": -1}  # 8 devices: the sharded cut


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    import tiny_kd
    root = str(tmp_path_factory.mktemp("prune_run"))
    tiny_kd.build_store(root)
    return root


def test_prepare_cuts_the_student_from_the_teacher_on_the_store(store_root):
    """The run path: prepare() builds the teacher, measures it on the first tokens of the store's
    training split and trains a student of the target sizes."""
    import tiny_kd

    from kd_jax.base.loader import load_config
    from kd_jax.core.prepare import calibration, prepare
    cfg = load_config(None, tiny_kd.train_args(store_root, "prepared", 1, **PRUNE_ARGS))
    run = prepare(cfg)
    batches = calibration(run.store, run.train_idx, cfg)  # what the cut was measured on: the training split
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == 300
    assert all(b["tokens"].shape == (2, cfg.data.seq_len) for b in batches)
    c = run.student.cfg
    assert (c.num_layers, c.intermediate_size, c.num_kv_heads, c.num_heads, c.hidden_size) == (1, 16, 1, 2, 24)
    assert run.teacher is None  # offline: the teacher was only needed for the cut
    assert run.student.layers.wq[...].sharding.mesh.size == 8


def test_pruned_run_trains_and_exports_an_hf_model(store_root):
    import tiny_kd

    from kd_jax.base.loader import load_config
    from kd_jax.core.loop import train
    from kd_jax.core.runs import export_run, load_run_config, restore_student
    cfg = load_config(None, tiny_kd.train_args(store_root, "trained", 2, **PRUNE_ARGS))
    train(cfg)
    out = export_run(cfg.run_dir, f"{store_root}/export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    assert (hf.config.num_hidden_layers, hf.config.hidden_size, hf.config.num_attention_heads) == (1, 24, 2)
    student, step = restore_student(load_run_config(cfg.run_dir))
    assert step == 2
    tokens = np.asarray(_tokens())
    _close("export after training", student(jnp.asarray(tokens)), hf.eval()(torch.tensor(tokens)).logits.detach())


def test_cut_teacher_of_another_tokenizer_or_random_is_refused(store_root, tmp_path):
    """The cut keeps the teacher's embedding: a teacher of another tokenizer than the store's (its vocab
    larger, so the vocab check passes) is refused before any weight is read, as an online teacher is;
    and a random teacher (nothing to measure) is refused."""
    import tiny_kd

    from kd_jax.base.loader import load_config
    from kd_jax.core.prepare import prepare
    from kd_jax.data.store import StoreError
    from kd_jax.demo.arithmetic import train_tokenizer
    other = str(tmp_path / "other")
    hf_tiny.build("llama3", vocab_size=400, num_hidden_layers=2).save_pretrained(other)
    tokenizer = train_tokenizer(["a wholly different corpus of words", "zebra quantum lorem"], vocab_size=280)
    tokenizer.save_pretrained(other)
    args = tiny_kd.train_args(store_root, "other_teacher", 1, **PRUNE_ARGS)
    cfg = load_config(None, args + [f"teacher.hf_path={other}", f"data.tokenizer={store_root}/teacher"])
    with pytest.raises(StoreError, match=f"teacher {other} has another tokenizer .* store .* was tokenized with"):
        prepare(cfg)
    arch = {**tiny_kd.STUDENT, "vocab_size": 316}
    cfg = load_config(None, args + ["teacher.init=random", f"teacher.architecture={json.dumps(arch)}"])
    with pytest.raises(P.PruneError, match="teacher.init=random weights: importance measured on untrained"):
        prepare(cfg)
    from kd_jax.core.loop import train
    with pytest.raises(P.PruneError, match="teacher.init=random weights"):
        train(cfg)
    assert not os.path.exists(cfg.run_dir)  # refused before the run folder is claimed


def test_calibration_beyond_the_training_split_says_how_many_tokens_it_measures(store_root, caplog):
    import tiny_kd

    from kd_jax.base.loader import load_config
    from kd_jax.core.prepare import calibration
    from kd_jax.data.store import KDStore
    cfg = load_config(None, tiny_kd.train_args(store_root, "calibration", 1, **{
        **PRUNE_ARGS, "student.prune.calibration_tokens": 100_000_000}))
    store = KDStore.open(cfg.data.store)
    with caplog.at_level("WARNING"):
        batches = calibration(store, np.arange(3), cfg)
    taken = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    lines = [r.getMessage() for r in caplog.records if "calibration_tokens" in r.getMessage()]
    assert len(lines) == 1 and f"calibration_tokens=100000000, but the store's training split holds {taken}" in lines[0]
    caplog.clear()
    few = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, prune=dataclasses.replace(
        cfg.student.prune, calibration_tokens=taken)))
    calibration(store, np.arange(3), few)  # exactly what the split holds: nothing to say
    assert not [r for r in caplog.records if "calibration_tokens" in r.getMessage()]


def test_layer_loss_without_a_next_token_pair_is_refused(teachers):
    from kd_jax.base.loader import load_config
    from kd_jax.base.schema import ConfigError
    with pytest.raises(ConfigError, match="layer_loss with calibration_tokens=1: .* calibration_tokens >= 2"):
        load_config(None, ["student.init=pruned", "student.prune.calibration_tokens=1",
                           "student.prune.depth_metric=layer_loss"])
    single = P.calibration_batches([np.array([5]), np.array([7])], seq_len=4, batch_size=1, max_tokens=2)
    teacher = teachers["llama3"][2]
    with pytest.raises(P.PruneError, match="no next-token pair"):
        P.prune(teacher, single, layers=LAYERS - 1, depth_metric="layer_loss")
    # Block Influence scores a layer on any one token
    assert P.prune(teacher, single, layers=LAYERS - 1).cfg.num_layers == LAYERS - 1


def test_prune_demo_rows_take_every_prune_target_override(tmp_path):
    """`python -m kd_jax.demo --recipe prune ... student.prune.hidden_size=512` (a documented override):
    stage 4 cuts with it, and every row (which starts from the saved cut, init=hf) passes the check
    run() makes before anything is written."""
    from kd_jax.base.loader import load_config
    from kd_jax.core import compare
    from kd_jax.demo import prune as demo
    overrides = ("student.prune.hidden_size=512", "student.prune.num_key_value_heads=1", "student.prune.layers=20")
    out = str(tmp_path / "prune")
    base = load_config(demo.CONFIG, demo.stage_args(out, overrides))
    assert (base.student.prune.hidden_size, base.student.prune.num_key_value_heads) == (512, 1)
    rows = compare.row_configs(demo.comparison(None, demo.SEEDS, 1), out, demo.row_overrides(overrides),
                               {"kept_layers": "{0: 0}"})
    assert rows and all(cfg.student.init == "hf" and set(cfg.student.prune.targets.values()) == {None}
                        for cfg in rows.values())
    rows = compare.row_configs(demo.comparison(None, demo.SEEDS, 1), out, (), {"kept_layers": "{0: 0}"})
    assert all(set(cfg.student.prune.targets.values()) == {None} for cfg in rows.values())  # the rows file alone


@pytest.fixture(scope="module")
def pruned_run(store_root, tmp_path_factory):
    """A pruned run trained 1 step from a copy of the teacher (which a test moves away), the store's
    tokenizer named apart (data.tokenizer)."""
    import shutil

    import tiny_kd

    from kd_jax.base.loader import load_config
    from kd_jax.core.loop import train
    teacher = str(tmp_path_factory.mktemp("cut_from") / "teacher")
    shutil.copytree(f"{store_root}/teacher", teacher)
    args = tiny_kd.train_args(store_root, "pruned_run", 1, **PRUNE_ARGS) + [
        f"teacher.hf_path={teacher}", f"data.tokenizer={store_root}/teacher", "eval.max_new_tokens=4"]
    train(load_config(None, args))
    return args, teacher


def test_pruned_run_evaluates_untrained_and_refuses_other_sizes(pruned_run):
    """evaluate --untrained cuts the student as training does (it raised a ValueError traceback); a
    config of other prune sizes is refused in one line, as train refuses it (it was an orbax shape error)."""
    from kd_jax.base.loader import load_config
    from kd_jax.core.evaluation import evaluate
    from kd_jax.core.runs import RunDirError, restore_student
    args, _ = pruned_run
    cfg = load_config(None, args)
    report = evaluate(cfg, "student", max_examples=1, untrained=True)
    assert report["parameters"] == num_params(restore_student(cfg)[0])  # the cut's sizes
    other = load_config(None, args + ["student.prune.layers=2"])
    refused = r"student\.prune\.layers: 1 -> 2; its student has num_layers=1 \(not 2\)"
    with pytest.raises(RunDirError, match=refused) as e:
        evaluate(other, "student", max_examples=1)
    assert "\n" not in str(e.value)


def test_pruned_run_resumes_a_changed_calibration(pruned_run, caplog):
    """Calibration keys only choose how a fresh student is cut (the checkpoint's student has the same
    shapes): a resume with another calibration_tokens is allowed, said in one line, and config.yaml keeps
    the value the run was cut with."""
    from kd_jax.base.loader import load_config
    from kd_jax.core.runs import check_and_save_config, load_run_config
    args, _ = pruned_run
    cfg = load_config(None, args + ["student.prune.calibration_tokens=400"])
    with caplog.at_level("WARNING"):
        check_and_save_config(cfg)
    assert "student.prune.calibration_tokens: 300 -> 400 only choose how a fresh student is cut" in caplog.text
    assert load_run_config(cfg.run_dir).student.prune.calibration_tokens == 300


def test_pruned_run_exports_without_its_teacher(pruned_run):
    """The checkpoint holds the student whole: export reads its shapes from the run's student.json,
    not from the teacher's folder, which may be gone."""
    import os

    from kd_jax.base.loader import load_config
    from kd_jax.core.runs import export_run, load_run_config, restore_student
    args, teacher = pruned_run
    cfg = load_config(None, args)
    student, _ = restore_student(load_run_config(cfg.run_dir))
    os.rename(teacher, teacher + ".gone")
    try:
        out = export_run(cfg.run_dir, os.path.join(cfg.run_dir, "hf"))
    finally:
        os.rename(teacher + ".gone", teacher)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    assert (hf.config.num_hidden_layers, hf.config.hidden_size, hf.config.num_key_value_heads) == (1, 24, 1)
    tokens = np.asarray(_tokens())
    _close("export without the teacher", student(jnp.asarray(tokens)), hf.eval()(torch.tensor(tokens)).logits.detach())


def test_report_max_logit_difference():
    """Prints the largest logit difference per check (for the report); runs last."""
    print("\nlargest |pruned - reference| logit difference:")
    for name, diff in sorted(DIFFS.items()):
        print(f"  {name:32s} {diff:.2e}")
