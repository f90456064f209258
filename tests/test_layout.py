"""The floors of the package, checked on the source: imports only go down.

    commands    kd_jax/{train,precompute,generate,evaluate,export,compare,config}.py,
                kd_jax/demo/__main__.py, kd_jax/bench/ (python -m targets; imported by nothing but themselves)
    demo, fit   kd_jax/demo/ (the demos' data and row files, over the stages); kd_jax/fit/ (compile
                accounting: the dry run, TPU/GPU topologies, the HLO cost walker); neither imports the other
    stages      kd_jax/core/ (training, precompute, generation, evaluation, the comparison harness)
    data, models kd_jax/data/, kd_jax/models/ (neither imports the other)
    base        kd_jax/base/ (imports nothing of kd_jax but base)

Only kd_jax/base/sharding.py names the mesh axes.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "kd_jax"
COMMANDS = {"kd_jax.train", "kd_jax.precompute", "kd_jax.evaluate", "kd_jax.export", "kd_jax.config",
            "kd_jax.compare", "kd_jax.generate", "kd_jax.demo.__main__", "kd_jax.bench"}
MESH_AXES = ("data", "fsdp", "tensor")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_command(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in COMMANDS)


def floor(name: str) -> tuple[int, str]:
    """(height, room) of a module: commands 4, demo and fit 3, core 2, data and models 1, base 0."""
    if _is_command(name):
        return 4, "commands"
    for height, room in ((3, "demo"), (3, "fit"), (2, "core"), (1, "data"), (1, "models"), (0, "base")):
        if name == f"kd_jax.{room}" or name.startswith(f"kd_jax.{room}."):
            return height, room
    return 5, "package"  # kd_jax/__init__.py: the package's face


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """kd_jax modules that `name` imports (absolute and relative; `from pkg import mod` counts as mod)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("kd_jax")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(pkg + ([base] if base else []))
            if not base.startswith("kd_jax"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return out


def _arrows():
    modules = _modules()
    known = set(modules)
    for name, path in modules.items():
        for target in _imports(name, path, known):
            yield name, target


def test_layout_lists_every_command_and_commands_exist():
    modules = _modules()
    top_level = {n for n, p in modules.items() if p.parent == PACKAGE and n != "kd_jax"}
    assert top_level == COMMANDS - {"kd_jax.bench", "kd_jax.demo.__main__"}, "top-level modules are the commands"
    assert {"kd_jax.bench.__main__", "kd_jax.demo.__main__"} <= set(modules)


def test_imports_only_go_down():
    """No module imports one on a higher floor, and rooms of one floor do not import each other (data and
    models stay apart); inside a room imports are free. Commands are imported by nothing but themselves."""
    offenders = []
    for name, target in _arrows():
        (h, room), (th, troom) = floor(name), floor(target)
        if room == troom:
            if room == "commands" and not any(name.startswith(c) and target.startswith(c) for c in COMMANDS):
                offenders.append(f"{name} imports the command {target}")
            continue
        if th >= h:
            offenders.append(f"{name} ({room}) imports {target} ({troom})")
    assert not offenders, "imports must only go down:\n" + "\n".join(sorted(offenders))


def test_base_imports_nothing_above_it():
    bad = [(n, t) for n, t in _arrows() if floor(n)[1] == "base" and floor(t)[1] != "base"]
    assert not bad


def test_commands_are_thin():
    """A command parses its flags and calls libraries: no classes, few functions, a screen long."""
    for name, path in _modules().items():
        if _is_command(name) and not name.startswith("kd_jax.bench"):
            tree = ast.parse(path.read_text())
            assert not any(isinstance(n, ast.ClassDef) for n in tree.body), name
            assert len(path.read_text().splitlines()) <= 80, f"{name} is more than a screen long"


def _axis_uses(tree: ast.AST):
    """Where a mesh axis name is used as one: `x.shape["data"]`, `P("data", ...)` and friends, or a
    tuple/list of two or more axis names."""
    def axis(node) -> bool:
        return isinstance(node, ast.Constant) and node.value in MESH_AXES
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and axis(node.slice):
            yield node
        elif isinstance(node, ast.Call) and any(axis(a) for a in node.args):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in ("P", "PartitionSpec", "NamedSharding", "Mesh", "AbstractMesh", "make_mesh", "axis_index",
                        "psum", "pmean", "all_gather"):
                yield node
        elif isinstance(node, (ast.Tuple, ast.List)) and sum(axis(e) for e in node.elts) >= 2:
            yield node


def test_mesh_axis_names_live_in_sharding_only():
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                 for name, path in _modules().items() if not name.endswith(".sharding")
                 for node in _axis_uses(ast.parse(path.read_text()))]
    assert not offenders, "mesh axis names outside kd_jax/base/sharding.py:\n" + "\n".join(offenders)
