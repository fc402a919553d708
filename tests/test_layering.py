"""The package's layering, checked from the source (no imports run): sedeploy's modules import only from their own
layer or the layers below it, lazy imports inside functions included, so the import graph has no cycle and a
reader can take the modules in data-flow order (docs/design.md draws the same order)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sedeploy"

#: bottom to top; a module may import from its own layer and every layer below it. What both the build and the
#: benchmark use sits below both: the figures (``metrics``: KL, top-k, the Wilson / Bonett–Price bounds) and the
#: ground truth of an image folder (``classes``, ``labels``) with the data they are computed on; the interleaved
#: timer (``backends.timing``) with the ``Runner`` protocol it times. ``int8_budget`` and ``int8_check`` sit in the
#: build layer, not with ``quantize``: they measure the INT8 artifacts through runners (ONNX Runtime, OpenVINO) and
#: time them with that timer, so they stand on the backends, as the build job that calls them does.
LAYERS: list[tuple[str, ...]] = [
    ("sedeploy.errors", "sedeploy.fsutil", "sedeploy.machine"),
    ("sedeploy.layout", "sedeploy.onnxcore", "sedeploy.artifacts", "sedeploy.preprocess", "sedeploy.metrics",
     "sedeploy.classes", "sedeploy.labels"),
    ("sedeploy.model", "sedeploy.checkpoints", "sedeploy.flops", "sedeploy.export", "sedeploy.info"),
    ("sedeploy.passes",),
    ("sedeploy.checks",),
    ("sedeploy.fp16", "sedeploy.fp16_verify", "sedeploy.quantize"),
    ("sedeploy.backends",),
    ("sedeploy.build", "sedeploy.int8_budget", "sedeploy.int8_check"),
    ("sedeploy.bench",),
    ("sedeploy.serving",),
    ("sedeploy.cli", "sedeploy.__main__"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every sedeploy module ``name`` imports, at the top or inside a function (``from sedeploy.x import y``
    counts as ``sedeploy.x.y`` when that is a module, else ``sedeploy.x``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sedeploy"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sedeploy":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return found - {name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def _layer(module: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return None


def test_every_module_has_a_layer():
    missing = sorted(m for m in _modules() if m != "sedeploy" and _layer(m) is None)
    assert not missing, f"modules with no layer in tests/test_layering.py LAYERS: {missing}"


def test_imports_never_go_up_a_layer():
    upward = sorted(f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
                    for a, outs in _graph().items() for b in outs
                    if a != "sedeploy" and b != "sedeploy" and _layer(b) > _layer(a))
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    # a package's __init__ re-exporting its submodules is not a cycle of the code: the package node is split from
    # its submodules by counting only edges between modules that are not each other's package
    def edges(a):
        return {b for b in graph[a] if b in graph and not a.startswith(b + ".") and not b.startswith(a + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(edges(v)):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state and (cycle := visit(v)):
            pytest.fail("import cycle: " + " → ".join(cycle))


def test_no_private_name_imported_across_modules():
    mods = _modules()
    found = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sedeploy"):
                found += [f"{name}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    """The graph reader finds an import inside a function (the kind a reader cannot see at the top)."""
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from sedeploy.bench.timing import time_runners\n    import sedeploy.cli\n")
    assert _imports("sedeploy.passes.x", src, {"sedeploy.bench.timing", "sedeploy.cli"}) == {
        "sedeploy.bench.timing", "sedeploy.cli"}
