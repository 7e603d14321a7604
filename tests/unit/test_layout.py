"""The house layout, held by tests: a light Ray-free core, no import cycle, thin shims, small modules."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

import caslie_core

HEAVY = ("ray", "torch", "transformers", "peft", "pyarrow", "numpy", "PIL")


def _core_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(caslie_core.__path__, "caslie_core."))


def test_every_core_module_imports_without_heavy_libraries():
    """Walks the whole package (new modules are covered): heavy imports happen inside the functions that use them."""
    mods = _core_modules()
    assert len(mods) > 30
    code = (
        f"import sys, importlib\nfor m in {mods!r}: importlib.import_module(m)\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Every import of our own modules, function-local ones included, as module -> modules it imports."""
    files = [p for d in ("caslie_core", "ray_jobs") for p in (ROOT / d).rglob("*.py")]
    known = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for t in targets:
                while t and t not in known:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def test_no_import_cycle_function_local_imports_included():
    graph = _import_graph()
    assert "ray_jobs.common" in graph["ray_jobs.train"]
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_form_a_star_core_never_imports_the_jobs():
    graph = _import_graph()
    for mod, deps in graph.items():
        if mod.startswith("caslie_core"):
            assert not any(d.startswith("ray_jobs") for d in deps), mod
    jobs = ("enrich", "train", "evaluate", "serve", "submit")
    for job in jobs:
        siblings = {f"ray_jobs.{j}" for j in jobs} | {"ray_jobs.cli", "ray_jobs.demo"}
        assert not graph[f"ray_jobs.{job}"] & siblings, f"ray_jobs.{job} imports a sibling job"


@pytest.mark.parametrize(
    "folder,limit",
    [("caslie_core", 400), ("ray_jobs", 250)],
)
def test_modules_stay_readable_in_one_sitting(folder, limit):
    special = {"cli.py": 300, "demo.py": 300}
    too_long = []
    for path in (ROOT / folder).rglob("*.py"):
        n = len(path.read_text().splitlines())
        if n > (special.get(path.name, limit) if folder == "ray_jobs" else limit):
            too_long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not too_long


def test_the_core_names_its_public_surface():
    assert "Record" in caslie_core.__all__ and "load_config" in caslie_core.__all__
    assert caslie_core.EnrichConfig.__name__ == "EnrichConfig"
