"""ONNX Runtime backend: sessions, runner, NCHWc histogram, and the ORT engine artifact (CPU only)."""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from sedeploy.backends import ort as B
from sedeploy.onnxcore import session as S
from sedeploy.errors import SedeployError


def se_block_graph(squeeze: str = "ReduceMean", seed: int = 0, size: int = 16):
    """conv → relu → SE (squeeze → 1×1 conv → relu → 1×1 conv → sigmoid → mul) → conv + skip → relu → pool → fc.

    ``squeeze`` is how the exporters write the SE squeeze: "ReduceMean" (axes 2,3 as an input, opset 18) or
    "GlobalAveragePool". He-scaled random weights, so activations neither vanish nor saturate.
    """
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)

    def b(n):
        return (rng.standard_normal(n) * 0.1).astype(np.float32)

    params = dict(W1=w(16, 3, 3, 3), B1=b(16), W2=w(8, 16, 1, 1), B2=b(8), W3=w(16, 8, 1, 1), B3=b(16),
                  W4=w(16, 16, 3, 3), B4=b(16), Wfc=w(10, 16), Bfc=b(10))
    inits = [nh.from_array(v, k) for k, v in params.items()]
    nodes = [h.make_node("Conv", ["input", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c1"], ["a"])]
    if squeeze == "ReduceMean":
        inits.append(nh.from_array(np.array([2, 3], np.int64), "axes"))
        nodes.append(h.make_node("ReduceMean", ["a", "axes"], ["s"], keepdims=1))
    else:
        nodes.append(h.make_node("GlobalAveragePool", ["a"], ["s"]))
    nodes += [h.make_node("Conv", ["s", "W2", "B2"], ["c2"]), h.make_node("Relu", ["c2"], ["r2"]),
              h.make_node("Conv", ["r2", "W3", "B3"], ["c3"]), h.make_node("Sigmoid", ["c3"], ["g"]),
              h.make_node("Mul", ["a", "g"], ["m"]), h.make_node("Conv", ["m", "W4", "B4"], ["c4"], pads=[1, 1, 1, 1]),
              h.make_node("Add", ["c4", "m"], ["res"]), h.make_node("Relu", ["res"], ["r"]),
              h.make_node("GlobalAveragePool", ["r"], ["p"]), h.make_node("Flatten", ["p"], ["f"]),
              h.make_node("Gemm", ["f", "Wfc", "Bfc"], ["logits"], transB=1)]
    graph = h.make_graph(nodes, "se_block", [h.make_tensor_value_info("input", TP.FLOAT, ["batch", 3, size, size])],
                         [h.make_tensor_value_info("logits", TP.FLOAT, ["batch", 10])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model, params


def se_block_reference(params: dict, x: np.ndarray) -> np.ndarray:
    """The same network in PyTorch."""
    p = {k: torch.from_numpy(v) for k, v in params.items()}
    with torch.no_grad():
        a = F.relu(F.conv2d(torch.from_numpy(x), p["W1"], p["B1"], padding=1))
        g = torch.sigmoid(F.conv2d(F.relu(F.conv2d(a.mean((2, 3), keepdim=True), p["W2"], p["B2"])), p["W3"], p["B3"]))
        m = a * g
        r = F.relu(F.conv2d(m, p["W4"], p["B4"], padding=1) + m)
        return F.linear(r.mean((2, 3)), p["Wfc"], p["Bfc"]).numpy()


@pytest.fixture(scope="module")
def se_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("se")
    out = {}
    for squeeze in ("ReduceMean", "GlobalAveragePool"):
        model, params = se_block_graph(squeeze)
        onnx.save(model, str(d / f"se_{squeeze}.onnx"))
        out[squeeze] = (d / f"se_{squeeze}.onnx", params)
    return out


def batch(n: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def test_cpu_provider_is_available_and_default():
    assert "CPUExecutionProvider" in S.available_providers()
    assert S.resolve_providers(None) == ["CPUExecutionProvider"]
    assert S.resolve_providers("cpu") == ["CPUExecutionProvider"]


def test_runner_matches_torch_on_se_block(se_files):
    path, params = se_files["ReduceMean"]
    x = batch(4, 16)
    ref = se_block_reference(params, x)
    assert ref.std(axis=0).min() > 1e-3, "reference is degenerate: the test would prove nothing"
    with B.OrtRunner(path, threads=1) as runner:
        got = runner.infer(x)
        assert runner.input_name == "input" and runner.input_shape == [None, 3, 16, 16]
        assert runner.providers == ["CPUExecutionProvider"]
    assert got.shape == (4, 10)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_runner_matches_pytorch_model(tiny_model, tiny_onnx):
    net, path = tiny_model, tiny_onnx
    x = batch(3, 32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    assert len(set(ref.argmax(1).tolist())) > 1 or ref.std(axis=0).min() > 1e-3
    with B.OrtRunner(path) as runner:
        np.testing.assert_allclose(runner.infer(x), ref, atol=1e-4, rtol=1e-4)
        desc = runner.describe()
    assert desc["intra_op_threads"] == S.default_threads() and desc["inter_op_threads"] == 1
    assert desc["onnxruntime_version"] == onnxruntime.__version__


def test_runner_rejects_wrong_inputs_precisely(se_files):
    path, _ = se_files["ReduceMean"]
    runner = B.OrtRunner(path, threads=1).activate()
    with pytest.raises(SedeployError, match="float64.*float32"):
        runner.infer(batch(1, 16).astype(np.float64))
    with pytest.raises(SedeployError, match="dimension 2 must be 16"):
        runner.infer(batch(1, 15))
    with pytest.raises(SedeployError, match="rank 4"):
        runner.infer(batch(1, 16)[0])
    with pytest.raises(SedeployError, match="numpy array"):
        runner.infer(batch(1, 16).tolist())
    runner.deactivate()
    with pytest.raises(SedeployError, match="not active"):
        runner.infer(batch(1, 16))


def test_missing_gpu_provider_lists_available_and_how_to_install(se_files):
    if "CUDAExecutionProvider" in S.available_providers():
        pytest.skip("onnxruntime-gpu is installed: CUDAExecutionProvider is not missing here")
    with pytest.raises(SedeployError) as err:
        S.make_session(se_files["ReduceMean"][0], providers=["cuda"])
    text = str(err.value)
    assert "CUDAExecutionProvider" in text and "sedeploy[gpu]" in text
    for provider in S.available_providers():
        assert provider in text


def test_unknown_provider_is_rejected(se_files):
    with pytest.raises(SedeployError, match="Unknown ONNX Runtime provider 'NopeExecutionProvider'") as err:
        S.make_session(se_files["ReduceMean"][0], providers=["NopeExecutionProvider"])
    assert "CPUExecutionProvider" in str(err.value)


class _SessionThatDroppedCuda:
    """Stands in for an InferenceSession whose CUDA provider failed to start (ORT then only warns)."""

    def __init__(self, *args, **kwargs):
        self.requested = kwargs.get("providers")

    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_gpu_provider_that_did_not_start_is_an_error(se_files, monkeypatch, caplog):
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", _SessionThatDroppedCuda)
    path = se_files["ReduceMean"][0]
    with pytest.raises(SedeployError, match="did not start the requested provider.*CUDAExecutionProvider"):
        S.make_session(path, providers="cuda")
    with caplog.at_level(logging.WARNING, logger="sedeploy"):  # "auto" may degrade, but says so
        session = S.make_session(path, providers="auto")
    assert session.requested == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "could not start CUDAExecutionProvider" in caplog.text


def test_threads_and_optimization_options(se_files):
    path = se_files["ReduceMean"][0]
    so = S.make_session(path, threads=1).get_session_options()
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (1, 1)
    so = S.make_session(path, optimization="basic").get_session_options()
    assert so.intra_op_num_threads == S.default_threads()
    assert so.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with pytest.raises(SedeployError, match="Thread count 0"):
        S.make_session(path, threads=0)
    with pytest.raises(SedeployError, match="optimization level 'fast'") as err:
        S.make_session(path, optimization="fast")
    assert "extended" in str(err.value)


def test_session_from_bytes_and_bad_model(se_files, tmp_path):
    path, params = se_files["ReduceMean"]
    session = S.make_session(path.read_bytes(), threads=1)
    x = batch(2, 16)
    np.testing.assert_allclose(session.run(None, {"input": x})[0], se_block_reference(params, x), atol=1e-4)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(SedeployError, match="could not load"):
        S.make_session(bad)
    with pytest.raises(SedeployError, match="does not exist"):
        S.make_session(tmp_path / "missing.onnx")


def test_histogram_shows_nchwc_reorders_around_the_se_squeeze(se_files):
    rm, gap = se_files["ReduceMean"][0], se_files["GlobalAveragePool"][0]
    original = Counter(n.op_type for n in onnx.load(str(rm)).graph.node)
    assert B.optimized_graph_histogram(rm, level="disabled") == dict(original)
    extended = B.optimized_graph_histogram(rm, level="extended")
    assert not [op for op in extended if op.startswith("com.microsoft.nchwc:")]
    full = B.optimized_graph_histogram(rm, level="all")
    assert full["com.microsoft.nchwc:Conv"] == original["Conv"]
    assert full["ReduceMean"] == 1 and "com.microsoft.nchwc:ReduceMean" not in full  # squeeze stays NCHW
    assert full["com.microsoft.nchwc:ReorderInput"] >= 1 and full["com.microsoft.nchwc:ReorderOutput"] >= 1
    # GlobalAveragePool has an NCHWc kernel, ReduceMean has none: the ReduceMean squeeze costs extra reorders.
    full_gap = B.optimized_graph_histogram(gap, level="all")
    assert full_gap.get("com.microsoft.nchwc:GlobalAveragePool", 0) >= 1
    assert full["com.microsoft.nchwc:ReorderInput"] > full_gap["com.microsoft.nchwc:ReorderInput"]


def test_build_ort_engine_publishes_model_and_sidecar(tiny_model, tiny_onnx, tmp_path):
    net, src = tiny_model, tiny_onnx
    art = B.build_ort_engine(src, tmp_path / "out", threads=1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny.ort-opt.onnx", "tiny.ort.json"]
    assert art.path.name == "tiny.ort-opt.onnx" and art.backend == "ort" and art.precision == "fp32"
    side = json.loads(art.sidecar.read_text())
    assert side == art.metadata
    assert side["onnxruntime_version"] == onnxruntime.__version__
    assert side["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert side["engine_sha256"] == hashlib.sha256(art.path.read_bytes()).hexdigest()
    assert side["providers"] == ["CPUExecutionProvider"] and side["optimization"] == "all"
    assert side["machine_specific"] is True and "vector width" in side["note"]
    assert side["op_histogram"] == B.op_histogram(art.path)
    assert side["nchwc_nodes"] == sum(n for op, n in side["op_histogram"].items() if "nchwc" in op) > 0
    x = batch(2, 32, seed=7)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    with B.OrtRunner(art.path, threads=1) as runner:
        np.testing.assert_allclose(runner.infer(x), ref, atol=1e-4, rtol=1e-4)


def test_failed_rebuild_leaves_no_engine_and_no_stale_sidecar(tiny_onnx, tmp_path, monkeypatch):
    B.build_ort_engine(tiny_onnx, tmp_path, threads=1)
    assert len(list(tmp_path.iterdir())) == 2

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(B, "write_sidecar", boom)
    with pytest.raises(OSError):
        B.build_ort_engine(tiny_onnx, tmp_path, threads=1)
    # the new engine replaced the old one before its sidecar failed: neither it nor the old sidecar may remain
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_build_ort_engine_extended_is_portable(se_files, tmp_path):
    art = B.build_ort_engine(se_files["ReduceMean"][0], tmp_path, threads=1, optimization="extended")
    assert art.metadata["machine_specific"] is False and art.metadata["nchwc_nodes"] == 0
    assert art.metadata["op_histogram"].get("com.microsoft:FusedConv", 0) >= 1


def test_build_ort_engine_failure_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    out = tmp_path / "out"
    with pytest.raises(SedeployError, match="not a readable ONNX file|could not load"):
        B.build_ort_engine(bad, out)
    assert not out.exists() or list(out.iterdir()) == []


def test_auto_prefers_tensorrt_then_cuda_then_cpu(monkeypatch):
    for offered, expected in [
        (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
         ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        (["CPUExecutionProvider"], ["CPUExecutionProvider"])]:
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda offered=offered: offered)
        assert S.resolve_providers("auto") == expected


def test_runner_defaults_to_auto_providers(tiny_onnx):
    runner = B.OrtRunner(tiny_onnx)
    assert runner.providers_requested == "auto"
    with runner:
        active = runner.providers
    offered = onnxruntime.get_available_providers()
    assert active[0] == next(p for p in S.AUTO_ORDER if p in offered)  # the best provider this ORT has


def test_runner_runs_on_cuda_when_onnxruntime_gpu_is_installed(tiny_onnx):
    offered = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in offered:
        pytest.skip(f"onnxruntime-gpu not installed: onnxruntime {onnxruntime.__version__} offers only {offered} "
                    "(pip install 'sedeploy[gpu]' on an NVIDIA GPU machine)")
    x = batch(4, 32)
    with B.OrtRunner(tiny_onnx, providers="cuda") as gpu, B.OrtRunner(tiny_onnx, providers="cpu") as cpu:
        assert gpu.providers[0] == "CUDAExecutionProvider"
        got, ref = gpu.infer(x), cpu.infer(x)
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()


def test_fp16_qdq_graphs_run_without_ort_bias_quantization(tiny_onnx, tmp_path):
    """sedeploy's sessions on a float16 Q/DQ graph compute what the graph says (ORT's WeightBiasQuantization is
    disabled for such graphs: see the session.py docstring for what it did to the tiny trained model)."""
    from onnx import helper as oh

    w = np.random.default_rng(0).normal(0, 0.02, (8, 3, 3, 3)).astype(np.float32)
    bias = np.linspace(-2, 2, 8).astype(np.float16)  # biases that matter
    ws = (np.abs(w).reshape(8, -1).max(1) / 127).astype(np.float16)
    wq = np.clip(np.rint(w / ws.astype(np.float32)[:, None, None, None]), -127, 127).astype(np.int8)
    inits = [nh.from_array(wq, "wq"), nh.from_array(ws, "ws"), nh.from_array(np.zeros(8, np.int8), "wz"),
             nh.from_array(bias, "b"), nh.from_array(np.array(0.004, np.float16), "xs"),
             nh.from_array(np.array(0, np.int8), "xz")]
    nodes = [oh.make_node("Cast", ["x"], ["x16"], to=TP.FLOAT16),
             oh.make_node("QuantizeLinear", ["x16", "xs", "xz"], ["xq"]),
             oh.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             oh.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             oh.make_node("Conv", ["xd", "wd", "b"], ["y16"], pads=[1, 1, 1, 1]),
             oh.make_node("Cast", ["y16"], ["y"], to=TP.FLOAT)]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 8, 8])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 8, 8, 8])], inits)
    path = tmp_path / "q16.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 19)]), str(path))
    assert S.has_fp16_qdq(str(path)) and not S.has_fp16_qdq(str(tiny_onnx))
    x = np.random.default_rng(1).uniform(-0.4, 0.4, (1, 3, 8, 8)).astype(np.float32)
    exact = S.run_model(S.cpu_session(path, optimization="disabled"), x)  # op by op: the graph's semantics
    got = S.run_model(S.cpu_session(path), x)
    assert np.abs(got - exact).max() < 1e-2


def test_fp16_graph_gets_no_ort_engine_where_the_cpu_computes_it_in_fp32(tiny_onnx, tmp_path, monkeypatch):
    """ORT's CPU provider (x86-64) folds an FP16 graph's weights to FP32 and runs FP32 kernels: an engine saved from
    it computes in FP32, so it is refused, never labelled FP16. The probe sees that on a one-Conv graph."""
    from sedeploy.fp16 import convert_fp16
    from sedeploy.onnxcore import holds_fp16_tensors

    fp16 = tmp_path / "tiny.fp16.onnx"
    convert_fp16(tiny_onnx, fp16)
    assert holds_fp16_tensors(fp16) and not holds_fp16_tensors(tiny_onnx)
    if B.cpu_computes_fp16():
        pytest.skip("this CPU's ONNX Runtime computes FP16 convolutions in FP16")
    assert "FP32 kernels" in B.unsupported_here("fp16") and B.unsupported_here("fp32") is None
    for level in ("all", "extended", "basic"):  # below "all" ORT inserts Casts instead of folding: refused too
        with pytest.raises(SedeployError, match=r"No ONNX Runtime engine is built from .*FP16 graph.*FP32 kernels"):
            B.build_ort_engine(fp16, tmp_path / "out", optimization=level)
    assert not list((tmp_path / "out").glob("*"))  # neither engine nor sidecar
    with B.OrtRunner(fp16, providers="cpu", threads=1) as r:  # the artifact itself still runs, and says how
        assert "computes it in FP32" in r.precision_note()
    with B.OrtRunner(tiny_onnx, providers="cpu", threads=1) as r:
        assert r.precision_note() is None
