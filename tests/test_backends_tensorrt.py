"""TensorRT backend. The pure parts (versions, precision, profiles, compatibility checks, missing dependencies)
run everywhere; building and running engines needs TensorRT and a CUDA GPU and skips with the reason otherwise."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import sys
import types
from pathlib import Path

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

from fake_tensorrt import FAKE_GPU, make_fake_tensorrt

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
    assert "--trt-profile 1,8,32" in str(err.value)
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


# ---------------------------------------------------------------- the backend against tests/fake_tensorrt.py
# The fake has exactly the API surface sedeploy calls (signatures of the 10.x/11.x bindings), records every call
# and executes the network through ONNX Runtime on host buffers (the runner's torch device injected as CPU).


@pytest.fixture
def fake_gpu(monkeypatch):
    """Install a fake `tensorrt` (tests/fake_tensorrt.py) and a fake GPU description; returns the installer."""
    monkeypatch.setattr(T, "cuda_device", lambda: dict(FAKE_GPU))

    def install(version="10.13.0.35", **kwargs):
        module = make_fake_tensorrt(version, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", module)  # T.trt_logger makes the stand-in a logger of its own
        return module
    return install


def _ctx_calls(fake):
    return [(name.split(".", 1)[1], args) for name, args in fake.calls if name.startswith("IExecutionContext.")]


def _ort(path, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("version", ["10.13.0.35", "11.0.0"])
@pytest.mark.parametrize("kind", ["fp32", "fp16", "int8-trt"])
def test_every_build_is_strongly_typed_without_precision_flags(fake_gpu, tiny_artifacts, tmp_path, version, kind):
    fake = fake_gpu(version)
    art = T.build_trt_engine(tiny_artifacts[kind], tmp_path, min_batch=1, opt_batch=2, max_batch=4)
    # 10.x: the flag from the enum of *this* TensorRT (10.x and 11.x number it differently); 11.x: no flag at all
    # (deprecated: every network is strongly typed)
    flags = 1 << int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if version.startswith("10.") else 0
    created = [args for name, args in fake.calls if name == "Builder.create_network"]
    assert created == [(flags,)]
    assert not [c for c in fake.calls if c[0] == "IBuilderConfig.set_flag"]
    side = json.loads(art.sidecar.read_text())
    assert side["strongly_typed"] is True and side["builder_flags"] == [] and side["network_flags"] == flags
    assert side["unreadable_layers"] == [] and side["inspected_shape"] == [2, 3, 32, 32]
    assert side["inspector_layout"] == ("Format/Datatype (TensorRT 10.x)" if version.startswith("10.")
                                        else "Format + Datatype (TensorRT 11.x)")
    assert side["strong_typing"]["ok"] is True and side["tensorrt_version"] == version
    counts = side["layer_precisions"]
    assert sum(counts.values()) == len(side["layers"]) > 30 and "unknown" not in counts
    if kind == "fp32":
        assert set(counts) == {"fp32"}
    elif kind == "fp16":
        assert set(counts) == {"fp16"}  # FP32 only at the boundary Casts, which write/read FP16 themselves
    else:
        assert counts["int8"] == 37 and set(counts) == {"int8", "fp16"}  # 36 convs + the classifier Gemm


def test_strongly_typed_flags_never_hard_code_integers():
    from sedeploy.backends.trt_support import strongly_typed_flags

    ten, eleven = make_fake_tensorrt("10.13.0.35"), make_fake_tensorrt("11.0.0")
    assert strongly_typed_flags(ten, (10, 13, 0)) == 1 << int(ten.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert strongly_typed_flags(eleven, (11, 0, 0)) == 0  # deprecated in 11: not passed although the enum has it
    old = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace(EXPLICIT_BATCH=0))
    with pytest.raises(SedeployError, match="no NetworkDefinitionCreationFlag.STRONGLY_TYPED"):
        strongly_typed_flags(old, (10, 0, 0))
    assert strongly_typed_flags(types.SimpleNamespace(), (11, 2, 0)) == 0


@pytest.mark.parametrize("version", ["10.13.0.35", "11.0.0"])
def test_runner_binds_then_executes_and_reads_results_at_data_ptr(fake_gpu, tiny_artifacts, tmp_path, version):
    fake = fake_gpu(version)
    src = tiny_artifacts["int8-trt"]
    art = T.build_trt_engine(src, tmp_path, min_batch=1, opt_batch=2, max_batch=4)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with T.TrtRunner(art.path, device=torch.device("cpu")) as runner:
        inp, (out,) = runner.input_name, runner.output_names
        buffers = {n: runner._device_buffers[n] for n in (inp, out)}
        assert tuple(buffers[inp].shape) == (4, 3, 32, 32) and tuple(buffers[out].shape) == (4, 10)  # max batch
        fake.calls.clear()
        got = runner.infer(x)
        calls = _ctx_calls(fake)
        assert [c[0] for c in calls] == ["set_input_shape", "get_tensor_shape", "set_tensor_address",
                                         "set_tensor_address", "execute_async_v3"]
        assert calls[0][1] == (inp, (3, 3, 32, 32)) and calls[1][1] == (out,)
        assert {a[0]: a[1] for c, a in calls if c == "set_tensor_address"} == \
            {n: b.data_ptr() for n, b in buffers.items()}  # allocated once, at activate()
        assert calls[-1][1] == (runner._stream.cuda_stream,)
        # TensorRT (here: ORT inside the fake) wrote the logits at the output's data_ptr()
        assert np.array_equal(buffers[out][:3].numpy(), got)
        assert np.array_equal(got, _ort(src, x))
        assert np.array_equal(buffers[inp][:3].numpy(), x)
        again = runner.infer(x[:1])
        assert np.array_equal(again, _ort(src, x[:1]))  # (batch 1 vs 3 may round differently in ORT's kernels)
        assert np.abs(again - got[:1]).max() < 1e-3 * np.abs(got).max()
        assert runner._device_buffers[out].data_ptr() == buffers[out].data_ptr()  # no reallocation per call


def test_half_io_maps_to_float16(fake_gpu, tiny_onnx, tmp_path):
    fake_gpu("11.0.0")
    src = tmp_path / "tiny_fp16_io.onnx"
    onnx.save(to_fp16(onnx.load(str(tiny_onnx))), str(src))
    art = T.build_trt_engine(src, tmp_path / "out", min_batch=1, opt_batch=2, max_batch=4)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float16)
    with T.TrtRunner(art.path, device=torch.device("cpu")) as runner:
        assert runner.input_dtype == np.float16
        got = runner.infer(x)
        assert got.dtype == np.float16 and runner._device_buffers[runner.output_names[0]].dtype == torch.float16
        assert np.array_equal(got, _ort(src, x))
        with pytest.raises(SedeployError, match="dtype float32"):
            runner.infer(x.astype(np.float32))


def test_out_of_profile_batch_is_refused_before_any_tensorrt_call(fake_gpu, tiny_artifacts, tmp_path):
    fake = fake_gpu()
    art = T.build_trt_engine(tiny_artifacts["fp32"], tmp_path, min_batch=2, opt_batch=2, max_batch=4)
    with T.TrtRunner(art.path, device=torch.device("cpu")) as runner:
        fake.calls.clear()
        for n in (1, 5):
            with pytest.raises(SedeployError, match="outside the engine's optimization profile 2..4"):
                runner.infer(np.zeros((n, 3, 32, 32), np.float32))
        assert fake.calls == []


def test_failed_execute_surfaces_tensorrt_log(fake_gpu, tiny_artifacts, tmp_path):
    fake = fake_gpu()
    art = T.build_trt_engine(tiny_artifacts["fp32"], tmp_path, opt_batch=2, max_batch=4)
    with T.TrtRunner(art.path, device=torch.device("cpu")) as runner:
        fake.fail_execute = True
        with pytest.raises(SedeployError, match="TensorRT failed to run") as err:
            runner.infer(np.zeros((1, 3, 32, 32), np.float32))
    assert "[ERROR] IExecutionContext::enqueueV3: illegal memory access" in str(err.value)


def test_timing_cache_keyed_locked_and_mismatch_logged(fake_gpu, tiny_artifacts, tmp_path, caplog):
    fake_gpu("10.13.0.35")
    base = tmp_path / "tc.bin"
    first = T.build_trt_engine(tiny_artifacts["fp32"], tmp_path / "a", opt_batch=2, max_batch=4, timing_cache=base)
    keyed = tmp_path / "tc.trt10.13.0.35.sm90.bin"
    assert first.metadata["timing_cache"] == str(keyed) and keyed.is_file() and not base.exists()
    assert first.metadata["timing_cache_saved"]["merged"] is None  # no file to merge with yet
    second = T.build_trt_engine(tiny_artifacts["fp32"], tmp_path / "b", opt_batch=2, max_batch=4, timing_cache=base)
    assert second.metadata["timing_cache_bytes_loaded"] == len(json.dumps({"key": "10.13.0.35/sm90",
                                                                           "entries": ["tactic-0"]}))
    assert second.metadata["timing_cache_saved"]["merged"] is True
    assert json.loads(keyed.read_bytes())["entries"] == ["tactic-0", "tactic-1"]
    # a cache written by another TensorRT under this file's name: refused on load, combine False on save — logged
    keyed.write_bytes(json.dumps({"key": "10.12.0.36/sm90", "entries": ["old"]}).encode())
    with caplog.at_level(logging.WARNING, logger="sedeploy"):
        third = T.build_trt_engine(tiny_artifacts["fp32"], tmp_path / "c", opt_batch=2, max_batch=4, timing_cache=base)
    assert third.metadata["timing_cache_bytes_loaded"] == 0
    assert third.metadata["timing_cache_saved"]["merged"] is False
    assert "does not match this TensorRT" in caplog.text and "combine returned False" in caplog.text
    assert json.loads(keyed.read_bytes())["key"] == "10.13.0.35/sm90"  # replaced by a valid cache
    # 11.x uses its own file
    fake_gpu("11.0.0")
    other = T.build_trt_engine(tiny_artifacts["fp32"], tmp_path / "d", opt_batch=2, max_batch=4, timing_cache=base)
    assert other.metadata["timing_cache"] == str(tmp_path / "tc.trt11.0.0.sm90.bin")


def test_int8_inputs_are_validated_before_tensorrt(fake_gpu, tiny_artifacts, tmp_path):
    fake = fake_gpu()
    with pytest.raises(SedeployError, match="INT8 CPU form") as err:
        T.build_trt_engine(tiny_artifacts["int8-cpu"], tmp_path)
    assert "QLinearConv" in str(err.value)
    # an FP32 scale feeding the FP16 graph: fails the strong-typing check, names the node
    model = onnx.load(str(tiny_artifacts["int8-trt"]))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and "weight" not in n.input[0])
    scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
    scale.CopyFrom(nh.from_array(nh.to_array(scale).astype(np.float32), scale.name))
    bad = tmp_path / "bad.int8-trt.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(SedeployError, match="strong-typing-scale") as err:
        T.build_trt_engine(bad, tmp_path / "out")
    assert "float32 scale" in str(err.value) or "fp32" in str(err.value)
    assert fake.calls == [] and not (tmp_path / "out").exists()


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


INSPECTOR = Path(__file__).resolve().parent / "trt_inspector"  # see README.md there (sources, licence)


def test_layer_precisions_from_real_10x_inspector_output():
    """Excerpts of real inspector JSON (NVIDIA's engine-explorer samples): one "Format/Datatype" text per tensor."""
    from sedeploy.backends.trt_support import LAYOUT_10, layer_precisions

    qat = layer_precisions((INSPECTOR / "mobilenet_qat_excerpt.engine.graph.json").read_text())
    # FP32→Int8 reformat, int8 convs, an int8 conv writing FP16 (computes in int8), the FP32 output NoOp
    assert [layer["precision"] for layer in qat["layers"]] == ["int8", "int8", "int8", "int8", "fp32"]
    assert qat["layers"][3]["outputs"] == ["fp16"] and qat["layers"][0]["inputs"] == ["fp32"]
    assert qat["counts"] == {"int8": 4, "fp32": 1} and qat["unreadable"] == [] and qat["layout"] == LAYOUT_10
    fp16 = layer_precisions((INSPECTOR / "resnet_fp16_excerpt.engine.graph.json").read_text())
    assert [layer["precision"] for layer in fp16["layers"]] == ["fp16"] * 4  # incl. FP32↔FP16 boundary reformats
    assert fp16["layers"][0]["inputs"] == ["fp32"] and fp16["layers"][-1]["outputs"] == ["fp32"]


def test_layer_precisions_from_the_11x_split_layout():
    from sedeploy.backends.trt_support import LAYOUT_11, layer_precisions

    text = (INSPECTOR / "layout_11x_constructed.engine.graph.json").read_text()
    got = layer_precisions(text)
    assert [layer["precision"] for layer in got["layers"]] == ["fp16", "int8", "fp16", "fp32"]
    assert got["counts"] == {"fp16": 2, "int8": 1, "fp32": 1} and got["unreadable"] == []
    assert got["layout"] == LAYOUT_11
    # the type is read from "Datatype" (the "Format" text is layout only): a contradicting Format does not count
    info = json.loads(text)
    info["Layers"][2]["Inputs"][0]["Format"] = "Channel major INT8 format where channel % 32 == 0"
    assert layer_precisions(json.dumps(info))["layers"][2]["precision"] == "fp16"
    info["Layers"][2]["Inputs"][0]["DataType"] = info["Layers"][2]["Inputs"][0].pop("Datatype")  # either spelling
    assert layer_precisions(json.dumps(info))["layers"][2]["precision"] == "fp16"


def test_unreadable_layers_are_recorded_never_counted():
    from sedeploy.backends.trt_support import layer_precisions

    info = json.loads((INSPECTOR / "mobilenet_qat_excerpt.engine.graph.json").read_text())
    del info["Layers"][1]["Outputs"][0]["Format/Datatype"]  # what an inspector without execution context gives
    info["Layers"][2]["Inputs"][0]["Format/Datatype"] = "N/A"
    info["Layers"][3]["Outputs"][0]["Format/Datatype"] = "Row major linear FP16 and Int8"  # two types: ambiguous
    got = layer_precisions(json.dumps(info))
    assert [layer["precision"] for layer in got["layers"]] == ["int8", "unknown", "unknown", "unknown", "fp32"]
    assert [u["name"] for u in got["unreadable"]] == [info["Layers"][i]["Name"] for i in (1, 2, 3)]
    assert "neither 'Datatype' (11.x) nor 'Format/Datatype' (10.x)" in got["unreadable"][0]["reason"]
    assert "'N/A' names no single known type" in got["unreadable"][1]["reason"]
    assert got["counts"] == {"unknown": 3, "int8": 1, "fp32": 1}
    names_only = layer_precisions(json.dumps({"Layers": ["a", "b"]}))
    assert names_only["counts"] == {"unknown": 2} and len(names_only["unreadable"]) == 2
    # whole words only: UInt8 is not int8; a layer without tensors has no precision ("none"), not a guess
    got = layer_precisions(json.dumps({"Layers": [
        {"Name": "u", "LayerType": "Reformat", "Inputs": [{"Format/Datatype": "Row major linear UInt8 format"}],
         "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
        {"Name": "shape_call", "LayerType": "shape_call", "Inputs": [], "Outputs": []}]}))
    assert [layer["precision"] for layer in got["layers"]] == ["uint8", "none"] and got["unreadable"] == []
    with pytest.raises(SedeployError, match="no JSON"):
        layer_precisions("not json")
    with pytest.raises(SedeployError, match="no 'Layers' list"):
        layer_precisions(json.dumps({"Bindings": []}))


def test_precision_verdict_fails_on_unreadable_or_missing_precision():
    from sedeploy.backends.trt_support import layer_precisions, precision_verdict

    qat = layer_precisions((INSPECTOR / "mobilenet_qat_excerpt.engine.graph.json").read_text())
    assert precision_verdict(qat, "int8") == []
    assert precision_verdict(qat, "fp32") == []
    assert "no layer runs in fp16" in precision_verdict(qat, "fp16")[0]
    info = json.loads((INSPECTOR / "mobilenet_qat_excerpt.engine.graph.json").read_text())
    del info["Layers"][4]["Inputs"][0]["Format/Datatype"]
    problems = precision_verdict(layer_precisions(json.dumps(info)), "int8")
    assert len(problems) == 1 and "1 layer(s) with unreadable precision" in problems[0]
    assert "the engine inspector listed no layers" in precision_verdict(layer_precisions('{"Layers": []}'), "fp32")
    old_sidecar = {"layers": qat["layers"], "counts": qat["counts"]}  # before unreadable layers were recorded
    assert "no record of unreadable layers" in precision_verdict(old_sidecar, "int8")[0]


def test_tensorrt_cuda_version_is_tensorrts_own():
    from sedeploy.backends.trt_support import tensorrt_cuda_version

    assert tensorrt_cuda_version(types.SimpleNamespace(get_cuda_version=lambda: 12080)) == \
        {"cuda": "12.8", "source": "tensorrt.get_cuda_version()"}
    # no binding: the installed wheel's name (tensorrt-cu12 / -cu13); none here
    got = tensorrt_cuda_version(types.SimpleNamespace())
    assert got["cuda"] is None or got["source"].startswith("wheel tensorrt-cu")


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
    assert side["unreadable_layers"] == [] and side["layer_precisions"].get("fp32"), side["unreadable_layers"][:3]
    assert side["inspected_shape"] == [4, 3, 32, 32]
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
    assert art.precision == "fp16"
    assert art.metadata["builder_flags"] == [] and art.metadata["strongly_typed"] is True
    assert "fp32" not in art.metadata["layer_precisions"], art.metadata["layer_precisions"]
    assert art.metadata["unreadable_layers"] == [] and art.metadata["layer_precisions"].get("fp16")
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    ref = _ort_reference(tiny_onnx, x)
    with T.TrtRunner(art.path) as runner:
        assert runner.input_dtype == np.float16
        got = runner.infer(x.astype(np.float16)).astype(np.float32)
    assert np.abs(got - ref).max() <= 3e-2 * np.abs(ref).max()


def test_timing_cache_is_created_then_reused(trt, tiny_onnx, tmp_path):
    cache = tmp_path / "trt.cache"
    first = T.build_trt_engine(tiny_onnx, tmp_path / "a", max_batch=8, workspace_gib=1.0, timing_cache=cache)
    cache = Path(first.metadata["timing_cache"])  # keyed by TensorRT version and compute capability
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
