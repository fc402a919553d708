"""sedeploy.layout: the manifest has one home (one reader, one writer, one rule for recorded paths)."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import sedeploy
from sedeploy.errors import SedeployError
from sedeploy.layout import MANIFEST, Manifest

PACKAGE = Path(sedeploy.__file__).parent
OWNER = PACKAGE / "layout.py"


def _manifest_literals(source: str) -> list[int]:
    """Lines of string constants in code that name the manifest file ("manifest.json", "out/manifest.json" …),
    docstrings left out (they may speak of it)."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and node.value.strip().rsplit("/", 1)[-1] == MANIFEST]


def test_the_scan_finds_a_manifest_literal():
    """The check below can fail: code naming the file is found, a docstring or help text speaking of it is not."""
    code = 'def f(d):\n    """Reads manifest.json."""\n    return d / "manifest.json"\nHELP = "see manifest.json."\n'
    assert _manifest_literals(code) == [3]
    assert _manifest_literals('p = f"{d}/" + "/manifest.json"') == [1]


def test_only_layout_names_the_manifest_file():
    """Every other module (and the benchmark scripts) asks sedeploy.layout (MANIFEST, Manifest) instead of naming
    or parsing the file."""
    files = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "benchmarks").rglob("*.py")]
    offenders = {str(p.relative_to(PACKAGE.parent)): lines for p in sorted(files) if p != OWNER
                 if (lines := _manifest_literals(p.read_text(encoding="utf-8")))}
    assert not offenders, f"modules naming {MANIFEST} in code (use sedeploy.layout.MANIFEST / Manifest): {offenders}"
    assert _manifest_literals(OWNER.read_text(encoding="utf-8"))  # the owner does


def _write(folder: Path, data) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(data if isinstance(data, str) else json.dumps(data))


@pytest.mark.parametrize("data, message", [
    (None, "has no manifest.json"),
    ("{not json", "is not valid JSON"),
    ([1, 2], "is not a build-engine manifest"),
    ({"engines": ["m.fp32.onnx"]}, "is not a build-engine manifest"),
    ({"artifacts": [{"file": "m.fp32.onnx"}]}, "is not a build-engine manifest"),
    ({"engines": {"path": "m.fp32.onnx"}}, "is not a build-engine manifest"),
    ({"engines": [{"path": ""}]}, "is not a build-engine manifest"),
])
def test_read_refuses_what_is_not_a_manifest(tmp_path, data, message):
    d = tmp_path / "eng"
    if data is None:
        d.mkdir()
    else:
        _write(d, data)
    with pytest.raises(SedeployError, match=message) as err:
        Manifest.read(d, alternative="the engine files themselves")
    assert err.value.exit_code == 2 and "the engine files themselves" in err.value.fix


def test_accessors_and_listed_files(tmp_path):
    d = tmp_path / "eng"
    _write(d, {"out_dir": str(d), "calibration": {"folder": "calib", "images": 3, "seed": 1},
               "artifacts": [{"path": str(d / "m.fp32.onnx"), "kind": "fp32"}],
               "engines": [{"path": str(d / "m.fp32.ov.xml"), "sidecar": str(d / "m.fp32.ov.json"),
                            "files": [str(d / "m.fp32.ov.xml"), str(d / "m.fp32.ov.bin"), str(d / "m.fp32.ov.json")]}]})
    m = Manifest.read(d)
    assert m.out_dir == str(d) and m.calibration == {"folder": "calib", "images": 3, "seed": 1}
    assert [a["kind"] for a in m.artifacts] == ["fp32"] and len(m.engines) == 1
    m.engines[0]["path"] = "changed"  # copies: the manifest itself is not changed through them
    assert m.engines[0]["path"] == str(d / "m.fp32.ov.xml")
    assert m.listed_files() == {"m.fp32.onnx", "m.fp32.ov.xml", "m.fp32.ov.bin", "m.fp32.ov.json"}
    _write(d, {"calibration": {"folder": "calib"}})  # no image count: not a usable record
    assert Manifest.read(d).calibration is None and Manifest.read(d).listed_files() == set()


def test_locate_takes_the_builds_files_from_this_folder(tmp_path, monkeypatch):
    """A copied folder uses its own files, never the original's; an input used where it was is taken from its
    recorded path; a bare name written by hand is this folder's file."""
    orig, copy, inputs = tmp_path / "orig", tmp_path / "copy", tmp_path / "inputs"
    for d in (orig, copy, inputs):
        d.mkdir()
    for d in (orig, copy):
        (d / "m.fp32.onnx").write_bytes(b"x")
    (orig / "m.fp32.ort.json").write_text("{}")
    (inputs / "given.fp16.onnx").write_bytes(b"x")
    (copy / "hand.onnx").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    _write(copy, {"out_dir": str(orig), "engines": [{"path": str(orig / "m.fp32.onnx"),
                                                     "sidecar": str(orig / "m.fp32.ort.json")}]})
    m = Manifest.read(copy)
    assert m.locate(str(orig / "m.fp32.onnx")) == copy / "m.fp32.onnx"
    assert m.find(str(orig / "m.fp32.ort.json")) is None  # the original's sidecar is not this folder's
    with pytest.raises(SedeployError, match=r"lists 'm\.fp32\.ort\.json', which is not in '.*copy'"):
        m.locate_entry(m.engines[0])
    assert m.locate("inputs/given.fp16.onnx") == Path("inputs/given.fp16.onnx")
    assert m.locate("hand.onnx") == copy / "hand.onnx"
    (inputs / "given.fp16.onnx").unlink()
    with pytest.raises(SedeployError, match=r"not at 'inputs/given\.fp16\.onnx' \(an input the build used"):
        m.locate("inputs/given.fp16.onnx")


def test_write_is_atomic_and_read_back(tmp_path, monkeypatch):
    d = tmp_path / "eng"
    d.mkdir()
    Manifest.write(d, {"out_dir": str(d), "artifacts": [{"path": d / "m.fp32.onnx"}]})  # Paths written as text
    assert Manifest.read(d).artifacts == [{"path": str(d / "m.fp32.onnx")}]
    before = (d / MANIFEST).read_bytes()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(KeyboardInterrupt):
        Manifest.write(d, {"engines": []})
    assert (d / MANIFEST).read_bytes() == before and sorted(p.name for p in d.iterdir()) == [MANIFEST]
