"""The two floors of the package, checked on the source: commands (`python -m kd_jax.X`) import
libraries and are imported by nothing; libraries never import a command; only sharding.py names
the mesh axes."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "kd_jax"
# The `python -m` targets: the top-level modules of kd_jax and the bench package. The libraries are
# the subfolders core/, models/ and data/.
COMMANDS = {"kd_jax.train", "kd_jax.precompute", "kd_jax.evaluate", "kd_jax.export", "kd_jax.demo",
            "kd_jax.config", "kd_jax.generate", "kd_jax.bench"}
MESH_AXES = ("data", "fsdp", "tensor")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_command(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in COMMANDS)


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


def test_layout_lists_every_command_and_commands_exist():
    modules = _modules()
    top_level = {n for n, p in modules.items() if p.parent == PACKAGE and n != "kd_jax"}
    assert top_level == COMMANDS - {"kd_jax.bench"}, "top-level modules of kd_jax are exactly the commands"
    assert "kd_jax.bench.__main__" in modules


def test_no_module_imports_a_command():
    modules = _modules()
    known = set(modules)
    offenders = []
    for name, path in modules.items():
        for target in _imports(name, path, known):
            if not _is_command(target):
                continue
            same_command = any(name.startswith(c) and target.startswith(c) for c in COMMANDS)
            if not same_command:  # bench's sub-commands import each other inside the bench package
                offenders.append(f"{name} imports {target}")
    assert not offenders, "commands are imported by nothing but themselves:\n" + "\n".join(offenders)


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
    assert not offenders, "mesh axis names outside kd_jax/core/sharding.py:\n" + "\n".join(offenders)
