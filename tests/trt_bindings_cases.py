"""sedeploy's TensorRT backend through the REAL TensorRT Python bindings of one release (10.x or 11.x).

Not collected by a plain ``pytest tests`` (the name does not start with ``test_``): tests/test_trt_bindings.py runs
this file once per TensorRT version, in a process of its own whose environment (tests/trt_bindings.py) puts that
version's unpacked ``tensorrt_bindings`` on the path over stub native libraries. What is real here: the module,
its enums and their values, ``Dims``, ``ILogger``/``Severity``, ``DataType``, the pybind11 signatures every call is
checked against and the real ``Builder``/``Runtime`` constructors' argument checks. What is not: building,
deserializing and executing (tests/fake_tensorrt.py, executing through ONNX Runtime on CPU) — no TensorRT engine is
built or run by these tests.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sedeploy.backends import tensorrt as T
from sedeploy.errors import SedeployError

from fake_tensorrt import FAILURES, FAKE_GPU, RealSignatures, make_fake_tensorrt

VERSION = os.environ.get("SEDEPLOY_TRT_BINDINGS_VERSION")
MAJOR = int(VERSION.split(".")[0]) if VERSION else None


@pytest.fixture(scope="session")
def real():
    if not VERSION:
        pytest.skip("run through tests/test_trt_bindings.py (it sets up the real bindings per TensorRT version)")
    return importlib.import_module("tensorrt_bindings")


@pytest.fixture(scope="session")
def artifacts(request):
    """The tiny SE-ResNet-18's FP32/FP16/INT8-trt artifacts: made once by the parent test process for all releases
    (``$SEDEPLOY_TRT_ARTIFACTS``), else here (conftest's ``tiny_artifacts``)."""
    given = os.environ.get("SEDEPLOY_TRT_ARTIFACTS")
    if given:
        return {kind: Path(path) for kind, path in json.loads(given).items()}
    return request.getfixturevalue("tiny_artifacts")


@pytest.fixture
def trt_over_real(real, monkeypatch):
    """Install the fake over the real module as `tensorrt`, with a fake GPU description; returns the installer."""
    monkeypatch.setattr(T, "cuda_device", lambda: dict(FAKE_GPU))

    def install(**kwargs):
        module = make_fake_tensorrt(real=real, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", module)  # T.trt_logger makes it a logger of its own
        return module
    return install


def _ort(path, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_the_module_is_the_real_binding_of_this_release(real):
    assert real.__version__ == VERSION
    site = Path(os.environ["SEDEPLOY_TRT_BINDINGS_SITE"]).resolve()
    binary = Path(real.tensorrt.__file__).resolve()
    assert binary.is_relative_to(site) and binary.name == "tensorrt.so"
    assert type(real.DataType.HALF).__module__.startswith("tensorrt_bindings")  # a pybind11 enum, not ours
    # the wheel is only on this process's path, never installed: `import tensorrt` does not find it
    spec = importlib.util.find_spec("tensorrt")
    assert spec is None or not Path(spec.origin or "").resolve().is_relative_to(site)
    # 11 renumbered the enums and removed the weak-typing flags
    flag = real.NetworkDefinitionCreationFlag
    if MAJOR == 10:
        assert int(flag.STRONGLY_TYPED) == 1 and int(flag.EXPLICIT_BATCH) == 0
        assert {"FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"} <= set(real.BuilderFlag.__members__)
    else:
        assert int(flag.STRONGLY_TYPED) == 0 and "EXPLICIT_BATCH" not in flag.__members__
        assert not {"FP16", "INT8", "BF16", "OBEY_PRECISION_CONSTRAINTS"} & set(real.BuilderFlag.__members__)


def test_sedeploys_logger_passes_the_real_constructors_argument_check(real, trt_over_real):
    trt = trt_over_real()
    logger = T.trt_logger(trt)
    assert isinstance(logger, real.ILogger)
    for cls in (real.Builder, real.Runtime):
        with pytest.raises(TypeError, match="returned nullptr"):  # arguments accepted; the stub has no builder
            cls(logger)
        with pytest.raises(TypeError, match="incompatible constructor arguments"):
            cls(object())
    logger.log(real.ILogger.Severity.ERROR, "from the real enum")
    assert "[ERROR] from the real enum" in logger.take()


def test_the_real_binding_refuses_a_plain_int_for_an_enum(real):
    """What the fake's checker mirrors, shown on a real binding call that needs no native object:
    ``get_builder_plugin_registry(EngineCapability)`` accepts the enum member (the stub returns no registry) and
    refuses its integer value — so a hard-coded enum integer in sedeploy would fail against real TensorRT too."""
    assert real.get_builder_plugin_registry(real.EngineCapability.STANDARD) is None
    with pytest.raises(TypeError, match="incompatible function arguments"):
        real.get_builder_plugin_registry(int(real.EngineCapability.STANDARD))


def test_signature_checks_are_the_real_ones(real):
    """The checker the fake applies to every call refuses what the real binding refuses: a plain int where an enum
    is declared (so a hard-coded enum integer fails), a wrong keyword, a missing argument, a method this release
    does not have."""
    sigs = RealSignatures(real)
    sigs.check("IBuilderConfig", "set_memory_pool_limit", (real.MemoryPoolType.WORKSPACE, 1 << 30), {})
    sigs.check("IBuilderConfig", "set_memory_pool_limit", (), {"pool": real.MemoryPoolType.WORKSPACE,
                                                               "pool_size": 1})
    with pytest.raises(TypeError, match="incompatible function arguments"):
        sigs.check("IBuilderConfig", "set_memory_pool_limit", (0, 1 << 30), {})
    with pytest.raises(TypeError, match="incompatible function arguments"):
        sigs.check("IBuilderConfig", "set_memory_pool_limit", (), {"pool_type": real.MemoryPoolType.WORKSPACE,
                                                                   "pool_size": 1})
    with pytest.raises(TypeError, match="incompatible function arguments"):
        sigs.check("EngineInspector", "get_engine_information", (1,), {})
    sigs.check("IExecutionContext", "set_input_shape", ("input", (8, 3, 32, 32)), {})
    sigs.check("IExecutionContext", "set_input_shape", ("input", real.Dims((8, 3, 32, 32))), {})
    with pytest.raises(TypeError, match="incompatible function arguments"):
        sigs.check("IExecutionContext", "set_input_shape", ("input",), {})
    sigs.check("IOptimizationProfile", "set_shape", ("input", (1, 3), (2, 3), (4, 3)), {})
    with pytest.raises(AttributeError, match="has no method 'set_shape_v2'"):
        sigs.overloads("IOptimizationProfile", "set_shape_v2")
    # the fake's whole surface exists in this release, with the argument names the fake uses
    for cls, methods in {"Builder": ["create_network", "create_builder_config", "create_optimization_profile",
                                     "build_serialized_network"],
                         "IBuilderConfig": ["set_memory_pool_limit", "add_optimization_profile", "get_flag",
                                            "create_timing_cache", "set_timing_cache", "get_timing_cache"],
                         "ICudaEngine": ["get_tensor_name", "get_tensor_mode", "get_tensor_shape", "get_tensor_dtype",
                                         "get_tensor_profile_shape", "create_execution_context",
                                         "create_engine_inspector"],
                         "IExecutionContext": ["set_input_shape", "get_tensor_shape", "set_tensor_address",
                                               "execute_async_v3"],
                         "Runtime": ["deserialize_cuda_engine"], "OnnxParser": ["parse_from_file", "get_error"],
                         "ITimingCache": ["combine", "serialize"], "EngineInspector": ["get_engine_information"]
                         }.items():
        for method in methods:
            assert sigs.overloads(cls, method), (cls, method)
    for cls, prop in [("IBuilderConfig", "profiling_verbosity"), ("EngineInspector", "execution_context"),
                      ("ICudaEngine", "num_io_tensors"), ("INetworkDefinition", "num_inputs"),
                      ("OnnxParser", "num_errors"), ("ITensor", "shape")]:
        sigs.check_property(cls, prop)


def test_fake_refuses_a_hard_coded_enum_integer(real, trt_over_real):
    trt = trt_over_real()
    config = trt.Builder(T.trt_logger(trt)).create_builder_config()
    with pytest.raises(TypeError, match="incompatible"):
        config.set_memory_pool_limit(int(real.MemoryPoolType.WORKSPACE), 1)
    with pytest.raises(TypeError, match="incompatible"):
        config.profiling_verbosity = int(real.ProfilingVerbosity.DETAILED)
    config.profiling_verbosity = real.ProfilingVerbosity.DETAILED


@pytest.mark.parametrize("kind", ["fp32", "fp16", "int8-trt"])
def test_build_is_strongly_typed_with_this_releases_flags(trt_over_real, real, artifacts, tmp_path, kind):
    trt = trt_over_real()
    art = T.build_trt_engine(artifacts[kind], tmp_path, min_batch=1, opt_batch=2, max_batch=4)
    created = [args for name, args in trt.calls if name == "Builder.create_network"]
    # 10.x: STRONGLY_TYPED from the real enum (value 1 → flags 2); 11.x: no flag (deprecated, value 0 there)
    expected = 1 << int(real.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if MAJOR == 10 else 0
    assert created == [(expected,)] and expected == (2 if MAJOR == 10 else 0)
    assert not [c for c in trt.calls if c[0] == "IBuilderConfig.set_flag"]
    pool = [args for name, args in trt.calls if name == "IBuilderConfig.set_memory_pool_limit"]
    assert pool == [(real.MemoryPoolType.WORKSPACE, 4 << 30)] and type(pool[0][0]) is real.MemoryPoolType
    side = json.loads(art.sidecar.read_text())
    assert side["tensorrt_version"] == VERSION and side["network_flags"] == expected
    assert side["profile"] == {"input": "input", "min": [1, 3, 32, 32], "opt": [2, 3, 32, 32], "max": [4, 3, 32, 32]}
    assert side["unreadable_layers"] == [] and side["inspected_shape"] == [2, 3, 32, 32]
    counts = side["layer_precisions"]
    assert sum(counts.values()) == len(side["layers"]) > 30 and "unknown" not in counts
    assert {"fp32": {"fp32"}, "fp16": {"fp16"}, "int8-trt": {"int8", "fp16"}}[kind] == set(counts)


def test_inspector_reads_through_an_execution_context_at_the_opt_shape(trt_over_real, artifacts, tmp_path):
    trt = trt_over_real()
    art = T.build_trt_engine(artifacts["fp16"], tmp_path, min_batch=1, opt_batch=4, max_batch=8)
    names = [name for name, _ in trt.calls]
    at = names.index("EngineInspector.get_engine_information")
    assert names.index("ICudaEngine.create_execution_context") < at
    shape_calls = [args for name, args in trt.calls[:at] if name == "IExecutionContext.set_input_shape"]
    assert shape_calls == [("input", (4, 3, 32, 32))]
    fmt = [args for name, args in trt.calls if name == "EngineInspector.get_engine_information"]
    assert fmt == [(trt.LayerInformationFormat.JSON,)] and type(fmt[0][0]) is trt.real.LayerInformationFormat
    side = json.loads(art.sidecar.read_text())
    assert side["inspector_layout"] == ("Format/Datatype (TensorRT 10.x)" if MAJOR == 10
                                        else "Format + Datatype (TensorRT 11.x)")


def test_inspector_without_shapes_gives_unreadable_layers_not_a_pass(real, trt_over_real, artifacts, tmp_path):
    """What the inspector returns without an execution context (TensorRT: no format information) is recorded as
    unreadable layer by layer — it never counts as a precision."""
    from sedeploy.backends.trt_support import layer_precisions, precision_verdict

    trt = trt_over_real()
    art = T.build_trt_engine(artifacts["fp16"], tmp_path, min_batch=1, opt_batch=2, max_batch=4)
    runtime = trt.Runtime(T.trt_logger(trt))
    engine = runtime.deserialize_cuda_engine(art.path.read_bytes())
    bare = layer_precisions(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    assert bare["layers"] and len(bare["unreadable"]) == len(bare["layers"]) and set(bare["counts"]) == {"unknown"}
    assert any("unreadable precision" in p for p in precision_verdict(bare, "fp16"))
    ok = {"layers": art.metadata["layers"], "counts": art.metadata["layer_precisions"],
          "unreadable": art.metadata["unreadable_layers"]}
    assert precision_verdict(ok, "fp16") == []


@pytest.mark.parametrize("failure, message", [
    ("network", "could not create a network"),
    ("set_shape", "rejected the batch profile"),
    ("profile", "add_optimization_profile returned -1"),
    ("build", "could not build an engine"),
    ("deserialize", "could not deserialize the plan it just built"),
    ("context", "could not create an execution context to inspect"),
    ("set_input_shape", "refused the profile's opt shape"),
    ("inspector", "inspector refused the execution context"),
])
def test_every_build_return_code_is_checked(trt_over_real, artifacts, tmp_path, failure, message):
    trt_over_real(failures={failure})
    out = tmp_path / "out"
    with pytest.raises(SedeployError, match=message):
        T.build_trt_engine(artifacts["fp32"], out, min_batch=1, opt_batch=2, max_batch=4)
    assert not out.exists() or list(out.iterdir()) == []  # nothing published


def test_runner_through_real_dims_and_dtypes(trt_over_real, real, artifacts, tmp_path):
    trt = trt_over_real()
    src = artifacts["int8-trt"]
    art = T.build_trt_engine(src, tmp_path, min_batch=1, opt_batch=2, max_batch=4)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with T.TrtRunner(art.path, device=torch.device("cpu")) as runner:
        assert runner.profile == {"min": (1, 3, 32, 32), "opt": (2, 3, 32, 32), "max": (4, 3, 32, 32)}
        assert runner.input_shape == [None, 3, 32, 32] and runner.input_dtype == np.float32
        trt.calls.clear()
        got = runner.infer(x)
        assert np.array_equal(got, _ort(src, x))
        calls = [(n.split(".", 1)[1], a) for n, a in trt.calls if n.startswith("IExecutionContext.")]
        assert [c for c, _ in calls] == ["set_input_shape", "get_tensor_shape", "set_tensor_address",
                                         "set_tensor_address", "execute_async_v3"]


def test_half_io_through_the_real_datatype(trt_over_real, real, artifacts, tmp_path):
    trt_over_real()
    art = T.build_trt_engine(artifacts["fp16"], tmp_path, min_batch=1, opt_batch=2, max_batch=4)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with T.TrtRunner(art.path, device=torch.device("cpu")) as runner:
        assert runner.engine.get_tensor_dtype("input") is real.DataType.FLOAT  # the fp16 artifact casts inside
        got = runner.infer(x)
    assert np.array_equal(got, _ort(artifacts["fp16"], x))


@pytest.mark.parametrize("failure, message", [
    ("deserialize", "could not deserialize"), ("context", "could not create an execution context"),
    ("set_input_shape", "refused the profile's largest input shape"), ("execute", "TensorRT failed to run")])
def test_every_runner_return_code_is_checked(trt_over_real, artifacts, tmp_path, failure, message):
    trt = trt_over_real()
    art = T.build_trt_engine(artifacts["fp32"], tmp_path, min_batch=1, opt_batch=2, max_batch=4)
    trt.failures.add(failure)
    trt.fail_execute = failure == "execute"
    with pytest.raises(SedeployError, match=message):
        with T.TrtRunner(art.path, device=torch.device("cpu")) as runner:
            runner.infer(np.zeros((1, 3, 32, 32), np.float32))


def test_timing_cache_through_real_signatures(trt_over_real, artifacts, tmp_path):
    trt_over_real()
    base = tmp_path / "tc.bin"
    first = T.build_trt_engine(artifacts["fp32"], tmp_path / "a", opt_batch=2, max_batch=4, timing_cache=base)
    second = T.build_trt_engine(artifacts["fp32"], tmp_path / "b", opt_batch=2, max_batch=4, timing_cache=base)
    assert first.metadata["timing_cache"] == str(tmp_path / f"tc.trt{VERSION}.sm90.bin")
    assert second.metadata["timing_cache_bytes_loaded"] > 0 and second.metadata["timing_cache_saved"]["merged"]


def test_parser_errors_are_all_reported(trt_over_real, artifacts, tmp_path):
    trt_over_real(parse_errors=("node 3: unsupported op Foo", "node 7: bad attribute"))
    with pytest.raises(SedeployError, match="ONNX parser rejected") as err:
        T.build_trt_engine(artifacts["fp32"], tmp_path / "out")
    assert "unsupported op Foo" in str(err.value) and "bad attribute" in str(err.value)

