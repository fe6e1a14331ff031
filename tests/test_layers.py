"""The package's layers: imports run only downward, with no cycles, no private names across modules and no
function-local imports of our own modules. Read from the source (AST), function-local imports included.

Two documented facades load modules on first attribute access (a module ``__getattr__``, not an import
statement): the package itself (``llm_merging.ops`` ...) and the command line's commands (``llm_merging.cli.run``,
``cli.analyze``), so that ``import llm_merging`` and ``llm-merging --help`` never load torch."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass

import pytest

from conftest import REPO_ROOT

PACKAGE = "llm_merging"

# Lowest first; a module may import its own layer and the layers below it. The search, insight and report
# packages share one layer (they may use each other, never the pipeline).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("llm_merging.core",)),
    ("ops", ("llm_merging.ops",)),
    ("model", ("llm_merging.model",)),
    ("data", ("llm_merging.data",)),
    ("merging", ("llm_merging.merging",)),
    ("evaluation", ("llm_merging.metrics", "llm_merging.evaluation", "llm_merging.lm_eval_tasks")),
    ("search | insight | report", ("llm_merging.search", "llm_merging.insight", "llm_merging.report")),
    ("pipeline", ("llm_merging.pipeline", "llm_merging.runner")),
    ("cli", ("llm_merging.cli", "llm_merging.main")),
]


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    path: str  # its file, relative to the repository
    line: int
    target: str  # imported module of ours
    name: str | None  # the name taken from it (``from target import name``), None for a module
    local: bool  # inside a function


def modules(root: str) -> dict[str, str]:
    """Module name → file path for every module of the package under ``root``."""
    out = {}
    for folder, _, files in os.walk(os.path.join(root, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def imports(root: str) -> list[Import]:
    """Every import of one of our modules, with where it is and whether it runs inside a function."""
    mods = modules(root)
    found = []
    for module, path in mods.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        is_package = path.endswith("__init__.py")
        for node, local in _walk(tree.body, False):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [(f"{base}.{a.name}", None) if f"{base}.{a.name}" in mods else (base, a.name)
                           for a in node.names]
            for target, name in targets:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    while target not in mods and "." in target:
                        target = target.rsplit(".", 1)[0]
                    found.append(Import(module, os.path.relpath(path, root), node.lineno, target, name, local))
    return found


def _walk(body, local):
    """(import node, inside a function?) for the statements in ``body``; ``if TYPE_CHECKING:`` is skipped."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, local
        elif isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        for field in ("body", "orelse", "finalbody", "handlers"):
            child = getattr(node, field, None)
            if isinstance(child, list) and not isinstance(node, (ast.Import, ast.ImportFrom)):
                yield from _walk(child, local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def layer_of(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def upward(found: list[Import]) -> list[str]:
    out = []
    for imp in found:
        src, dst = layer_of(imp.source), layer_of(imp.target)
        if imp.source == PACKAGE:  # the package's lazy facade (module __getattr__) sits above every layer
            continue
        if src is not None and dst is not None and dst > src:
            out.append(f"{imp.path}:{imp.line}: {imp.source} ({LAYERS[src][0]}) imports {imp.target} "
                       f"({LAYERS[dst][0]}), a higher layer")
    return out


def cycles(found: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = defaultdict(set)
    for imp in found:
        if imp.target != imp.source:
            graph[imp.source].add(imp.target)
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _where(found: list[Import], members: list[str]) -> list[str]:
    return [f"{imp.path}:{imp.line}: {imp.source} -> {imp.target}" for imp in found
            if imp.source in members and imp.target in members and imp.source != imp.target]


@pytest.fixture(scope="module")
def found() -> list[Import]:
    return imports(REPO_ROOT)


def test_every_module_has_a_layer():
    missing = [m for m in modules(REPO_ROOT) if m != PACKAGE and layer_of(m) is None]
    assert not missing, f"modules outside every layer (add them to LAYERS): {missing}"


def test_imports_run_only_downward(found):
    bad = upward(found)
    assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_no_import_cycles(found):
    bad = cycles(found)
    assert not bad, "import cycles:\n" + "\n\n".join("\n".join(_where(found, c)) for c in bad)


def test_no_private_name_crosses_a_module(found):
    bad = [f"{i.path}:{i.line}: {i.source} imports {i.target}.{i.name}" for i in found
           if i.name and i.name.startswith("_") and not i.name.startswith("__") and i.target != i.source]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_no_function_local_import_of_our_modules(found):
    bad = [f"{i.path}:{i.line}: {i.source} imports {i.target} inside a function" for i in found if i.local]
    assert not bad, "function-local imports of our own modules (import at the top):\n" + "\n".join(bad)


def test_checker_finds_what_it_guards(tmp_path):
    """The checks themselves catch an upward import, a cycle, a private name and a local import."""
    pkg = tmp_path / PACKAGE
    for sub in ("core", "ops"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from llm_merging.ops import b\n")
    (pkg / "ops" / "b.py").write_text("from llm_merging.ops.c import _hidden\n")
    (pkg / "ops" / "c.py").write_text("def f():\n    from llm_merging.ops import b\n_hidden = 1\n")
    got = imports(str(tmp_path))
    assert [s.split(": ", 1)[1] for s in upward(got)] == [
        "llm_merging.core.a (core) imports llm_merging.ops.b (ops), a higher layer"]
    assert cycles(got) == [["llm_merging.ops.b", "llm_merging.ops.c"]]
    assert [(i.source, i.name) for i in got if i.name == "_hidden"] == [("llm_merging.ops.b", "_hidden")]
    assert [(i.source, i.line) for i in got if i.local] == [("llm_merging.ops.c", 2)]


def test_the_command_line_answers_without_loading_torch():
    """``import llm_merging`` and the run parser (``--help``, flag errors) stay light: no torch, no transformers."""
    code = ("import sys, llm_merging, llm_merging.main as m; m.build_parser().format_help(); "
            "heavy = [n for n in ('torch', 'transformers', 'numpy') if n in sys.modules]; print(heavy); "
            "sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
