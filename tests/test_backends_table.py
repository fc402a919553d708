"""The backend table and the runner protocol: one place that maps engines to backends and runners."""
from __future__ import annotations

import numpy as np
import pytest

from sedeploy.backends import BACKENDS, Runner, backend, backend_for_engine, open_runner, require, sidecar_path
from sedeploy.errors import MissingDependencyError, SedeployError


@pytest.mark.parametrize("name, key, sidecar", [
    ("m.fp32.ort-opt.onnx", "ort", "m.fp32.ort.json"), ("m.int8-cpu.onnx", "ort", "m.int8-cpu.ort.json"),
    ("m.fp16.plan", "trt", "m.fp16.trt.json"), ("m.int8-trt.ov.xml", "openvino", "m.int8-trt.ov.json")])
def test_engines_map_to_one_backend_and_sidecar(tmp_path, name, key, sidecar):
    assert backend_for_engine(tmp_path / name).name == key
    assert sidecar_path(tmp_path / name) == tmp_path / sidecar


def test_unknown_engine_and_backend_are_clear_errors(tmp_path):
    with pytest.raises(SedeployError, match=r"\.plan"):
        backend_for_engine(tmp_path / "model.bin")
    with pytest.raises(SedeployError, match="ort, trt, openvino"):
        backend("onnx")


def test_table_rows_are_complete():
    for key, row in BACKENDS.items():
        assert row.name == key and row.kinds and row.engine_suffixes and row.sidecar_suffix.endswith(".json")
    assert "int8-cpu" not in BACKENDS["trt"].kinds  # QOperator INT8 is never handed to TensorRT


def test_missing_optional_backend_is_exit_4_with_the_install_hint(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorrt" else real(n, *a))
    with pytest.raises(MissingDependencyError, match=r"sedeploy\[tensorrt\]") as err:
        require("trt", "Building TensorRT engines")
    assert err.value.exit_code == 4


class _Echo(Runner):
    backend = "echo"

    def __init__(self):
        super().__init__()
        self.events = []

    def _activate(self):
        self.events.append("activate")

    def _infer(self, x):
        return x * 2

    def _deactivate(self):
        self.events.append("deactivate")


def test_runner_protocol_activate_infer_deactivate():
    r = _Echo()
    with pytest.raises(SedeployError, match="not active"):
        r.infer(np.ones(2))
    with r:
        assert r.is_active
        np.testing.assert_array_equal(r.infer(np.ones(2)), [2, 2])
    assert not r.is_active and r.events == ["activate", "deactivate"]


def test_open_runner_passes_only_the_options_a_backend_takes(tiny_onnx):
    runner = open_runner(tiny_onnx, threads=1, providers=None, optimization="extended")
    assert runner.backend == "ort" and runner.threads == 1 and runner.optimization == "extended"
    assert not runner.is_active  # opening is cheap; activate() loads the session
    with runner:
        out = runner.infer(np.zeros((2, 3, 32, 32), np.float32))
    assert out.shape == (2, 10)


def test_auto_backend_rule(monkeypatch, caplog):
    """`--backend auto`: OpenVINO when it imports on x86-64 (measured faster on CPU), else ONNX Runtime; an
    installed openvino that does not import is named in a warning and not chosen."""
    import importlib.util
    import platform
    import sys
    import types

    from sedeploy.backends import default_cpu_backend, resolve_backend

    real = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "openvino", types.ModuleType("openvino"))  # imports, whether installed or not
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "openvino" else real(n, *a))
    assert default_cpu_backend() == "openvino" and resolve_backend("auto") == "openvino"
    assert resolve_backend("trt") == "trt"
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else real(n, *a))
    assert default_cpu_backend() == "ort"
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "openvino" else real(n, *a))
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert default_cpu_backend() == "ort"
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setitem(sys.modules, "openvino", None)  # installed (find_spec) but `import openvino` fails
    with caplog.at_level("WARNING", logger="sedeploy"):
        assert default_cpu_backend() == "ort"
    assert "openvino package does not import" in caplog.text and "--backend ort" in caplog.text


def test_every_table_backend_module_provides_build_and_runner():
    import importlib

    for row in BACKENDS.values():
        module = importlib.import_module(row.module)  # importing a backend module imports no backend library
        assert callable(getattr(module, "build_engine")) and issubclass(getattr(module, row.runner), Runner)


def test_importing_the_library_modules_loads_no_heavy_library():
    """Lazy heavy imports: the CLI, the pipeline, bench, the serving client and every backend module import without
    torch, ONNX Runtime, OpenVINO, TensorRT or onnx (checked in a fresh interpreter, where nothing is loaded yet)."""
    import subprocess
    import sys

    modules = ["sedeploy.cli", "sedeploy.build", "sedeploy.preprocess", "sedeploy.bench.run",
               "sedeploy.serving.client", *(row.module for row in BACKENDS.values())]
    heavy = ("torch", "onnxruntime", "openvino", "tensorrt", "onnx", "tritonclient")
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(','.join(h for h in {heavy!r} if h in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"loaded at import time: {out.stdout.strip()}"
