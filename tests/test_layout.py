"""The package layout stays walkable: imports point one way between layers, no cycles,
small modules and short functions (README, "Module map")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "peftkit"

# Lower layers never import higher ones; a package may import its own layer's modules only
# when it is the same package. `errors` and `offline` are the floor every layer stands on.
LAYERS = {
    "errors": 0, "offline": 0,
    "adapters": 1,
    "recipe": 2,
    "model": 3, "data": 3,
    "run": 4,
    "training": 5,
    "export": 6, "inference": 6, "bench": 6,
    "cli": 7,
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported peftkit module, imported inside a function) for every import in `path`."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def walk(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("peftkit"):
                found.extend((f"{child.module}.{a.name}", in_function) for a in child.names)
            elif isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names
                             if a.name.startswith("peftkit"))
            walk(child, inner)

    walk(tree, False)
    return found


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target if target and target != "peftkit" else None


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {m: set() for m in modules}
    for m, path in modules.items():
        for target, _ in _imports(path):
            t = _resolve(target, modules)
            if t and t != m and t != "peftkit.recipes":
                graph[m].add(t)
    return graph


def test_every_package_has_a_layer():
    packages = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()
                and p.name != "assets"}  # shipped data files, no code
    packages |= {p.stem for p in PKG.glob("*.py") if not p.name.startswith("__")}
    assert packages <= set(LAYERS), f"give {sorted(packages - set(LAYERS))} a layer"


def test_imports_point_down():
    upward = [f"{m} -> {t}" for m, targets in _graph().items() for t in targets
              if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)]
    assert not upward, "imports pointing up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph, index, low, stack, on, cycles = _graph(), {}, {}, [], set(), []

    def visit(v, counter=[0]):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_modules_and_functions_stay_small(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{path.name}: {len(lines)} lines; split it by concern"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for n in ast.walk(ast.parse("\n".join(lines)))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"
