"""Human-written English text with no network: the docstrings of the Python standard library this
process runs on, read with `ast` (nothing is imported), for the prune-and-distill experiment
(kd_jax.demo.prune).

Docstrings are prose people wrote to explain code, not text the teacher wrote. Each module's
docstrings (module, classes, functions, in file order) become paragraphs; the paragraphs are cut
into documents of about `chars` characters. Doctest lines (`>>>`, `...`) and docstrings shorter than
MIN_WORDS words are dropped. A module is held out whole when the sha256 of its dotted name says so
(about `held_out` of them): no held-out document shares a module with a training one.

The text depends only on the Python version (the report records it and the text's sha256): the same
interpreter gives the same bytes on every machine.

The task: LAMBADA-style last-word prediction on the held-out documents. An item is a word that ends a
sentence (lowercase, at least MIN_ANSWER letters; `sentence_final_words`) with the document before it
as context; a model answers right when its greedy next token equals every token of the word, teacher
forced. The experiment keeps the items the teacher gets right, so the task measures how much of the
teacher's answers a student kept.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import re
import sys
import sysconfig

MIN_WORDS = 25  # shorter docstrings ("Return x.") are dropped
MIN_ANSWER = 4  # letters of a cloze answer
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo", "ensurepip",
             "pydoc_data", "encodings"}
_WORD_END = re.compile(r"\s([a-z]{%d,})\.(\s|$)" % MIN_ANSWER)


def _modules(root: str) -> list[tuple[str, str]]:
    """(dotted name, path) of every stdlib source file outside tests and vendored data, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                rel = os.path.relpath(os.path.join(dirpath, name), root)[:-3]
                found.append((rel.replace(os.sep, ".").removesuffix(".__init__"), os.path.join(dirpath, name)))
    return sorted(found)


def _paragraphs(source: str) -> list[str]:
    """The prose paragraphs of a module's docstrings, in file order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    out = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=False)
        if not doc or len(doc.split()) < MIN_WORDS:
            continue
        lines = [ln for ln in inspect.cleandoc(doc).splitlines() if not ln.lstrip().startswith((">>>", "..."))]
        for para in re.split(r"\n\s*\n", "\n".join(lines)):
            para = " ".join(para.split())
            if len(para.split()) >= 8:
                out.append(para)
    return out


def is_held_out(module: str, fraction: float) -> bool:
    return int(hashlib.sha256(module.encode()).hexdigest()[:8], 16) / 16 ** 8 < fraction


def documents(chars: int = 1500, held_out: float = 0.1, root: str | None = None) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): each module's paragraphs joined with blank lines
    into documents of about `chars` characters (a paragraph is never split)."""
    root = root or sysconfig.get_paths()["stdlib"]
    train, held = [], []
    for module, path in _modules(root):
        with open(path, encoding="utf-8", errors="replace") as f:
            paragraphs = _paragraphs(f.read())
        doc: list[str] = []
        for para in paragraphs + [None]:
            if doc and (para is None or sum(map(len, doc)) + len(para) > chars):
                (held if is_held_out(module, held_out) else train).append("\n\n".join(doc))
                doc = []
            if para is not None:
                doc.append(para)
    return train, held


def write(out: str, chars: int = 1500, held_out: float = 0.1) -> dict:
    """<out>/train.jsonl and <out>/heldout.jsonl ({"text": ...} per line) and <out>/text.json (the
    counts, the Python version and the sha256 of the text). Returns that summary."""
    train, held = documents(chars, held_out)
    os.makedirs(out, exist_ok=True)
    digest = hashlib.sha256()
    for name, docs in (("train", train), ("heldout", held)):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
                digest.update(d.encode() + b"\0")
    summary = {"source": f"docstrings of the Python {sys.version.split()[0]} standard library",
               "train_documents": len(train), "heldout_documents": len(held),
               "train_chars": sum(map(len, train)), "heldout_chars": sum(map(len, held)), "sha256": digest.hexdigest()}
    with open(os.path.join(out, "text.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def sentence_final_words(text: str, min_context: int = 60) -> list[tuple[int, int]]:
    """The task's words in `text`: (start, end) character spans of every lowercase word of at least
    MIN_ANSWER letters that ends a sentence (a period, then a space or the end) after the first
    `min_context` characters."""
    return [(m.start(1), m.end(1)) for m in _WORD_END.finditer(text, min_context)]
