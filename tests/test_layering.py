"""The package's layering, checked from the source (no imports run): sedeploy's modules import only from their own
layer or the layers below it, lazy imports inside functions included, so the import graph has no cycle and a
reader can take the modules in data-flow order (docs/design.md draws the same order).

Where imports sit: sedeploy's own modules are imported at the top of a module. Only heavy libraries (torch,
ONNX Runtime, OpenVINO, onnxscript, TensorRT, Triton's clients, matplotlib, ...) are imported inside the functions
that need them, and so are the few sedeploy modules that import one of those at their top (``HEAVY_MODULES``), so
that ``import sedeploy`` and ``sedeploy --help`` stay cheap. Tests use sedeploy's public names only."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sedeploy"
TESTS = Path(__file__).resolve().parent

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

#: libraries that take long to import (or need a GPU or a server): imported only inside the functions that use them
HEAVY_LIBRARIES = ("torch", "torchvision", "onnxruntime", "openvino", "nncf", "onnxscript", "onnx_ir", "tensorrt",
                   "tritonclient", "pytriton", "matplotlib")

#: sedeploy modules that import a heavy library at their top, and why; every other module imports them inside the
#: function that needs them (and never at its top)
HEAVY_MODULES: dict[str, str] = {
    "sedeploy.model": "torch: the network is a torch.nn.Module",
    "sedeploy.checkpoints": "torch: checkpoints are read with torch.load into the model's state dict",
    "sedeploy.flops": "torch: multiply-adds are counted with forward hooks on the torch model",
    "sedeploy.info": "torch, through sedeploy.model and sedeploy.flops: the model card builds the network",
    "sedeploy.passes.se_parts": "onnxscript and onnx_ir: the SE matchers work on onnx_ir graphs with onnxscript's "
                                "MatchResult",
    "sedeploy.passes.se_patterns": "onnxscript and onnx_ir (as se_parts)",
    "sedeploy.passes.se_squeeze": "onnxscript and onnx_ir (as se_parts)",
}

#: Packages and modules whose sedeploy imports inside functions need not be at the top yet. Empty: every module
#: follows the rule; keep it empty.
NOT_YET_AT_TOP: tuple[str, ...] = ()

#: what `sedeploy --help` and every command's --help must not import
NOT_FOR_HELP = ("torch", "onnxruntime", "openvino", "nncf", "onnxscript", "onnx_ir", "tensorrt", "tritonclient",
                "pytriton", "matplotlib")


@dataclass(frozen=True)
class Import:
    target: str  # the sedeploy module imported
    lazy: bool  # inside a function
    line: int


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@lru_cache(maxsize=None)
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _statements(tree: ast.AST):
    """Every import statement of a module with whether it sits inside a function (class bodies and ``if`` /
    ``try`` blocks at the top count as the top)."""
    def walk(node, lazy):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, lazy
            yield from walk(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    yield from walk(tree, False)


def _import_list(name: str, path: Path, known: set[str]) -> list[Import]:
    """Every sedeploy module ``name`` imports, at the top or inside a function (``from sedeploy.x import y``
    counts as ``sedeploy.x.y`` when that is a module, else ``sedeploy.x``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node, lazy in _statements(_parse(path)):
        if isinstance(node, ast.Import):
            found += [Import(a.name, lazy, node.lineno) for a in node.names if a.name.split(".")[0] == "sedeploy"]
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target.split(".")[0] != "sedeploy":
            continue
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            found.append(Import(sub if sub in known else target, lazy, node.lineno))
    return [i for i in found if i.target != name]


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    return {i.target for i in _import_list(name, path, known)}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def _layer(module: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if _within(module, names):
            return i
    return None


def _heavy_import_at_top(path: Path) -> list[str]:
    """The heavy libraries a module imports at its top (outside ``if TYPE_CHECKING:``)."""
    tree = _parse(path)
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    found = []
    for node, lazy in _statements(tree):
        if lazy or id(node) in typing_only:
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        found += [n for n in names if n.split(".")[0] in HEAVY_LIBRARIES]
    return found


def test_every_module_has_a_layer():
    missing = sorted(m for m in _modules() if m != "sedeploy" and _layer(m) is None)
    assert not missing, f"modules with no layer in tests/test_layering.py LAYERS: {missing}"


def test_imports_never_go_up_a_layer():
    """Top-level and in-function imports alike."""
    mods = _modules()
    upward = sorted(f"{a}:{i.line} (layer {_layer(a)}) imports {i.target} (layer {_layer(i.target)})"
                    f"{' inside a function' if i.lazy else ''}"
                    for a, p in mods.items() for i in _import_list(a, p, set(mods))
                    if a != "sedeploy" and i.target != "sedeploy" and _layer(i.target) > _layer(a))
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def _load_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """What importing each module runs first, as Python does it: importing ``sedeploy.a.b`` from outside package
    ``sedeploy.a`` first runs ``sedeploy/a/__init__.py`` to its end (and everything it imports); a package's
    ``__init__`` runs the submodules it imports; ``from sedeploy.a import name`` inside ``sedeploy.a`` needs that
    ``__init__`` to have reached ``name``. (The package ``sedeploy`` itself is always loaded first.)"""
    edges: dict[str, set[str]] = {}
    for a, targets in graph.items():
        out = set()
        for t in targets:
            out.add(t)
            parts = t.split(".")
            for k in range(2, len(parts)):
                parent = ".".join(parts[:k])
                if not (a == parent or a.startswith(parent + ".")):
                    out.add(parent)
        edges[a] = {b for b in out if b in graph and b != a}
    return edges


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(edges):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def test_no_import_cycle():
    """Lazy imports included, and packages as Python loads them (their ``__init__`` first)."""
    cycle = _find_cycle(_load_edges(_graph()))
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_cycle_check_sees_a_cycle_through_a_package_init():
    """``sedeploy.a.x`` importing ``sedeploy.b.y`` while ``sedeploy/b/__init__.py`` imports ``sedeploy.b.z``, which
    imports ``sedeploy.a.x``: a cycle, although no module imports one that imports it back directly."""
    graph = {"sedeploy.a": set(), "sedeploy.a.x": {"sedeploy.b.y"}, "sedeploy.b": {"sedeploy.b.y", "sedeploy.b.z"},
             "sedeploy.b.y": set(), "sedeploy.b.z": {"sedeploy.a.x"}}
    assert _find_cycle(_load_edges(graph)) is not None
    del graph["sedeploy.b.z"], graph["sedeploy.b"]
    assert _find_cycle(_load_edges(graph)) is None


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
    assert all(i.lazy for i in _import_list("sedeploy.passes.x", src, {"sedeploy.bench.timing", "sedeploy.cli"}))


# ------------------------------------------------------------------------------------------ where imports sit
def test_sedeploy_imports_are_at_the_top():
    """A sedeploy module is imported inside a function only when it is one of ``HEAVY_MODULES``."""
    mods = _modules()
    lazy = sorted(f"{name}:{i.line} imports {i.target} inside a function"
                  for name, path in mods.items() if not _within(name, NOT_YET_AT_TOP)
                  for i in _import_list(name, path, set(mods)) if i.lazy and i.target not in HEAVY_MODULES)
    assert not lazy, ("sedeploy imports inside functions (move them to the top of the module; only the modules in "
                      "HEAVY_MODULES stay inside the function):\n" + "\n".join(lazy))


def test_heavy_libraries_and_heavy_modules_are_imported_at_the_top_only_by_heavy_modules():
    """A module not in ``HEAVY_MODULES`` imports no heavy library and no heavy module at its top; and each entry of
    ``HEAVY_MODULES`` still does (else it is removed from the list and imported at the top like the others)."""
    mods = _modules()
    heavy_at_top = {name: _heavy_import_at_top(path) + sorted(i.target for i in _import_list(name, path, set(mods))
                                                               if not i.lazy and i.target in HEAVY_MODULES)
                    for name, path in mods.items()}
    wrong = sorted(f"{n} imports {', '.join(h)} at its top" for n, h in heavy_at_top.items()
                   if h and n not in HEAVY_MODULES)
    assert not wrong, ("heavy imports at the top of a module (import them inside the function that needs them, or "
                       "list the module in HEAVY_MODULES with the reason):\n" + "\n".join(wrong))
    stale = sorted(n for n in HEAVY_MODULES if n not in mods or not heavy_at_top[n])
    assert not stale, f"HEAVY_MODULES entries that no longer import anything heavy at their top: {stale}"


_HELP_PROBE = """
import json, sys
from sedeploy.cli import cli
runs = [["--help"]] + [[name, "--help"] for name in sorted(cli.commands)]
for args in runs:
    try:
        cli.main(args=args, prog_name="sedeploy", standalone_mode=False)
    except SystemExit:
        pass
print(json.dumps({"commands": len(runs) - 1, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_help_imports_no_heavy_library():
    """`sedeploy --help` and every command's --help, in a fresh interpreter, import none of the heavy libraries."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(PACKAGE.parent), os.environ.get(
        "PYTHONPATH", "")) if p)}
    res = subprocess.run([sys.executable, "-c", _HELP_PROBE], capture_output=True, text=True, env=env, timeout=120,
                         cwd=PACKAGE.parent)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["commands"] >= 8  # the probe saw the commands
    heavy = sorted(set(out["loaded"]) & set(NOT_FOR_HELP))
    assert not heavy, f"`sedeploy --help` imports {heavy}"


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """Each module imported first in a fresh interpreter (an import cycle shows only for some first imports), and
    a module outside ``HEAVY_MODULES`` loads no heavy library."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(PACKAGE.parent), os.environ.get(
        "PYTHONPATH", "")) if p)}
    # the command line's modules run it when imported (``__main__``): with --help, which exits
    probe = ("import importlib, json, sys\nname, sys.argv = sys.argv[1], ['sedeploy', '--help']\ntry:\n"
             "    importlib.import_module(name)\nexcept SystemExit:\n    pass\n"
             "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    failed = []
    for name in sorted(_modules()):
        res = subprocess.run([sys.executable, "-c", probe, name], capture_output=True, text=True, env=env,
                             timeout=120, cwd=PACKAGE.parent)
        if res.returncode != 0:
            failed.append(f"{name}: {(res.stderr.strip().splitlines() or ['exit ' + str(res.returncode)])[-1]}")
            continue
        loaded = set(json.loads(res.stdout.strip().splitlines()[-1])) & set(HEAVY_LIBRARIES)
        if loaded and not _within(name, ("sedeploy.cli", "sedeploy.__main__")) and name not in HEAVY_MODULES:
            failed.append(f"{name}: imports {sorted(loaded)}")
    assert not failed, "\n".join(failed)


# ------------------------------------------------------------------------------------------ tests use public names
def _test_files() -> list[Path]:
    return sorted(TESTS.rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_uses(path: Path) -> list[str]:
    """Private sedeploy names a test file reaches: ``from sedeploy.x import _y``, ``x._y`` on a name bound to a
    sedeploy module, ``monkeypatch.setattr(x, "_y", ...)`` and ``"sedeploy.x._y"`` strings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = set(_modules())
    bound: dict[str, str] = {}  # local name → sedeploy module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sedeploy":
            for a in node.names:
                if _private(a.name):
                    found.append(f"{node.lineno}: from {node.module} import {a.name}")
                if f"{node.module}.{a.name}" in modules:
                    bound[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "sedeploy":
                    bound[a.asname or "sedeploy"] = a.name if a.asname else "sedeploy"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                found.append(f"{node.lineno}: {'.'.join([bound[value.id], *reversed(chain)])}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("setattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value) and isinstance(node.args[0], ast.Name) and node.args[0].id in bound):
            found.append(f"{node.lineno}: {node.func.attr}({bound[node.args[0].id]}, {node.args[1].value!r})")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and re.fullmatch(r"sedeploy(\.\w+)*", node.value)
              and any(_private(p) for p in node.value.split(".")[1:])):
            found.append(f"{node.lineno}: '{node.value}'")
    return found


def test_tests_use_public_names_only():
    found = [f"tests/{p.relative_to(TESTS)}:{use}" for p in _test_files() for use in _private_uses(p)]
    assert not found, ("tests reaching private sedeploy names (make the name public with a docstring where it is a "
                       "real concept, test through the public API, or keep test-only helpers in tests/):\n"
                       + "\n".join(found))


def test_the_test_checker_sees_private_uses(tmp_path):
    src = tmp_path / "test_x.py"
    src.write_text("import sedeploy.backends.tensorrt as T\nfrom sedeploy.serving import server\n"
                   "from sedeploy.bench.probe import _model\n\n"
                   "def test(monkeypatch):\n    monkeypatch.setattr(T, '_LOGGER', None)\n    server._start()\n"
                   "    monkeypatch.setattr('sedeploy.fp16._converter', None)\n    server.start_server()\n")
    uses = _private_uses(src)
    assert len(uses) == 4 and not any("start_server" in u for u in uses), uses
