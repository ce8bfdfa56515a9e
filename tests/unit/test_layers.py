"""Layers import downward only (docs/architecture.md), lazy imports included; no cycles.

Every `import` statement in src/redline, at module level or inside a function, is an edge
from its module to the module it names. An edge must go to a lower layer, or stay inside
one package of the same layer (telemetry.hub -> telemetry.sinks). Then each module is
imported alone, in a fresh process, and what it loads at import time is checked the same
way; the telemetry writer process's module must load without torch.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "redline"

# rank: the modules of that layer (a name ending in ".*" covers its package)
LAYERS: dict[int, tuple[str, ...]] = {
    0: ("errors", "_torch_compat", "quiet"),
    1: ("plugins", "device", "events", "batch", "distributed", "rng", "files"),
    2: ("task", "fp8", "stats", "judge"),
    3: ("precision", "memory.*", "checkpoint", "data", "inspector", "telemetry.*"),
    4: ("config", "engine.*", "environment", "examples.*", "checkpoint_sharded"),
    5: ("job.*", "config_reference"),
    6: ("tuning.*", "diagnose.*"),
    7: ("run.*",),
    8: ("study.*", "integrations.*"),
    9: ("output",),
    10: ("cli",),
    11: ("__main__",),
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def rank(module: str) -> int:
    short = module.removeprefix("redline.")
    for layer, names in LAYERS.items():
        for name in names:
            if short == name or (name.endswith(".*") and
                                 (short + ".").startswith(name[:-1])):
                return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and "
                         "docs/architecture.md")


def package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def allowed(src: str, dst: str) -> bool:
    if dst == "redline" or dst == src or src.startswith(dst + ".") or dst.startswith(src + "."):
        return True  # the package root (__version__), one's parent packages or own children
    return rank(dst) < rank(src) or (rank(dst) == rank(src) and package(dst) == package(src)
                                     and package(src) != src)


def edges(module: str, path: Path) -> set[str]:
    """The redline modules `module`'s import statements name, wherever they stand."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
                base = ".".join([*pkg.split(".")[: len(pkg.split(".")) - node.level + 1],
                                 *([base] if base else [])])
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        else:
            continue
        out |= {n for n in names if n == "redline" or n.startswith("redline.")}
    return {_owner(n) for n in out}


def _owner(name: str) -> str:
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


GRAPH = {m: edges(m, p) - {m} for m, p in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        if module != "redline":
            rank(module)


@pytest.mark.parametrize("module", [m for m in MODULES if m != "redline"])
def test_imports_go_downward_only(module: str) -> None:
    upward = sorted(d for d in GRAPH[module] if not allowed(module, d))
    assert not upward, (f"{module} (layer {rank(module)}) imports "
                        + ", ".join(f"{d} (layer {rank(d)})" for d in upward))


def _private_uses(module: str, path: Path) -> list[str]:
    """Another redline module's `_private` names that `module` imports or reads through an
    imported module (`from redline.x import _y`, `x._y`)."""
    tree = ast.parse(path.read_text())
    imported: dict[str, str] = {}  # local name -> the redline module it is
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("redline"):
            for a in node.names:
                target = f"{node.module}.{a.name}"
                if target in MODULES:
                    imported[a.asname or a.name] = target
                elif a.name.startswith("_") and not a.name.startswith("__") \
                        and _owner(node.module or "") != module:
                    found.append(f"from {node.module} import {a.name}")
        elif isinstance(node, ast.Import):
            imported |= {a.asname: a.name for a in node.names
                         if a.asname and a.name.startswith("redline.")}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in imported and imported[node.value.id] != module
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{imported[node.value.id]}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    """A name another module needs is public (issue 18): `_` means "only this module"."""
    used = {m: u for m, p in MODULES.items() if (u := _private_uses(m, p))}
    assert not used, used


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m] - {"redline"}):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(
                    [*stack[stack.index(d):], d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m)


_ALONE = """
import importlib, json, os, sys
import numpy, torch, yaml  # loaded once; each module is then imported alone in a fork
out = {}
for name in json.loads(sys.argv[1]):
    r, w = os.pipe()
    if os.fork() == 0:
        os.close(r)
        importlib.import_module(name)
        os.write(w, json.dumps(sorted(m for m in sys.modules if m.startswith("redline")))
                 .encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.wait()
    out[name] = json.loads(data or b"null")
print(json.dumps(out))
"""


@pytest.mark.slow
def test_each_module_imported_alone_loads_only_what_it_may() -> None:
    names = [m for m in MODULES if m not in ("redline", "redline.__main__")]
    run = subprocess.run([sys.executable, "-c", _ALONE, json.dumps(names)],
                         capture_output=True, text=True, timeout=300, check=True)
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    for name in names:
        assert loaded[name] is not None, f"{name} failed to import alone"
        bad = [m for m in loaded[name] if m in MODULES and not _reachable(name, m)]
        assert not bad, f"importing {name} alone loads {bad}"


def _reachable(src: str, dst: str) -> bool:
    """dst is src, a parent package of something src loads, or below src (or below one of
    its parent packages, which Python imports first) in the graph."""
    if dst == src or dst == "redline" or src.startswith(dst + "."):
        return True
    parents = [".".join(src.split(".")[:i]) for i in range(2, src.count(".") + 1)]
    seen, todo = set(), [src, *parents]
    while todo:
        m = todo.pop()
        for d in GRAPH[m]:
            if d == dst or d.startswith(dst + "."):
                return True
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return False


def test_the_telemetry_writer_imports_no_torch() -> None:
    """The writer process starts in ~0.1 s because it never imports torch (hub.py)."""
    code = ("import sys, redline.telemetry.writer, redline.telemetry.sinks.jsonl, "
            "redline.telemetry.sinks.console, redline.telemetry.schema; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "False"



def _documented_layers() -> dict[int, set[str]]:
    """docs/architecture.md's layer table: rank -> the module names its row lists."""
    text = (PACKAGE.parents[1] / "docs" / "architecture.md").read_text()
    section = text[text.index("## Layers"):]
    section = section[:section.index("\n## ", 1)]
    rows: dict[int, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            names = {n.replace("/*", ".*").replace("/", ".") for n in
                     re.findall(r"`([\w./*]+)`", cells[1])}
            rows[int(cells[0])] = names
    return rows


def test_the_architecture_table_names_exactly_the_enforced_layers() -> None:
    assert _documented_layers() == {r: set(names) for r, names in LAYERS.items()}, (
        "docs/architecture.md's layer table and LAYERS here differ: change both together")


def test_each_package_sits_in_one_layer() -> None:
    """A package is a concern: every module in it has the package's layer."""
    for module in MODULES:
        parts = module.split(".")
        if len(parts) > 2:
            assert rank(module) == rank(".".join(parts[:2])), module
