"""Shared fixtures. Tests that need the research images in ../shared/data skip with a reason without them.

``--max-cpu-isa avx2`` (or ``SEDEPLOY_TEST_MAX_CPU_ISA=avx2``) runs the tests as on an AVX2-only CPU (an AMD EPYC)
on an AVX-512 / AMX Xeon, so that a test asserting what only one ISA gives fails on the machine at hand:
``python -m pytest --max-cpu-isa avx2 tests/test_foreign.py``. It sets, for this run and the processes it starts,
the caps each library reads at load time (:data:`ISA_CAPS`); set SEDEPLOY_TEST_CACHE to a fresh folder so the
test models are also trained under the cap. ONNX Runtime has no such switch (MLAS picks its kernels from CPUID),
so its kernels stay those of the CPU; OpenVINO 2026.4's own kernels honour OV_CPU_MAX_ISA only in debug-caps
builds (its oneDNN kernels honour ONEDNN_MAX_CPU_ISA in every build).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

#: per ISA: the environment that caps each library's kernel dispatch (read when the library loads)
ISA_CAPS = {
    "avx2": {
        "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN in PyTorch and in OpenVINO's CPU plugin
        "DNNL_MAX_CPU_ISA": "AVX2",  # the same, older name
        "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own vectorized kernels
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL (PyTorch's BLAS)
        "OPENBLAS_CORETYPE": "Haswell",  # OpenBLAS (numpy's BLAS)
        "OV_CPU_MAX_ISA": "AVX2",  # OpenVINO's own kernels (debug-caps builds only in 2026.4)
    },
}


def pytest_addoption(parser):
    parser.addoption("--max-cpu-isa", choices=sorted(ISA_CAPS), default=os.environ.get("SEDEPLOY_TEST_MAX_CPU_ISA"),
                     help="run as on a CPU with at most this ISA (caps PyTorch, oneDNN, OpenVINO's oneDNN, MKL and "
                          "OpenBLAS; ONNX Runtime has no cap). Env: SEDEPLOY_TEST_MAX_CPU_ISA.")


def pytest_configure(config):
    isa = config.getoption("--max-cpu-isa")
    if not isa:
        return
    if isa not in ISA_CAPS:
        raise pytest.UsageError(f"--max-cpu-isa / SEDEPLOY_TEST_MAX_CPU_ISA {isa!r}: expected one of "
                                f"{sorted(ISA_CAPS)}")
    loaded = [m for m in ("torch", "openvino", "onnxruntime") if m in sys.modules]
    if loaded:  # too late for them: they read the caps when they load
        raise pytest.UsageError(f"--max-cpu-isa {isa}: {', '.join(loaded)} was imported before the cap could be set; "
                                f"set the variables in the environment instead: "
                                + " ".join(f"{k}={v}" for k, v in ISA_CAPS[isa].items()))
    for key, value in ISA_CAPS[isa].items():
        os.environ[key] = value  # subprocesses the tests start inherit it


def pytest_report_header(config):
    isa = config.getoption("--max-cpu-isa")
    if isa:
        return [f"CPU ISA capped to {isa}: " + " ".join(f"{k}={v}" for k, v in ISA_CAPS[isa].items())
                + " (ONNX Runtime: no cap exists; MLAS uses the CPU's own ISA)"]
    return []

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CALIB = REPO / "calib"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"research images not available: {SHARED_DATA} is absent (it sits beside the checkout in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def calib_dir() -> Path:
    return CALIB


@pytest.fixture(scope="session")
def tiny_model():
    """A small SE-ResNet-18 (base width 8): 8 SE blocks, exports and runs in well under a second."""
    from sedeploy.model import build_model

    return build_model(18, base_channels=8, num_classes=10, seed=3)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tmp_path_factory) -> Path:
    from sedeploy.export import export_onnx

    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    return export_onnx(tiny_model, path, input_size=32)


def _run_folder(tmp_path_factory) -> Path:
    """A folder of this test run that every pytest-xdist worker shares (their temp folders share a parent); without
    xdist the session's own temp folder, never a parent that other runs (another --basetemp) would share."""
    import os

    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def run_folder(tmp_path_factory) -> Path:
    """:func:`_run_folder` as a fixture: where work shared by the xdist workers of one run goes."""
    return _run_folder(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_trained_art(tmp_path_factory):
    """The tiny *trained* SE-ResNet-18 (tests/tiny_trained.py), trained once per test run and shared by the
    pytest-xdist workers (their temp folders share a parent; a file lock makes one worker train)."""
    import os

    from tiny_trained import tiny_trained

    base = os.environ.get("SEDEPLOY_TEST_CACHE") or _run_folder(tmp_path_factory) / "tiny-trained-cache"
    return tiny_trained(base)


@pytest.fixture(scope="session")
def foreign_art(tmp_path_factory):
    """The third-party-style MobileNetV3-like model (tests/foreign_model.py): fixed batch 1, 48 px, 1001 classes
    with background, Softmax output, hard-sigmoid SE; trained once per test run like ``tiny_trained_art``."""
    import os

    from foreign_model import foreign_model

    base = os.environ.get("SEDEPLOY_TEST_CACHE") or _run_folder(tmp_path_factory) / "tiny-trained-cache"
    return foreign_model(base)


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_onnx, calib_dir, tmp_path_factory):
    """The tiny SE-ResNet-18's FP16 artifact and both INT8 flavours (TensorRT: Q/DQ in the FP16 graph); the TensorRT
    backend tests (fake and real bindings) build from them."""
    from sedeploy.quantize import calibrate
    from sedeploy.fp16 import convert_fp16
    from sedeploy.quantize import quantize_model
    from sedeploy.preprocess import Preprocess

    out = tmp_path_factory.mktemp("trt-artifacts")
    cal = calibrate(tiny_onnx, calib_dir, method="percentile", progress=False, cache_dir=out / "cc",
                    preprocess=Preprocess(size=32, resize_short=36))
    convert_fp16(tiny_onnx, out / "tiny.fp16.onnx")
    quantize_model(tiny_onnx, cal, out / "tiny.int8-trt.onnx", flavour="trt")
    quantize_model(tiny_onnx, cal, out / "tiny.int8-cpu.onnx", flavour="cpu")
    return {"fp32": tiny_onnx, "fp16": out / "tiny.fp16.onnx", "int8-trt": out / "tiny.int8-trt.onnx",
            "int8-cpu": out / "tiny.int8-cpu.onnx"}


#: fixtures that train a network when a run first asks for them (tens of seconds): a test using one is slow
TRAINING_FIXTURES = ("foreign_art",)


def pytest_collection_modifyitems(config, items):
    """Tests that need a network trained at test time run in the full suite, not in the `-m "not slow"` loop."""
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in TRAINING_FIXTURES):
            item.add_marker(pytest.mark.slow)
