"""Reading a config: YAML files and dotted overrides into a checked `Config` (kd_jax/base/schema.py),
old key names moved to their new places with a warning, and writing a resolved config back.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import os
import re
import types
import typing

import yaml

from kd_jax.base.schema import Config, ConfigError

log = logging.getLogger("kd_jax.config")


# Bounds on what one config file or override value may hold: a config is a few hundred values, so these
# only stop a hostile or broken file (an alias bomb, a value that contains itself) before it expands.
MAX_FILE_BYTES = 1 << 20  # 1 MiB
MAX_VALUES = 100_000  # values (mapping keys included) once every alias is expanded
MAX_DEPTH = 100  # levels of nested mappings / lists


class _Refused(yaml.YAMLError):
    """A YAML document beyond the bounds above; its message is one line, said before anything expands."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (plain PyYAML, YAML 1.1, wants `1.0e-4`), and refuses
    recursive aliases, alias bombs and deep nesting while composing: before any value is built."""

    def __init__(self, stream):
        super().__init__(stream)
        self._open_anchors: set[str] = set()  # anchors of the nodes being composed (an alias to one is a loop)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values in it once its aliases are expanded

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise _Refused(f"alias *{event.anchor} (line {line}) sits inside the value &{event.anchor} it names, "
                               f"a structure that contains itself; write the value out instead of the alias")
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"values are nested more than {MAX_DEPTH} levels deep (line {line}); a config needs a few "
                           f"levels: flatten it")
        anchor = event.anchor
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open_anchors.discard(anchor)
        # Children are composed (and sized) before their parent, aliased ones included: one sum per node.
        if isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._sizes[id(child)] for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size = 1 + sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        else:
            size = 1
        if size > MAX_VALUES:
            raise _Refused(f"its aliases (*name) expand to more than {MAX_VALUES} values (line {line}), an alias "
                           f"bomb; a config needs few aliases: write the values out")
        self._sizes[id(node)] = size
        return node


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


# ---------------------------------------------------------------- building from dicts


def _type_name(tp) -> str:
    if tp is type(None):
        return "None"
    if tp is typing.Any:
        return "any"
    if dataclasses.is_dataclass(tp):
        return "a mapping of keys"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in typing.get_args(tp))}]"
    return tp.__name__


def _convert(value, tp, path: str):
    """Checks `value` against the annotation `tp` and returns it (int -> float where a float is expected)."""
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is typing.Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, path)
            except ConfigError:
                pass
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        # bool is an int subclass, but `true` for a float is almost surely a mistake.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp in (int, str, bool):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
    elif origin is list or tp is list:
        (item_type,) = typing.get_args(tp) or (typing.Any,)
        if isinstance(value, (list, tuple)):
            return [_convert(item, item_type, f"{path}[{i}]") for i, item in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return copy.deepcopy(value)
    else:
        raise TypeError(f"config field {path!r} has an unsupported annotation {tp!r}")
    hint = ""
    if str in (typing.get_args(tp) or (tp,)) and isinstance(value, (int, float, bool)):
        hint = f"; quote it to pass text, e.g. {path}='\"{value}\"'"  # YAML read the bare value as a number/bool
    raise ConfigError(f"{path!r} expects {_type_name(tp)}, got {value!r} ({type(value).__name__}){hint}")


def _dotted_keys(cls, prefix: str = "") -> list[str]:
    """All keys under a dataclass, sections included: ["run", "run.name", ...]."""
    keys = []
    for name, field_type in typing.get_type_hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(field_type):
            keys += _dotted_keys(field_type, f"{prefix}{name}.")
    return keys


def _unknown_key_error(cls, key, path: str) -> ConfigError:
    prefix = f"{path}." if path else ""
    names = [f.name for f in dataclasses.fields(cls)]
    all_keys = _dotted_keys(cls, prefix)
    # Close to a key of this section or below (`temperature` -> `loss.temperature`), or a leaf name in the wrong place.
    guesses = [prefix + k for k in difflib.get_close_matches(str(key), _dotted_keys(cls), n=3)]
    guesses += [k for k in all_keys if difflib.get_close_matches(str(key), [k.rsplit(".", 1)[-1]], cutoff=0.8)]
    guesses = list(dict.fromkeys(guesses))[:3]
    hint = f"did you mean {' or '.join(map(repr, guesses))}? " if guesses else ""
    where = f"in {path!r}" if path else "at the top level"
    return ConfigError(f"unknown config key {prefix + str(key)!r}; {hint}valid keys {where}: {', '.join(names)}")


def from_dict(cls, data: dict | None, path: str = ""):
    """Builds dataclass `cls` from a nested dict, checking every key and type. None means all defaults."""
    if data is None:  # a YAML section whose keys are all commented out
        data = {}
    if not isinstance(data, dict):
        where = repr(path) if path else "the config"
        raise ConfigError(f"{where} is a section and expects a mapping of keys, got {data!r} ({type(data).__name__})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key_error(cls, key, path)
        kwargs[key] = _convert(value, hints[key], f"{path}.{key}" if path else key)
    try:
        return cls(**kwargs)
    except ConfigError as e:  # __post_init__ checks know the field, not where the section sits
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


# ---------------------------------------------------------------- files and command line


def apply_overrides(data: dict, overrides: typing.Iterable[str], source: str = "override") -> dict:
    """Returns a copy of `data` with each `dotted.key=value` set; values are YAML (2 int, 2.0 float, null None).
    An old key name is set at its new place (RENAMED), with a warning."""
    data = copy.deepcopy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {override!r} is not dotted.key=value; write e.g. train.steps=10")
        try:
            value = yaml.load(raw, Loader=_Loader)
        except _Refused as e:
            raise ConfigError(f"override {override!r}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {override!r}: the value is not valid YAML ({e}); quote it if it is text") from None
        parts = _new_key(parts, value, source)
        node = data
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section")
        node[parts[-1]] = value
    return data


# Keys renamed or moved since a config could have been written (a run's saved config.yaml among them):
# old dotted key -> new dotted key. Old keys keep loading, with a warning.
RENAMED = {
    "eval.temperature": "eval.sampling_temperature",
    **{f"data.{k}": f"data.format.{k}" for k in (
        "prompt_field", "reasoning_field", "answer_field", "messages_field", "conversations_field", "think_open",
        "think_close", "answer_open", "answer_close")},
    "data.step_separator": "data.steps.separator",
    "data.step_weights_field": "data.steps.weights_field",
    "data.step_scorer": "data.steps.scorer",
    **{f"data.{k}": f"data.filter.{k}" for k in ("min_reasoning_tokens", "max_reasoning_tokens", "overlong")},
    **{f"data.curriculum_{k}": f"data.curriculum.{k}" for k in ("fraction", "difficulty_field", "easy", "stages")},
    "data.prompts": "train.on_policy.prompts",
    "data.prompts_field": "train.on_policy.prompts_field",
}
# A key that was a value and is now a section: old key with a plain value -> the section's key it sets.
BECAME_SECTIONS = {"data.format": "data.format.kind"}
# Keys that one section no longer has, and are dropped when they hold their old default (a saved config
# writes every key): the teacher never used the student's layer choice.
DROPPED = {"teacher.teacher_layers": None}


def _new_key(parts: list[str], value, source: str) -> list[str]:
    """The current name of dotted key `parts` set to `value` (warning when it was renamed)."""
    old = ".".join(parts)
    new = RENAMED.get(old) or (BECAME_SECTIONS.get(old) if not isinstance(value, dict) else None)
    if new is None:
        return parts
    log.warning("%s: %s is now %s; read as such", source, old, new)
    return new.split(".")


def _flat_items(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        yield path, value
        if isinstance(value, dict) and path + "." not in ("student.architecture.", "loss.hidden.layers."):
            yield from _flat_items(value, path + ".")


def migrate(data: dict, source: str = "config") -> dict:
    """`data` (nested, as read from YAML) with old key names moved to their current places (RENAMED,
    BECAME_SECTIONS; a warning each) and keys the schema dropped removed when they hold their old default."""
    moves = [(path, value) for path, value in _flat_items(data)
             if path in RENAMED or (path in BECAME_SECTIONS and not isinstance(value, dict)) or path in DROPPED]
    if not moves:
        return data
    moves.sort(key=lambda move: move[0] not in BECAME_SECTIONS)  # a value that became a section moves first
    data = copy.deepcopy(data)
    for path, value in moves:
        *parents, leaf = path.split(".")
        node = data
        for part in parents:
            node = node[part]
        if path in DROPPED:
            if value != DROPPED[path]:
                raise ConfigError(f"{source}: {path}={value!r} is no longer a key (it only ever applied to the "
                                  f"student); remove it")
            del node[leaf]
            continue
        del node[leaf]
        target = data
        new = _new_key(path.split("."), value, source)
        for part in new[:-1]:
            if target.get(part) is None:
                target[part] = {}
            target = target[part]
        target.setdefault(new[-1], value)
    return data


def load_config(path: str | None, overrides: typing.Iterable[str] = ()) -> Config:
    """Reads a YAML config (None = all defaults), applies dotted overrides and builds a checked Config."""
    data = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} not found; pass an existing YAML file (see configs/base.yaml)")
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"config file {path!r} is {size} bytes, over the 1 MiB a config may be; pass the "
                              f"YAML config itself (see configs/base.yaml), not data")
        with open(path) as f:
            try:
                data = yaml.load(f, Loader=_Loader)
            except _Refused as e:
                raise ConfigError(f"config file {path!r}: {e}") from None
            except yaml.YAMLError as e:
                where = " ".join(str(e).split())  # PyYAML's message spans lines; an error is one
                raise ConfigError(f"config file {path!r} is not valid YAML: {where}") from None
        if data is None:  # an empty file means all defaults
            data = {}
        if not isinstance(data, dict):
            kind = type(data).__name__
            raise ConfigError(f"config file {path!r} must hold a mapping of sections (run:, train:, ...), got a {kind}")
    return from_dict(Config, apply_overrides(migrate(data, path or "config"), overrides))


def to_dict(cfg) -> dict:
    """The config as plain nested dicts, in field order, ready for YAML."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, run_dir: str | None = None, filename: str = "config.yaml") -> str:
    """Writes the resolved config to run_dir/filename (run_dir defaults to cfg.run_dir); returns the path."""
    run_dir = cfg.run_dir if run_dir is None else run_dir
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, filename)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    return path
