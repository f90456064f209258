"""Config schema, YAML reference, dotted overrides and error messages."""

import dataclasses
import os
import typing

import pytest
import yaml

from kd_jax.base.cli import parse_args
from kd_jax.base.loader import (
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from kd_jax.base.schema import Config, ConfigError, MeshConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "base.yaml")
TINY = os.path.join(ROOT, "configs", "tiny_llama.yaml")


def _dotted_fields(cls, prefix=""):
    for name, tp in typing.get_type_hints(cls).items():
        yield prefix + name
        if dataclasses.is_dataclass(tp):
            yield from _dotted_fields(tp, f"{prefix}{name}.")


def _has_key(data, dotted):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def test_defaults_build():
    cfg = Config()
    assert cfg.teacher.param_dtype == "bfloat16" and cfg.student.param_dtype == "float32"
    assert cfg.run_dir == os.path.join("runs", "kd")
    assert load_config(None) == cfg


def test_base_yaml_is_the_defaults():
    assert load_config(BASE) == Config()


def test_base_yaml_lists_every_field():
    with open(BASE) as f:
        data = yaml.safe_load(f)
    missing = [key for key in _dotted_fields(Config) if not _has_key(data, key)]
    assert not missing, f"configs/base.yaml lacks {missing}"


def test_base_yaml_and_the_reference_page_are_generated_from_the_schema():
    """configs/base.yaml and docs/config.md are what `python -m kd_jax.config --defaults / --reference`
    print from the dataclasses (they cannot drift; regenerate them after a schema change)."""
    from kd_jax.base.reference import defaults_yaml, reference_markdown
    with open(BASE) as f:
        assert f.read() == defaults_yaml(), "regenerate: python -m kd_jax.config --defaults > configs/base.yaml"
    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        assert f.read() == reference_markdown(), "regenerate: python -m kd_jax.config --reference > docs/config.md"
    assert "`data.format.kind`" in reference_markdown() and "`loss.hidden.weight_schedule.end`" in reference_markdown()


def test_every_shipped_config_loads():
    for folder, _, files in os.walk(os.path.join(ROOT, "configs")):
        for name in files:
            if name.endswith(".yaml"):
                load_config(os.path.join(folder, name))


def test_tiny_llama_loads():
    cfg = load_config(TINY)
    assert cfg.student.init == "random"
    assert cfg.student.architecture["num_hidden_layers"] == 2
    assert cfg.student.architecture["rms_norm_eps"] == 1e-5
    assert cfg.train.steps == 10 and cfg.mesh.data == -1


def test_dotted_overrides():
    overrides = ["train.steps=10", "loss.temperature=2", "student.teacher_layers=[0,2]", "checkpoint.dir=null"]
    cfg = load_config(BASE, overrides)
    assert cfg.train.steps == 10 and type(cfg.train.steps) is int
    assert cfg.loss.temperature == 2.0 and type(cfg.loss.temperature) is float
    assert cfg.student.teacher_layers == [0, 2]
    assert cfg.checkpoint.dir is None
    assert load_config(BASE, ["checkpoint.dir=/tmp/ck"]).checkpoint.dir == "/tmp/ck"


def test_scientific_notation_is_a_float():
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == 1e-4


def test_override_creates_sections_and_keeps_input():
    data = {"train": {"steps": 5}}
    out = apply_overrides(data, ["student.architecture.hidden_size=32", "train.grad_accum=2"])
    assert out == {"train": {"steps": 5, "grad_accum": 2}, "student": {"architecture": {"hidden_size": 32}}}
    assert data == {"train": {"steps": 5}}


def test_override_without_equals():
    with pytest.raises(ConfigError, match="train.steps=10"):
        apply_overrides({}, ["train.steps"])


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match="'loss.temperature'"):
        load_config(None, ["loss.temprature=2"])
    with pytest.raises(ConfigError, match="'train'"):
        load_config(None, ["trian.steps=1"])
    with pytest.raises(ConfigError, match="'optim.lr'"):
        load_config(None, ["lr=0.1"])


def test_wrong_types():
    with pytest.raises(ConfigError, match=r"'train\.steps' expects int.*'abc'"):
        load_config(None, ["train.steps=abc"])
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=true"])
    with pytest.raises(ConfigError, match="loss.alpha"):
        load_config(None, ["loss.alpha=true"])
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=10.0"])
    with pytest.raises(ConfigError, match=r"list\[int\] \| None"):
        load_config(None, ["student.teacher_layers=[0,x]"])
    with pytest.raises(ConfigError, match="'loss' is a section"):
        load_config(None, ["loss=3"])


def test_bad_enum_lists_allowed():
    with pytest.raises(ConfigError, match="forward_kl.*reverse_kl.*jsd") as err:
        load_config(None, ["loss.divergence=kl"])
    assert "loss" in str(err.value)
    with pytest.raises(ConfigError, match="nothing_saveable"):
        load_config(None, ["teacher.remat=all"])


def test_mesh_two_wildcards():
    with pytest.raises(ConfigError, match="at most one"):
        load_config(None, ["mesh.fsdp=-1"])
    with pytest.raises(ConfigError, match="at most one"):
        MeshConfig(data=-1, tensor=-1)
    assert MeshConfig(data=2, fsdp=-1).fsdp == -1


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(listing))
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\ntrain:\n")
    assert load_config(str(empty)) == Config()


def test_save_load_round_trip(tmp_path):
    cfg = load_config(TINY, ["loss.divergence=jsd", "student.teacher_layers=[1,3]", f"run.output_dir={tmp_path}"])
    path = save_config(cfg, cfg.run_dir)
    assert path == os.path.join(tmp_path, "tiny_llama", "config.yaml") and os.path.isfile(path)
    assert load_config(path) == cfg
    assert from_dict(Config, to_dict(cfg)) == cfg


def test_parse_args():
    cfg = parse_args(["--config", TINY, "train.steps=3"])
    assert cfg.train.steps == 3 and cfg.student.init == "random"
    assert parse_args(["loss.tail=true"]).loss.tail is True
    with pytest.raises(SystemExit):
        parse_args(["--config", TINY, "train.stepz=3"])


@pytest.mark.parametrize("override, fragment", [
    ("optim.lr=-1", "optim: lr=-1.0 must be > 0"),
    ("optim.lr=0", "optim: lr=0.0 must be > 0"),
    ("optim.b1=-0.1", "optim: b1=-0.1 must be in [0, 1)"),
    ("optim.b2=1.5", "optim: b2=1.5 must be in [0, 1)"),
    ("optim.b2=1", "optim: b2=1.0 must be in [0, 1)"),
    ("optim.eps=0", "optim: eps=0.0 must be > 0"),
    ("optim.weight_decay=-0.01", "optim: weight_decay=-0.01 must be >= 0"),
    ("optim.lr=.nan", "optim: lr=nan must be > 0"),
    ("loss.beta=-1", "loss: beta=-1.0 must be >= 0"),
    ("loss.step_weight=-1", "loss: step_weight=-1.0 must be >= 0"),
    ("loss.answer_weight=-0.5", "loss: answer_weight=-0.5 must be >= 0"),
    ("eval.batches=0", "eval: batches=0 must be >= 1"),
    ("eval.max_new_tokens=0", "eval: max_new_tokens=0 must be >= 1"),
    ("train.eval_every=-5", "train: eval_every=-5 must be >= 0 (0 disables"),
    ("train.max_nonfinite=0", "train: max_nonfinite=0 must be >= 1"),
    ("data.num_workers=-1", "data: num_workers=-1 must be >= 0"),
    ("data.shuffle_seed=-1", "data: shuffle_seed=-1 must be >= 0"),
    ("data.filter.min_reasoning_tokens=-1", "data.filter: min_reasoning_tokens=-1 must be >= 0"),
    ("data.filter.max_reasoning_tokens=0", "data.filter: max_reasoning_tokens=0 must be null (no limit) or >= 1"),
    ("data.filter.min_reasoning_tokens=50 data.filter.max_reasoning_tokens=10",
     "max_reasoning_tokens=10 must be null (no limit) or"),
    ("precompute.bucket=0", "precompute: bucket=0 must be >= 1"),
    ("checkpoint.every_steps=0", "checkpoint: every_steps=0 must be >= 1"),
    ("checkpoint.max_to_keep=0", "checkpoint: max_to_keep=0 must be >= 1"),
    ("run.seed=-1", "run: seed=-1 must be >= 0"),
    ("student.teacher_layers=[0,-1]", "student: teacher_layers=[0, -1] must be layer indices >= 0"),
])
def test_rejects_meaningless_values(override, fragment):
    """Each bad value fails at load time, naming the section, key, value and allowed range."""
    with pytest.raises(ConfigError) as err:
        load_config(None, override.split())
    assert fragment in str(err.value)


@pytest.mark.parametrize("name", ["../../x", "..", "exp/../../x", "/tmp/x", "", "."])
def test_rejects_run_name_outside_output_dir(name):
    with pytest.raises(ConfigError, match="run: name=.* must be a plain folder name inside output_dir"):
        load_config(None, [f"run.name='{name}'"])


def test_run_name_may_have_subfolders():
    assert load_config(None, ["run.name=exp/a"]).run_dir == os.path.join("runs", "exp", "a")
    assert load_config(None, ["run.name=exp/../b"]).run.name == "exp/../b"  # normalizes to b, still inside


def test_a_saved_config_with_a_renamed_key_still_loads(tmp_path):
    """A run's config.yaml written before eval.temperature became eval.sampling_temperature."""
    from kd_jax.base.loader import to_dict
    data = to_dict(load_config(None))
    data["eval"]["temperature"] = 0.7
    del data["eval"]["sampling_temperature"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_config(str(path)).eval.sampling_temperature == 0.7


# The data section as configs were written before it had sub-sections (a saved run config among them).
FLAT_DATA = {"format": "sharegpt", "conversations_field": "turns", "think_open": "<t>", "think_close": "</t>",
             "step_separator": "\n", "step_weights_field": None, "min_reasoning_tokens": 3, "overlong": "truncate",
             "curriculum_fraction": 0.5, "curriculum_easy": "low", "prompts": "p.jsonl", "prompts_field": "q",
             "seq_len": 64}


def test_old_flat_data_keys_load_at_their_new_places_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"data": FLAT_DATA, "teacher": {"teacher_layers": None}}))
    with caplog.at_level("WARNING", logger="kd_jax.config"):
        cfg = load_config(str(path))
    d = cfg.data
    assert (d.format.kind, d.format.conversations_field, d.format.think_open, d.format.think_close) == (
        "sharegpt", "turns", "<t>", "</t>")
    assert (d.steps.separator, d.steps.weights_field, d.filter.min_reasoning_tokens, d.filter.overlong) == (
        "\n", None, 3, "truncate")
    assert (d.curriculum.fraction, d.curriculum.easy, d.seq_len) == (0.5, "low", 64)
    assert (cfg.train.on_policy.prompts, cfg.train.on_policy.prompts_field) == ("p.jsonl", "q")
    assert "data.format is now data.format.kind" in caplog.text
    assert "data.curriculum_easy is now data.curriculum.easy" in caplog.text
    assert "data.prompts is now train.on_policy.prompts" in caplog.text
    # the same keys as command-line overrides, over a new-style file
    cfg = load_config(None, ["data.format=messages", "data.messages_field=chat", "data.step_scorer=m:f"])
    assert (cfg.data.format.kind, cfg.data.format.messages_field, cfg.data.steps.scorer) == ("messages", "chat", "m:f")
    assert load_config(None, ["data.format.kind=sharegpt"]).data.format.kind == "sharegpt"


def test_teacher_layers_is_a_student_key_only(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'teacher.teacher_layers'"):
        load_config(None, ["teacher.teacher_layers=[0]"])
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"teacher_layers": [0, 1]}}))
    with pytest.raises(ConfigError, match="teacher.teacher_layers=.* is no longer a key"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="init='teacher_layers' is not allowed"):
        load_config(None, ["teacher.init=teacher_layers"])


@pytest.mark.parametrize("overrides, fragment", [
    (["loss.hidden.weight_schedule.kind=linear", "loss.hidden.weight_schedule.end=-0.5"],
     "loss.hidden: weight_schedule.end=-0.5 must be >= 0"),
    (["loss.alpha_schedule.kind=cosine", "loss.alpha_schedule.end=1.5"], "loss: alpha_schedule.end=1.5 must be in [0, 1]"),
    (["loss.temperature_schedule.kind=linear", "loss.temperature_schedule.end=0"],
     "loss: temperature_schedule.end=0.0 must be > 0"),
])
def test_every_schedule_end_is_checked_like_its_start_value(overrides, fragment):
    """A schedule's end obeys its value's range: a negative hidden weight would reward divergence."""
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value)


@pytest.mark.parametrize("section", ["loss.alpha_schedule", "loss.temperature_schedule", "loss.hidden.weight_schedule"])
def test_a_constant_schedule_refuses_an_end_it_would_ignore(section):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["teacher.mode=online", f"{section}.end=0.5"])
    message = str(err.value)
    assert f"{section}: end=0.5 is ignored by kind='constant'" in message and "kind=linear" in message
    assert "\n" not in message
    assert load_config(None, ["teacher.mode=online", f"{section}.kind=linear", f"{section}.end=0.5"])  # the fix


def _config_command(*args, timeout=30):
    """`python -m kd_jax.config ARGS` in a subprocess: (exit code, stderr); fails the test if it hangs."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "kd_jax.config", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, done.stderr


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    """9 levels of 9 aliases each would be 9**9 values once expanded: refused while reading, in one line."""
    levels = [f"    l0: &l0 [{', '.join(['lol'] * 9)}]"]
    levels += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("student:\n  architecture:\n" + "\n".join(levels) + "\n")
    code, err = _config_command("--config", str(bomb), timeout=20)
    assert code == 1 and err.count("\n") == 1, err[-2000:]
    assert f"error: config file {str(bomb)!r}" in err and "aliases" in err
    with pytest.raises(ConfigError, match="aliases"):
        apply_overrides({}, ["student.architecture=" + "{" + ", ".join(s.strip() for s in levels) + "}"])


@pytest.mark.parametrize("text", [
    "student:\n  architecture:\n    a: &a [*a]\n",
    "student:\n  architecture: &m\n    model_type: llama\n    self: *m\n",
])
def test_a_recursive_yaml_alias_is_one_line_not_a_recursion_error(tmp_path, text):
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    code, err = _config_command("--config", str(path))
    assert code == 1 and err.count("\n") == 1, err[-2000:]
    assert f"error: config file {str(path)!r}" in err and "contains itself" in err
    with pytest.raises(ConfigError, match="contains itself"):
        load_config(None, ["student.architecture=&m {self: *m}"])


def test_a_deeply_nested_config_is_one_line_not_a_recursion_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("student:\n  architecture:\n    x: " + "[" * 5000 + "]" * 5000 + "\n")
    code, err = _config_command("--config", str(path))
    assert code == 1 and err.count("\n") == 1, err[-2000:]
    assert f"error: config file {str(path)!r}" in err and "nested" in err


def test_a_config_file_over_one_mib_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("# padding\n" * 110_000 + "train:\n  steps: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert f"config file {str(path)!r}" in str(err.value) and "1 MiB" in str(err.value)


def test_on_policy_completions_must_fit_the_sequence_length():
    online = ["teacher.mode=online", "train.on_policy.fraction=0.5", "data.seq_len=256"]
    with pytest.raises(ConfigError, match=r"max_new_tokens=256 leaves no room for a prompt in data.seq_len=256"):
        load_config(None, online + ["train.on_policy.max_new_tokens=256"])
    assert load_config(None, online + ["train.on_policy.max_new_tokens=200"]).train.on_policy.max_new_tokens == 200
    load_config(None, ["data.seq_len=64"])  # off: the default max_new_tokens (256) is not checked


def test_a_step_loss_on_plain_documents_is_refused():
    """data.format.kind=text documents have no reasoning steps: loss.beta > 0 would train a step loss on
    nothing of the kind."""
    with pytest.raises(ConfigError, match=r"loss.beta=1.0 weights a loss over reasoning steps, and "
                                          r"data.format.kind=text documents have none.*set loss.beta=0"):
        load_config(None, ["data.format.kind=text", "loss.beta=1"])
    assert load_config(None, ["data.format.kind=text"]).loss.beta == 0


def test_on_policy_divergence_with_online_draws_names_its_own_key():
    """On-policy steps take train.on_policy.divergence (reverse KL by default), which the teacher's draws
    (loss.online_sampled) cannot give unbiased: the message names that key, not loss.divergence."""
    online = ["teacher.mode=online", "loss.online_sampled=8", "train.on_policy.fraction=0.5"]
    with pytest.raises(ConfigError, match=r"^train.on_policy.divergence='reverse_kl' with loss.online_sampled=8: "
                                          r".*set train.on_policy.divergence=forward_kl"):
        load_config(None, online)
    assert load_config(None, online + ["train.on_policy.divergence=forward_kl"]).loss.online_sampled == 8
