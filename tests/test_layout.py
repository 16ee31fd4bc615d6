"""The code's shape, held where review alone lets it drift (README, "Code layout"): modules
small enough to read, functions short enough to follow, and no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "batchgen"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """batchgen modules ``name`` imports, lazily inside functions and for type checking too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets.add(base)
            targets.update(f"{base}.{a.name}" for a in node.names)
    return {t for t in targets if t in modules and t != name and t != "batchgen"}


def test_no_module_is_too_long_to_read():
    long = {
        str(path.relative_to(PACKAGE.parent)): n
        for path in _modules().values()
        if (n := len(path.read_text("utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_function_is_too_long_to_follow():
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines})")
    assert long == []


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_cycle_check_sees_a_cycle(tmp_path):
    """The check above can fail: two modules importing each other are found."""
    (tmp_path / "a.py").write_text("from batchgen import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from batchgen.a import x\n")
    modules = {"batchgen.a": tmp_path / "a.py", "batchgen.b": tmp_path / "b.py"}
    assert _imports("batchgen.a", modules["batchgen.a"], modules) == {"batchgen.b"}
    assert _imports("batchgen.b", modules["batchgen.b"], modules) == {"batchgen.a"}
