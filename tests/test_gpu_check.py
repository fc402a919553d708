"""benchmarks/gpu_check.py's pure parts: the per-engine verdict, the exit code, and what it does without a GPU.
(The check itself needs an NVIDIA GPU and TensorRT; nothing here runs a TensorRT engine.)"""
from __future__ import annotations

import copy
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from fake_tensorrt import FAKE_GPU, make_fake_tensorrt

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _good(precision: str) -> dict:
    layers = [{"name": f"l{i}", "type": "CaskConvolution", "precision": precision, "inputs": [precision],
               "outputs": [precision]} for i in range(3)]
    return {"layer_precisions": {precision: 3}, "layers": layers, "unreadable_layers": [], "build_seconds": 12.5,
            "layout": "Format/Datatype (TensorRT 10.x)", "images": 256, "top1_agreement_vs_ort": 0.996,
            "max_abs_diff_vs_ort": 0.02, "latency_ms_p50": {"1": 0.9, "8": 2.1, "32": 6.4}}


@pytest.fixture
def good(gpu_check):
    return {kind: _good(p) for kind, p in gpu_check.GRAPH_PRECISION.items()}


def test_all_pass_exit_0(gpu_check, good):
    code, lines = gpu_check.verdict(good, gpu_check.MIN_AGREEMENT)
    assert code == 0 and lines[-1] == "VERDICT: PASS"
    assert [line for line in lines if not line.startswith(" ")][:3] == ["fp32: PASS", "fp16: PASS", "int8-trt: PASS"]
    assert len(lines) <= 24  # one screen


@pytest.mark.parametrize("breakage, expected", [
    (lambda c: c["unreadable_layers"].append({"name": "conv7", "reason": "input tensor 'x' has neither ..."}),
     "1 layer(s) with unreadable precision (conv7)"),
    (lambda c: c.pop("unreadable_layers"), "no record of unreadable layers"),
    (lambda c: c.update(layers=[], layer_precisions={}), "the engine inspector listed no layers"),
    (lambda c: c.update(layer_precisions={"fp32": 3}), "no layer runs in int8"),
    (lambda c: c.update(top1_agreement_vs_ort=0.5), "top-1 50.00% (≥ 90% needed)"),
    (lambda c: c.update(max_abs_diff_vs_ort=float("nan")), "max |Δlogit| nan"),
    (lambda c: c["latency_ms_p50"].pop("32"), "(missing batch 32)"),
    (lambda c: c.clear() or c.update(error="TensorRT 10.16.1.11 could not build an engine"), "built       FAIL"),
    (lambda c: c.update(run_error="TensorRT failed to run 'x.plan'"), "the plan did not run"),
])
def test_any_failed_check_fails_the_engine_exit_3(gpu_check, good, breakage, expected):
    bad = copy.deepcopy(good)
    breakage(bad["int8-trt"])
    code, lines = gpu_check.verdict(bad, gpu_check.MIN_AGREEMENT)
    assert code == 3 and lines[-1] == "VERDICT: FAIL (int8-trt)"
    assert "int8-trt: FAIL" in lines and "fp32: PASS" in lines
    assert any(expected in line for line in lines), lines


def test_an_engine_not_checked_fails(gpu_check, good):
    del good["fp16"]
    code, lines = gpu_check.verdict(good, gpu_check.MIN_AGREEMENT)
    assert code == 3 and "fp16: FAIL (not checked)" in lines


def test_verdict_reads_what_the_backend_records(gpu_check, tiny_artifacts, tmp_path, monkeypatch):
    """The sidecar keys the build writes are the ones the verdict reads (built here with tests/fake_tensorrt.py)."""
    from sedeploy.backends import tensorrt as T

    monkeypatch.setattr(T, "cuda_device", lambda: dict(FAKE_GPU))
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt("11.0.0"))
    meta = T.build_trt_engine(tiny_artifacts["int8-trt"], tmp_path, opt_batch=2, max_batch=4).metadata
    check = {**_good("int8"), **{k: meta[k] for k in ("layer_precisions", "layers", "unreadable_layers")}}
    ok, lines = gpu_check.engine_verdict("int8-trt", check, 0.9)
    assert ok and lines[1].startswith("  precisions  PASS"), lines
    check["unreadable_layers"] = [{"name": meta["layers"][0]["name"], "reason": "no format information"}]
    ok, lines = gpu_check.engine_verdict("int8-trt", check, 0.9)
    assert not ok and lines[1].startswith("  precisions  FAIL")


def test_without_tensorrt_and_gpu_it_says_so_and_exits_4(gpu_check, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 4
    assert "NOT VERIFIED" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.16.1.11"))
    assert gpu_check.main(["--out", str(tmp_path)]) == 4
    assert "TensorRT 10.16.1 is installed but no CUDA GPU" in capsys.readouterr().out
