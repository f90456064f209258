"""The config reference, generated from the schema (kd_jax/base/schema.py) so it cannot drift: every
key with its default and the one-line comment its field carries in the source, as a commented YAML
file (configs/base.yaml) or a Markdown page (docs/config.md). `python -m kd_jax.config --defaults`
and `--reference` print them; a test keeps both files equal to what this module writes.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import tokenize
import typing

import yaml

from kd_jax.base import schema
from kd_jax.base.schema import Config

YAML_HEADER = """\
# Reference config: every key with its default value, generated from kd_jax/base/schema.py by
# `python -m kd_jax.config --defaults` (a test keeps the two equal). Copy the keys you need into your own
# file; override any key on the command line: train.steps=10
"""


@functools.cache
def _comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the field's comment in schema.py: the one on its line, else the
    comment line just above it."""
    source = inspect.getsource(schema)
    by_line = {tok.start[0]: tok.string.lstrip("# ").strip()
               for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                comment = by_line.get(item.end_lineno)
                if comment is None and lines[item.lineno - 2].strip().startswith("#"):
                    comment = by_line.get(item.lineno - 1)
                out[(node.name, item.target.id)] = comment or ""
    return out


def _comment(cls, name: str) -> str:
    for klass in cls.__mro__:
        if (klass.__name__, name) in _comments():
            return _comments()[(klass.__name__, name)]
    return ""


def _sections(cls):
    """(name, default or section class, comment) for every field of `cls`, in order."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        yield field.name, tp if dataclasses.is_dataclass(tp) else getattr(defaults, field.name), _comment(cls, field.name)


def _scalar(value) -> str:
    if isinstance(value, str) and "\n" in value:
        return json.dumps(value)  # a JSON string is a YAML double-quoted scalar: "\n\n" on one line
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


def defaults_yaml() -> str:
    """configs/base.yaml: every key with its default and comment, sections nested."""
    out = [YAML_HEADER]

    def walk(cls, indent: int) -> None:
        for name, value, comment in _sections(cls):
            pad = "  " * indent
            if isinstance(value, type):
                line = f"{pad}{name}:"
                out.append(f"{line:<28}  # {comment}" if comment else line)
                walk(value, indent + 1)
                if indent == 0:
                    out.append("")
            else:
                line = f"{pad}{name}: {_scalar(value)}"
                out.append(f"{line:<28}  # {comment}" if comment else line)

    walk(Config, 0)
    return "\n".join(out).rstrip() + "\n"


def reference_markdown() -> str:
    """docs/config.md: one table per section, key | default | what it does."""
    out = ["# Config reference", "",
           "Every key of a kd_jax config with its default, generated from `kd_jax/base/schema.py` by",
           "`python -m kd_jax.config --reference` (a test keeps this page equal to it). A config file sets",
           "any of them in YAML (`configs/base.yaml` lists them all); the command line overrides them as",
           "`section.key=value`. Keys renamed since older versions still load, with a warning naming the new",
           "key (`kd_jax/base/loader.py`).", ""]

    def walk(cls, prefix: str, title_comment: str) -> None:
        rows = []
        nested = []
        for name, value, comment in _sections(cls):
            if isinstance(value, type):
                nested.append((value, f"{prefix}{name}", comment))
            else:
                default = _scalar(value).replace("|", "\\|").replace("\n", "\\n")
                rows.append(f"| `{prefix}{name}` | `{default}` | {comment.replace('|', '/')} |")
        if rows:
            out.extend([f"## `{prefix.rstrip('.')}`", ""] + ([title_comment, ""] if title_comment else [])
                       + ["| key | default | what it does |", "| --- | --- | --- |", *rows, ""])
        for section, path, comment in nested:
            walk(section, path + ".", comment)

    for name, section, comment in _sections(Config):
        walk(section, name + ".", comment)
    return "\n".join(out).rstrip() + "\n"
