"""TensorRT backend. The pure parts (versions, precision, profiles, compatibility checks, missing dependencies)
run everywhere; building and running engines needs TensorRT and a CUDA GPU and skips with the reason otherwise."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from sedeploy.onnxcore import graph_precision
from sedeploy.backends import tensorrt as T
from sedeploy.errors import MissingDependencyError, SedeployError

FP32_BUILD_TOL = 1e-2  # relative to the largest |logit|: TensorRT's default TF32 convolutions on Ampere+


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same network computing in float16 end to end (weights, input and output)."""
    model = copy.deepcopy(proto)
    for t in model.graph.initializer:
        if t.data_type == TP.FLOAT:
            t.CopyFrom(nh.from_array(nh.to_array(t).astype(np.float16), t.name))
    for vi in (*model.graph.input, *model.graph.output):
        if vi.type.tensor_type.elem_type == TP.FLOAT:
            vi.type.tensor_type.elem_type = TP.FLOAT16
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)  # full check runs type inference: mixed types would fail
    return model


def small_graph(dtype=TP.FLOAT, qdq: bool = False) -> onnx.ModelProto:
    np_type = np.float16 if dtype == TP.FLOAT16 else np.float32
    w = nh.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np_type), "W")
    inits, nodes, x = [w], [], "input"
    if qdq:  # symmetric int8 activation quantization, as TensorRT wants it
        inits += [nh.from_array(np.array(0.05, np.float32), "scale"), nh.from_array(np.array(0, np.int8), "zp")]
        nodes += [h.make_node("QuantizeLinear", ["input", "scale", "zp"], ["q"]),
                  h.make_node("DequantizeLinear", ["q", "scale", "zp"], ["dq"])]
        x = "dq"
    nodes += [h.make_node("Conv", [x, "W"], ["c"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c"], ["out"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("input", dtype, ["batch", 3, 8, 8])],
                         [h.make_tensor_value_info("out", dtype, ["batch", 4, 8, 8])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------- pure parts: run everywhere


@pytest.mark.parametrize("text, expected", [("10.13.0.35", (10, 13, 0)), ("11.0.0", (11, 0, 0)), ("11", (11, 0, 0)),
                                            ("10.0.0b6", (10, 0, 0)), ("8.6.1.post1", (8, 6, 1))])
def test_parse_trt_version(text, expected):
    assert T.parse_trt_version(text) == expected


def test_versions_compare_as_numbers_not_text():
    assert "9.10.1" > "10.0.0"  # the trap
    assert T.parse_trt_version("9.10.1") < T.parse_trt_version("10.0.0") < T.parse_trt_version("11.0.0")
    with pytest.raises(SedeployError, match="Cannot read a TensorRT version from 'abc'"):
        T.parse_trt_version("abc")


def test_trt_version_without_and_with_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    assert T.trt_version() is None
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.13.0.35"))
    assert T.trt_version() == (10, 13, 0)


def test_graph_precision_reads_the_graph(tiny_onnx, tmp_path):
    assert graph_precision(small_graph()) == "fp32"
    assert graph_precision(small_graph(TP.FLOAT16)) == "fp16"
    assert graph_precision(small_graph(qdq=True)) == "int8"
    assert graph_precision(tiny_onnx) == "fp32"  # a path works too
    fp16 = to_fp16(onnx.load(str(tiny_onnx)))
    assert graph_precision(fp16) == "fp16"
    # float16 only at the graph boundary (weights kept in float32, a Cast inside) is still an fp16 graph
    cast = small_graph()
    cast.graph.node.insert(0, h.make_node("Cast", ["input"], ["input16"], to=TP.FLOAT16))
    assert graph_precision(cast) == "fp16"
    (tmp_path / "bad.onnx").write_bytes(b"\x01\x02 not onnx")
    with pytest.raises(SedeployError, match="not a readable ONNX file"):
        graph_precision(tmp_path / "bad.onnx")


def test_fp16_helper_makes_a_runnable_fp16_graph(tiny_onnx):
    """Guards the GPU fp16 test: the converted graph runs (ORT CPU) and stays close to fp32."""
    import onnxruntime as ort

    fp16 = to_fp16(onnx.load(str(tiny_onnx)))
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = ort.InferenceSession(fp16.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.astype(np.float16)})[0]
    assert got.dtype == np.float16
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()


def test_validate_profile():
    assert T.validate_profile(1, 8, 32) == (1, 8, 32)
    assert T.validate_profile(4, 4, 4) == (4, 4, 4)
    with pytest.raises(SedeployError, match="min ≤ opt ≤ max") as err:
        T.validate_profile(8, 1, 32)
    assert "--min-batch 1 --opt-batch 8 --max-batch 32" in str(err.value)
    for bad in [(0, 1, 1), (1, 2.5, 4), (True, 1, 1), (1, 1, -3)]:
        with pytest.raises(SedeployError, match="positive integers"):
            T.validate_profile(*bad)


def test_profile_shapes(caplog):
    assert T.profile_shapes((-1, 3, 224, 224), 1, 8, 32) == ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    with caplog.at_level(logging.WARNING, logger="sedeploy"):
        assert T.profile_shapes((4, 3, 32, 32), 1, 8, 32) == ((4, 3, 32, 32),) * 3
    assert "fixed batch of 4" in caplog.text
    with pytest.raises(SedeployError, match="dynamic channel or spatial"):
        T.profile_shapes((-1, 3, -1, -1), 1, 8, 32)
    with pytest.raises(SedeployError, match="rank 4"):
        T.profile_shapes((-1, 10), 1, 8, 32)


@pytest.mark.parametrize("precision, version, flags", [
    ("fp32", (10, 13, 0), []), ("fp16", (10, 13, 0), ["FP16"]), ("int8", (10, 0, 1), ["INT8", "FP16"]),
    ("fp16", (11, 0, 0), []), ("int8", (11, 2, 0), []),  # strongly typed: the graph decides
])
def test_precision_flags(precision, version, flags):
    assert T.precision_flags(precision, version, {"FP16", "INT8"}) == flags


def test_precision_flags_use_only_flags_that_exist(caplog):
    with caplog.at_level(logging.WARNING, logger="sedeploy"):
        assert T.precision_flags("int8", (10, 99, 0), {"FP16"}) == ["FP16"]
    assert "no BuilderFlag INT8" in caplog.text
    with pytest.raises(SedeployError, match="Unknown precision 'bf8'"):
        T.precision_flags("bf8", (10, 0, 0), set())


def test_build_without_tensorrt_names_the_extra(tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError) as err:
        T.build_trt_engine(tiny_onnx, tmp_path / "out")
    assert "sedeploy[tensorrt]" in str(err.value) and "Building a TensorRT engine" in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SedeployError, match="not ordered"):  # arguments are checked before the import
        T.build_trt_engine(tiny_onnx, tmp_path / "out", min_batch=4, opt_batch=2, max_batch=8)
    with pytest.raises(SedeployError, match="Workspace 0 GiB"):
        T.build_trt_engine(tiny_onnx, tmp_path / "out", workspace_gib=0)


def test_build_without_gpu_says_so(tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.13.0.35"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SedeployError, match="No CUDA GPU is visible to PyTorch") as err:
        T.build_trt_engine(tiny_onnx, tmp_path / "out")
    assert "nvidia-smi" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_runner_checks_sidecar_then_tensorrt(tmp_path, monkeypatch):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"not really a plan")
    assert T.sidecar_for(plan) == tmp_path / "m.trt.json"
    with pytest.raises(SedeployError, match="sidecar file .*m.trt.json.* is missing"):
        T.TrtRunner(plan)
    (tmp_path / "m.trt.json").write_text("{broken")
    with pytest.raises(SedeployError, match="not valid JSON"):
        T.TrtRunner(plan)
    (tmp_path / "m.trt.json").write_text(json.dumps({"tensorrt_version": "10.13.0.35"}))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match="Running a TensorRT engine"):
        T.TrtRunner(plan)


def test_plan_compatibility_check(caplog):
    here = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    meta = {"tensorrt_version": "10.13.0.35", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
            "source_model": "m.onnx"}
    T.check_plan_compatible(meta, "10.13.0.35", here, "m.plan")
    for other in ("10.13.0.36", "10.14.1.48", "11.0.0"):
        with pytest.raises(SedeployError, match=f"built with TensorRT 10.13.0.35; this is TensorRT {other}") as err:
            T.check_plan_compatible(meta, other, here, "m.plan")
        assert "not portable" in str(err.value) and "m.onnx" in str(err.value)
    with pytest.raises(SedeployError, match="compute capability 9.0"):
        T.check_plan_compatible(meta, "10.13.0.35", {"gpu": "NVIDIA A100", "compute_capability": "8.0"}, "m.plan")
    with caplog.at_level(logging.WARNING, logger="sedeploy"):
        T.check_plan_compatible(meta, "10.13.0.35", {"gpu": "NVIDIA H200", "compute_capability": "9.0"}, "m.plan")
    assert "built on NVIDIA H100" in caplog.text


# ---------------------------------------------------------------- the builder's logic, against a stand-in
# A minimal stand-in for the `tensorrt` module (only the calls the builder makes, named as in TensorRT 10/11).
# It checks sedeploy's side of the contract on any machine: which flags are set on 10.x vs 11, the profile, the
# workspace, error reporting, timing-cache handling and what gets published. The real API is exercised below.


def fake_tensorrt(version: str, flags=("FP16", "INT8", "TF32"), parse_errors=(), build_fails=False):
    calls: dict = {"flags": [], "profile": None, "workspace": None, "network_flags": None}
    sev = types.SimpleNamespace(INTERNAL_ERROR="INTERNAL_ERROR", ERROR="ERROR", WARNING="WARNING", INFO="INFO",
                                VERBOSE="VERBOSE")

    class ILogger:
        Severity = sev

        def __init__(self):
            pass

    class Cache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+entry"

        def combine(self, other, ignore_mismatch):
            calls["combined"] = other.data
            return True

    class Config:
        cache = None

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def add_optimization_profile(self, profile):
            calls["profile"] = profile.shapes

        def set_flag(self, flag):
            calls["flags"].append(flag)

        def get_flag(self, flag):
            return flag == "TF32"

        def create_timing_cache(self, data):
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            calls["network_flags"] = flags
            tensor = types.SimpleNamespace(name="input", shape=(-1, 3, 8, 8))
            return types.SimpleNamespace(num_inputs=1, get_input=lambda i: tensor)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            profile = types.SimpleNamespace(shapes=None)
            profile.set_shape = lambda name, lo, opt, hi: setattr(profile, "shapes", (name, lo, opt, hi))
            return profile

        def build_serialized_network(self, network, config):
            if build_fails:
                self.logger.log(sev.ERROR, "tactic ran out of memory")
                return None
            return b"PLAN-" + version.encode()

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = len(parse_errors)

        def parse_from_file(self, path):
            calls["parsed"] = path
            return not parse_errors

        def get_error(self, i):
            return parse_errors[i]

    module = types.SimpleNamespace(
        __version__=version, ILogger=ILogger, Builder=Builder, OnnxParser=OnnxParser,
        BuilderFlag=types.SimpleNamespace(**{f: f for f in flags}),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"))
    return module, calls


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(T, "_LOGGER", None)  # the process-wide logger must not outlive the stand-in
    monkeypatch.setattr(T, "_cuda_device", lambda: {"gpu": "Fake GPU", "compute_capability": "9.0",
                                                    "cuda_runtime": "12.8", "device_index": "0"})

    def install(*args, **kwargs):
        module, calls = fake_tensorrt(*args, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        return calls
    return install


def test_builder_on_10x_sets_the_flag_of_the_graph(fake_gpu, tmp_path):
    calls = fake_gpu("10.13.0.35")
    src = tmp_path / "m16.onnx"
    onnx.save(small_graph(TP.FLOAT16), str(src))
    art = T.build_trt_engine(src, tmp_path / "out", min_batch=2, opt_batch=4, max_batch=6, workspace_gib=0.5)
    assert calls["flags"] == ["FP16"] and calls["network_flags"] == 0 and calls["parsed"] == str(src)
    assert calls["workspace"] == ("WORKSPACE", 1 << 29)
    assert calls["profile"] == ("input", (2, 3, 8, 8), (4, 3, 8, 8), (6, 3, 8, 8))
    assert art.path.read_bytes() == b"PLAN-10.13.0.35"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m16.plan", "m16.trt.json"]
    side = json.loads(art.sidecar.read_text())
    assert side["builder_flags"] == ["FP16"] and side["strongly_typed"] is False and side["tf32"] is True
    assert side["precision"] == "fp16" and side["gpu"] == "Fake GPU" and side["tensorrt_version"] == "10.13.0.35"
    assert side["plan_sha256"] == hashlib.sha256(b"PLAN-10.13.0.35").hexdigest()


def test_builder_on_11_sets_no_precision_flags(fake_gpu, tmp_path):
    calls = fake_gpu("11.0.0", flags=("TF32",))  # 11 removed FP16 / INT8
    src = tmp_path / "q.onnx"
    onnx.save(small_graph(qdq=True), str(src))
    art = T.build_trt_engine(src, tmp_path)
    assert calls["flags"] == [] and art.precision == "int8"
    assert art.metadata["strongly_typed"] is True and art.metadata["builder_flags"] == []


def test_builder_reports_every_parser_error_and_publishes_nothing(fake_gpu, tmp_path):
    fake_gpu("10.13.0.35", parse_errors=("node 3: unsupported op Foo", "node 7: bad attribute"))
    src = tmp_path / "m.onnx"
    onnx.save(small_graph(), str(src))
    with pytest.raises(SedeployError, match="ONNX parser rejected") as err:
        T.build_trt_engine(src, tmp_path / "out")
    assert "unsupported op Foo" in str(err.value) and "bad attribute" in str(err.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_builder_failure_quotes_tensorrt_log(fake_gpu, tmp_path):
    fake_gpu("10.13.0.35", build_fails=True)
    src = tmp_path / "m.onnx"
    onnx.save(small_graph(), str(src))
    with pytest.raises(SedeployError, match="could not build an engine") as err:
        T.build_trt_engine(src, tmp_path / "out")
    assert "[ERROR] tactic ran out of memory" in str(err.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_builder_timing_cache_is_loaded_merged_and_saved(fake_gpu, tmp_path):
    calls = fake_gpu("10.13.0.35")
    src, cache = tmp_path / "m.onnx", tmp_path / "tc.bin"
    onnx.save(small_graph(), str(src))
    first = T.build_trt_engine(src, tmp_path / "a", timing_cache=cache)
    assert first.metadata["timing_cache_bytes_loaded"] == 0 and cache.read_bytes() == b"+entry"
    second = T.build_trt_engine(src, tmp_path / "b", timing_cache=cache)
    assert second.metadata["timing_cache_bytes_loaded"] == len(b"+entry")
    assert calls["combined"] == b"+entry"  # merged with the file as it was at the end of the build
    assert cache.read_bytes() == b"+entry+entry"


# ---------------------------------------------------------------- real builds: TensorRT + CUDA GPU


@pytest.fixture(scope="module")
def trt():
    try:
        import tensorrt
    except (ImportError, OSError) as err:
        pytest.skip(f"TensorRT not installed: `import tensorrt` failed ({err}); "
                    "pip install 'sedeploy[tensorrt]' on an NVIDIA GPU machine")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch (torch.cuda.is_available() is False)")
    return tensorrt


def _ort_reference(path, x):
    from sedeploy.backends.ort import OrtRunner

    with OrtRunner(path) as runner:
        return runner.infer(x)


def test_fp32_engine_builds_runs_and_matches_ort(trt, tiny_onnx, tmp_path):
    art = T.build_trt_engine(tiny_onnx, tmp_path, min_batch=1, opt_batch=4, max_batch=8, workspace_gib=1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.plan", "tiny.trt.json"]
    side = json.loads(art.sidecar.read_text())
    assert side == art.metadata and art.precision == side["precision"] == "fp32"
    assert side["tensorrt_version"] == trt.__version__ and side["builder_flags"] == []
    assert side["gpu"] == torch.cuda.get_device_name()
    assert side["compute_capability"] == "{}.{}".format(*torch.cuda.get_device_capability())
    assert side["profile"] == {"input": "input", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 32, 32]}
    assert side["source_sha256"] == hashlib.sha256(tiny_onnx.read_bytes()).hexdigest()
    assert side["plan_sha256"] == hashlib.sha256(art.path.read_bytes()).hexdigest()
    assert side["workspace_gib"] == 1.0 and side["build_seconds"] > 0
    rng = np.random.default_rng(0)
    with T.TrtRunner(art.path) as runner:
        assert runner.profile["max"] == (8, 3, 32, 32) and runner.input_dtype == np.float32
        for n in (1, 5, 8):
            x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
            ref, got = _ort_reference(tiny_onnx, x), runner.infer(x)
            assert got.shape == ref.shape == (n, 10)
            assert np.abs(got - ref).max() <= FP32_BUILD_TOL * np.abs(ref).max()
            assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.75
        with pytest.raises(SedeployError, match="outside the engine's optimization profile 1..8"):
            runner.infer(rng.standard_normal((9, 3, 32, 32)).astype(np.float32))
        with pytest.raises(SedeployError, match="float64"):
            runner.infer(rng.standard_normal((2, 3, 32, 32)))
    with pytest.raises(SedeployError, match="closed"):
        runner.infer(x)


def test_fp16_graph_builds_an_fp16_engine(trt, tiny_onnx, tmp_path):
    src = tmp_path / "tiny_fp16.onnx"
    onnx.save(to_fp16(onnx.load(str(tiny_onnx))), str(src))
    art = T.build_trt_engine(src, tmp_path / "out", min_batch=1, opt_batch=2, max_batch=4, workspace_gib=1.0)
    strongly_typed = T.parse_trt_version(trt.__version__)[0] >= 11
    assert art.precision == "fp16"
    assert art.metadata["builder_flags"] == ([] if strongly_typed else ["FP16"])
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    ref = _ort_reference(tiny_onnx, x)
    with T.TrtRunner(art.path) as runner:
        assert runner.input_dtype == np.float16
        got = runner.infer(x.astype(np.float16)).astype(np.float32)
    assert np.abs(got - ref).max() <= 3e-2 * np.abs(ref).max()


def test_timing_cache_is_created_then_reused(trt, tiny_onnx, tmp_path):
    cache = tmp_path / "trt.cache"
    first = T.build_trt_engine(tiny_onnx, tmp_path / "a", max_batch=8, workspace_gib=1.0, timing_cache=cache)
    size = cache.stat().st_size
    assert size > 0 and first.metadata["timing_cache_bytes_loaded"] == 0
    second = T.build_trt_engine(tiny_onnx, tmp_path / "b", max_batch=8, workspace_gib=1.0, timing_cache=cache)
    assert second.metadata["timing_cache_bytes_loaded"] == size
    assert cache.stat().st_size >= size
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_runner_refuses_plan_from_another_tensorrt(trt, tiny_onnx, tmp_path):
    art = T.build_trt_engine(tiny_onnx, tmp_path, max_batch=8, workspace_gib=1.0)
    meta = json.loads(art.sidecar.read_text())
    art.sidecar.write_text(json.dumps({**meta, "tensorrt_version": "9.0.1.4"}))
    with pytest.raises(SedeployError, match="not portable"):
        T.TrtRunner(art.path)
    art.sidecar.write_text(json.dumps({**meta, "plan_sha256": "0" * 64}))
    with pytest.raises(SedeployError, match="describes a different plan"):
        T.TrtRunner(art.path)
