"""The package's shape stays walkable: no module over 500 lines but the standalone forward, no function over 80
lines, no import cycle between modules, and `structprune --help` imports nothing heavy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for p in sorted([*(REPO / "structprune").rglob("*.py"), *(REPO / "kernels").glob("*.py")])
           if not p.is_relative_to(REPO / "structprune" / "kernels")]  # the link to kernels/, read once
LONG_MODULES = {"structprune/modeling_structprune.py"}
"""The one forward: standalone (copied into saved folders), so it keeps the whole model in one file."""


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "kernels":
        parts = ["structprune", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_over_500_lines_and_no_function_over_80():
    long_modules, long_functions = [], []
    for path in SOURCES:
        source = path.read_text()
        if len(source.splitlines()) > 500 and str(path.relative_to(REPO)) not in LONG_MODULES:
            long_modules.append(str(path.relative_to(REPO)))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{path.relative_to(REPO)}:{node.name}")
    assert not long_modules and not long_functions


def test_no_import_cycle_between_modules():
    modules = {_module(path): path for path in SOURCES}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.parse(path.read_text()).body:  # module-level imports only
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {t for t in targets if t in modules and t != name and t not in parents}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            assert state.get(target) != 1, "import cycle: " + " -> ".join([*trail, name, target])
            if target not in state:
                visit(target, [*trail, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys; from structprune.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
