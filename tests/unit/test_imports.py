"""The package's import graph: no module imports another in a circle, and every module imports alone.

Read from the source (ast), a module-level import is one that runs when the module is imported:
top-level statements, including those under a top-level ``try``/``if`` but not under ``if
TYPE_CHECKING`` (type hints only). Imports inside functions run later, on first use; they are
listed separately so that the backend/install pair can be held to "no import back at all".
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "razor_vllm"
# setup.py's package_dir: razor_vllm.triton_kernels is the top-level folder triton_kernels/.
FOLDERS = {PACKAGE: ROOT / "razor_vllm", f"{PACKAGE}.triton_kernels": ROOT / "triton_kernels"}


def modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules that ``node`` (an import statement) imports."""
    targets: set[str] = set()
    reads_package = False  # ``from package import name`` of a name the package itself defines
    if isinstance(node, ast.Import):
        targets = {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = module.split(".")
            anchor = anchor if is_package else anchor[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        targets = {base} | {f"{base}.{alias.name}" for alias in node.names}
        reads_package = any(f"{base}.{alias.name}" not in known for alias in node.names)
    # Importing a.b.c runs a, a.b and a.b.c. The packages holding ``module`` are already running
    # when it runs (Python imports a package before its modules): no edge, unless ``module`` reads
    # a name that the package defines (it may not be defined yet).
    parts = module.split(".")
    holders = {".".join(parts[:i]) for i in range(1, len(parts) + (1 if is_package else 0))}
    out = set()
    for target in targets:
        parts = target.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known}
    kept = {base} if reads_package and isinstance(node, ast.ImportFrom) else set()
    return (out - holders | (kept & out)) - {module}


def _module_imports(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(module-level, inside functions or classes) imports of the package's modules by ``name``."""
    is_package = path.name == "__init__.py"
    top: set[str] = set()
    lazy: set[str] = set()

    def walk(body) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                top.update(_imported(node, name, is_package, known))
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                continue  # type hints only
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for child in ast.walk(node):
                    if isinstance(child, (ast.Import, ast.ImportFrom)):
                        lazy.update(_imported(child, name, is_package, known))
            else:  # try / if / with at the top level run at import time
                for field in ("body", "orelse", "finalbody", "handlers"):
                    walk(getattr(node, field, None) or [])

    walk(ast.parse(path.read_text(), str(path)).body)
    return top, lazy


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, edges of imports inside functions) between the package's modules."""
    found = modules()
    edges = {name: _module_imports(name, path, set(found)) for name, path in found.items()}
    return {name: e[0] for name, e in edges.items()}, {name: e[1] for name, e in edges.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_graph_reader_finds_a_cycle():
    """The check can fail: a module-level cycle written into a graph is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    top, lazy = import_graph()
    assert "razor_vllm.backend" in top["razor_vllm.install"]  # a known module-level edge is read
    assert "razor_vllm.install" in lazy["razor_vllm.vllm_compat"]  # and a known lazy one


def test_no_module_level_import_cycle():
    top, _ = import_graph()
    assert cycles(top) == []


def test_backend_never_imports_install():
    """The layer state lives with the backend; install builds it and imports the backend at its top."""
    top, lazy = import_graph()
    assert "razor_vllm.install" not in top["razor_vllm.backend"] | lazy["razor_vllm.backend"]
    source = (ROOT / "razor_vllm" / "backend.py").read_text()
    assert "razor_vllm.install" not in source and "from razor_vllm import install" not in source
    assert "razor_vllm.backend" in top["razor_vllm.install"] and "razor_vllm.backend" not in lazy["razor_vllm.install"]


IMPORT_EACH = """
import importlib, json, sys
import torch, vllm  # loaded once; every razor_vllm module is imported afresh
results = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "razor_vllm" or m.startswith("razor_vllm.")]:
        if loaded != "razor_vllm._C":  # the C++ extension registers its ops once per process
            del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        continue
    results[name] = {"imported": sorted(m for m in sys.modules if m.startswith("razor_vllm."))}
print(json.dumps(results))
"""


def test_each_module_imports_alone():
    """Each module imports on its own (no other razor_vllm module loaded before it), in one
    interpreter (torch and vLLM load once), and importing the backend does not pull in install.py."""
    names = sorted(modules())
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, *names], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    errors = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not errors, errors
    assert sorted(results) == names
    assert "razor_vllm.install" not in results["razor_vllm.backend"]["imported"]
    assert "razor_vllm.backend" in results["razor_vllm.install"]["imported"]
