"""lanner's packages import downward only (docs/architecture.md): a module may import
its own package and the packages listed before it in LAYERS, never one after it.
Function-level imports count too: a lazy import is still a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

import lanner

# lowest first; the package root (lanner/__init__.py, the public facade) may import anything
LAYERS = ["errors", "config", "default_model", "distributed", "kernels", "core", "layers", "models", "sampling", "executor",
          "engine", "serving", "server", "bench", "cli"]
ROOT = Path(lanner.__file__).parent


def layer_of(module: str) -> str:
    """'lanner.engine.llm' -> 'engine'."""
    return module.split(".")[1]


def imported_modules(source: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.startswith("lanner.")]


def upward_imports(module: str, source: str) -> list[str]:
    rank = LAYERS.index(layer_of(module))
    return [f"{module}:{line} imports {name}" for line, name in imported_modules(source)
            if LAYERS.index(layer_of(name)) > rank]


def lanner_modules() -> dict[str, str]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts == ("lanner", "__init__"):
            continue
        modules[".".join(p for p in parts if p != "__init__")] = path.read_text()
    return modules


def test_every_package_has_a_layer():
    packages = {layer_of(m) for m in lanner_modules()} - {"assets"}
    assert packages <= set(LAYERS), f"add {sorted(packages - set(LAYERS))} to LAYERS (and docs/architecture.md)"


def test_no_package_imports_upward():
    violations = [v for module, source in lanner_modules().items() for v in upward_imports(module, source)]
    assert not violations, "upward imports:\n" + "\n".join(violations)


def test_the_checker_sees_lazy_upward_imports():
    source = "import torch\nfrom lanner.core.batch import ForwardBatch\ndef f():\n    from lanner.executor.batch import X\n"
    assert upward_imports("lanner.layers.attention.backend", source) == [
        "lanner.layers.attention.backend:4 imports lanner.executor.batch"]
    assert upward_imports("lanner.kernels.fused", "import lanner.layers.rotary\n") == [
        "lanner.kernels.fused:1 imports lanner.layers.rotary"]
