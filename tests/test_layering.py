"""The import structure is layered and acyclic (read from the source with `ast`, function-local imports included,
so an import hidden inside a function counts like any other).

Layers, bottom first; a module may import its own layer or lower ones only:
  0  tokenizers/, var/        the models (independent of each other: neither imports the other)
  1  training/                trainer, data, checkpoint I/O, atomic writes, training jobs
  2  samplers/                the engine and the accelerators (samplers/<accelerator>/ sit on its core files)
  3  eval/                    metrics, FID, proxy classifier, cards
  4  benchmarks/              the benchmark protocol, plots, README tables
  5  train.py, sample.py      the CLIs
Also: no import cycle between files; no cycle between folders (a package's __init__ aggregates and is left
out of the folder graph); the samplers' core files never import an accelerator subpackage.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"tokenizers": 0, "var": 0, "training": 1, "samplers": 2, "eval": 3, "benchmarks": 4, "train": 5, "sample": 5}
ACCELERATORS = {"code", "scalekv", "sjd", "dd"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    out = {}
    for top in LAYERS:
        if (ROOT / f"{top}.py").is_file():
            out[top] = ROOT / f"{top}.py"
        for path in sorted((ROOT / top).rglob("*.py")) if (ROOT / top).is_dir() else []:
            out[module_name(path)] = path
    return out


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Our modules that `path` imports (the longest known prefix of every imported name)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            parts = t.split(".")
            for n in range(len(parts), 0, -1):
                cand = ".".join(parts[:n])
                if cand in modules:
                    if cand != name:
                        found.add(cand)
                    break
    return found


def graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_graph_is_read_from_the_code(tmp_path):
    g = graph()
    assert "samplers.engine" in g["samplers.base"] and "training.checkpoint" in g["samplers.cli"]
    assert "eval.inception" in g["eval.fid"]  # imported inside a function: counted like any other import
    assert len(g) > 60
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"] and cycle({"a": {"b"}, "b": set()}) is None
    hidden = tmp_path / "m.py"
    hidden.write_text("def f():\n    from samplers.engine import Engine\n")
    assert imports_of(hidden, "var.m", our_modules()) == {"samplers.engine"}


def test_no_module_imports_a_higher_layer():
    bad = [f"{a} -> {b}" for a, deps in graph().items() for b in deps
           if LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]]]
    assert not bad, "imports that run up a layer:\n" + "\n".join(bad)


def test_models_import_only_themselves():
    bad = [f"{a} -> {b}" for a, deps in graph().items() for b in deps
           if a.split(".")[0] in ("var", "tokenizers") and b.split(".")[0] != a.split(".")[0]]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_files():
    found = cycle(graph())
    assert found is None, "import cycle: " + " -> ".join(found)


def test_no_cycle_between_folders():
    def folder(name: str) -> str:
        path = our_modules()[name]
        return str(path.parent.relative_to(ROOT))
    edges: dict[str, set[str]] = {}
    modules = our_modules()
    for a, deps in graph().items():
        if modules[a].name == "__init__.py":
            continue  # aggregators (registration imports) sit above their package
        for b in deps:
            if modules[b].name == "__init__.py":
                continue
            fa, fb = folder(a), folder(b)
            if fa != fb:
                edges.setdefault(fa, set()).add(fb)
    found = cycle(edges)
    assert found is None, "folder cycle: " + " -> ".join(found)


def test_engine_core_never_imports_an_accelerator():
    bad = [f"{a} -> {b}" for a, deps in graph().items() for b in deps
           if a.startswith("samplers.") and a.count(".") == 1 and a != "samplers"
           and b.split(".")[1:2] and b.split(".")[1] in ACCELERATORS and b.count(".") >= 1]
    assert not bad, "the engine's core files import an accelerator:\n" + "\n".join(bad)
