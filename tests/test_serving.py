"""Serving: Triton model repositories (configs parsed by Triton's ModelConfig protobuf) and a real tritonserver
(PyTriton) serving the tiny SE-ResNet: exact logits, bad requests, a bounded load test, SIGTERM shutdown.

Server tests skip with the reason when nvidia-pytriton cannot serve here (not installed, or numpy ≥ 2, which its
0.7 stub does not support); servers listen on 127.0.0.1 on free ports and are always stopped.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from sedeploy.errors import SedeployError

REPO = Path(__file__).resolve().parents[1]
IMAGES = sorted((REPO / "calib").glob("*.jpg"))


# ------------------------------------------------------------------------------------------------ fixtures
def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def model_config_pb2():
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (pip install "
                                                    "'sedeploy[serve]'): Triton's ModelConfig protobuf comes with it")
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


@pytest.fixture(scope="module")
def engines(tiny_onnx, tmp_path_factory) -> Path:
    """build-engine on the tiny model: FP32 artifact + its ONNX Runtime engine, manifest.json."""
    from sedeploy.build import BuildOptions, build_engines

    out = tmp_path_factory.mktemp("serve-engines")
    build_engines(tiny_onnx, out, BuildOptions.from_flat(backend="ort", progress=False))
    return out


def _parse(pb2, path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(encoding="utf-8"), pb2.ModelConfig())


@pytest.fixture(scope="module")
def pytriton_ready():
    from sedeploy.serving.env import check_pytriton

    try:
        check_pytriton()
    except SedeployError as err:
        pytest.skip(f"tritonserver via PyTriton cannot serve here: {err.what}")


@pytest.fixture(scope="module")
def server(engines, pytriton_ready):
    from sedeploy.serving.server import ServeOptions, running_server

    http_port, grpc_port, metrics_port = _free_ports(3)
    # a 20 ms queue delay: requests sent together are batched together (the per-request checks are under test)
    opts = ServeOptions(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, exit_timeout_s=5,
                        queue_delay_us=20_000)
    with running_server(engines, options=opts) as served:
        yield served


@pytest.fixture(scope="module")
def direct(server):
    from sedeploy.backends import open_runner

    with open_runner(server.engine) as runner:
        yield runner


def _client(served):
    import tritonclient.http as th

    return th.InferenceServerClient(served.http_url.removeprefix("http://"), network_timeout=60)


def _infer(client, served, x: np.ndarray, datatype: str = "FP32", model: str | None = None):
    import tritonclient.http as th

    inp = th.InferInput(served.input_name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return client.infer(model or served.name, [inp]).as_numpy(served.output_name)


def _images(served) -> np.ndarray:
    from sedeploy.preprocess import Preprocess, load_batch

    x, _ = load_batch(IMAGES[:8], Preprocess(**{k: tuple(v) if isinstance(v, list) else v
                                                 for k, v in served.preprocess.items()}))
    return x


# ------------------------------------------------------------------------------------------------ repository
def _fake_compiled(engines: Path, tmp_path: Path) -> Path:
    """A build folder with the tiny FP32 artifact, its ORT engine, a TensorRT plan and an OpenVINO IR entry.
    The plan/IR bytes are stand-ins (no GPU or OpenVINO build here): packaging copies them and reads their
    signature from the source artifact and the sidecar, which is what is under test."""
    import shutil

    d = tmp_path / "engines"
    shutil.copytree(engines, d)
    manifest = json.loads((d / "manifest.json").read_text())
    fp32 = next(Path(a["path"]).name for a in manifest["artifacts"] if a["kind"] == "fp32")
    (d / "tiny.fp32.plan").write_bytes(b"stand-in plan")
    (d / "tiny.fp32.trt.json").write_text(json.dumps({"backend": "trt", "precision": "fp32", "profile": {
        "input": "input", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [16, 3, 32, 32]}}))
    (d / "tiny.fp32.ov.xml").write_text("<net/>")
    (d / "tiny.fp32.ov.bin").write_bytes(b"\0" * 8)
    (d / "tiny.fp32.ov.json").write_text(json.dumps({"backend": "openvino", "precision": "fp32"}))
    for name, backend, side in (("tiny.fp32.plan", "trt", "tiny.fp32.trt.json"),
                                ("tiny.fp32.ov.xml", "openvino", "tiny.fp32.ov.json")):
        manifest["engines"].append({"path": name, "sidecar": side, "backend": backend, "precision": "fp32",
                                    "source": fp32, "from": fp32, "kind": "fp32", "flavour": None})
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_package_every_engine_kind_parses_as_model_config(engines, tmp_path, model_config_pb2):
    from sedeploy.serving.triton_repo import package_triton

    pb2 = model_config_pb2
    src = _fake_compiled(engines, tmp_path)
    res = package_triton(src, tmp_path / "repo")
    names = {m["name"]: m for m in res["models"]}
    assert set(names) == {"tiny_fp32_ort", "tiny_fp32_trt", "tiny_fp32_openvino"}
    for name in names:
        cfg = _parse(pb2, tmp_path / "repo" / name / "config.pbtxt")
        assert cfg.name == name
        assert [i.name for i in cfg.input] == ["input"] and [o.name for o in cfg.output] == ["logits"]
        assert cfg.input[0].data_type == pb2.TYPE_FP32 and cfg.output[0].data_type == pb2.TYPE_FP32
        assert list(cfg.input[0].dims) == [3, 32, 32] and list(cfg.output[0].dims) == [10]
        assert cfg.HasField("dynamic_batching")
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
        info = json.loads((tmp_path / "repo" / name / "sedeploy.json").read_text())
        assert "default" in info["batching_rule"]
    ort = _parse(pb2, tmp_path / "repo" / "tiny_fp32_ort" / "config.pbtxt")
    assert ort.platform == "onnxruntime_onnx" and ort.max_batch_size == 32
    assert list(ort.dynamic_batching.preferred_batch_size) == [8]
    assert ort.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU
    assert json.loads(ort.parameters["sedeploy.preprocess"].string_value)["size"] == 32
    assert (tmp_path / "repo" / "tiny_fp32_ort" / "1" / "model.onnx").is_file()
    assert (tmp_path / "repo" / "tiny_fp32_ort" / "tiny.fp32.ort.json").is_file()  # the sidecar beside it
    trt = _parse(pb2, tmp_path / "repo" / "tiny_fp32_trt" / "config.pbtxt")
    assert trt.platform == "tensorrt_plan" and trt.max_batch_size == 16  # the profile's max
    assert list(trt.dynamic_batching.preferred_batch_size) == [4]  # the profile's opt
    assert trt.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
    assert (tmp_path / "repo" / "tiny_fp32_trt" / "1" / "model.plan").read_bytes() == b"stand-in plan"
    ov = _parse(pb2, tmp_path / "repo" / "tiny_fp32_openvino" / "config.pbtxt")
    assert ov.backend == "openvino" and ov.platform == "" and ov.max_batch_size == 32
    assert ov.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU
    assert {p.name for p in (tmp_path / "repo" / "tiny_fp32_openvino" / "1").iterdir()} == {"model.xml",
                                                                                          "model.bin"}


def test_package_batching_from_bench_results(engines, tmp_path, model_config_pb2):
    from sedeploy.serving.triton_repo import package_triton

    engine = json.loads((engines / "manifest.json").read_text())["engines"][0]["path"]

    def stats(tput, p50):
        return {"throughput": tput, "latency_ms": {"p50": p50}}

    results = {"engines": [{"name": "other", "info": {"path": "/x/other.onnx"}, "batch": {"1": stats(999, 0.1)}},
                           {"name": "tiny", "info": {"path": engine},
                            "batch": {"1": stats(100.0, 2.0), "8": stats(300.0, 26.0), "32": stats(280.0, 114.0),
                                      "64": stats(400.0, 160.0)}}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    package_triton(engines, tmp_path / "repo", results=tmp_path / "results.json")
    cfg = _parse(model_config_pb2, tmp_path / "repo" / "tiny_fp32_ort" / "config.pbtxt")
    # 64 exceeds max_batch_size 32 and is ignored; 280 ≥ 0.9 × 300 keeps 32; delay = 2.0 ms / 2
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 32]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 1000


def test_package_fixed_batch_graph_has_no_batcher(tiny_model, tmp_path, model_config_pb2):
    from sedeploy.export import export_onnx
    from sedeploy.build import BuildOptions, build_engines
    from sedeploy.serving.triton_repo import package_triton

    onnx_path = export_onnx(tiny_model, tmp_path / "fixed.onnx", input_size=32, dynamic_batch=False, batch_size=2)
    build_engines(onnx_path, tmp_path / "eng", BuildOptions.from_flat(progress=False, backend="none"))
    package_triton(tmp_path / "eng", tmp_path / "repo")
    cfg = _parse(model_config_pb2, tmp_path / "repo" / "fixed_fp32_onnx" / "config.pbtxt")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [2, 3, 32, 32]


@pytest.fixture(scope="module")
def softmax_fixed(tmp_path_factory) -> Path:
    """A build folder (artifacts only) whose model takes a fixed batch of 2, ends in a Softmax (it outputs
    probabilities) and records label offset 1: 11 outputs, output 0 a background class."""
    import onnx
    from onnx import helper

    from sedeploy.build import BuildOptions, build_engines
    from sedeploy.export import export_onnx
    from sedeploy.model import build_model
    from sedeploy.onnxcore import META, load_onnx, save_onnx, set_metadata

    d = tmp_path_factory.mktemp("softmax-fixed")
    src = export_onnx(build_model(18, base_channels=8, num_classes=11, seed=5), d / "bg.onnx", input_size=32,
                      dynamic_batch=False, batch_size=2)
    out = tmp_path_factory.mktemp("softmax-fixed-eng")
    build_engines(src, out, BuildOptions.from_flat(progress=False, backend="none"))
    for art in out.glob("*.onnx"):
        proto = load_onnx(art)
        if proto.graph.node[-1].op_type != "Softmax":
            name = proto.graph.output[0].name
            for node in proto.graph.node:
                node.output[:] = [o + "_logits" if o == name else o for o in node.output]
            proto.graph.node.append(helper.make_node("Softmax", [name + "_logits"], [name], axis=1))
        set_metadata(proto, {META.LABEL_OFFSET: 1})
        onnx.checker.check_model(proto)
        save_onnx(proto, art)
    return out


def test_package_records_output_kind_and_label_offset(softmax_fixed, tmp_path, model_config_pb2):
    from sedeploy.serving.triton_repo import package_triton

    labels = tmp_path / "synset_words.txt"
    labels.write_text("".join(f"n{k:08d} class-{k}, alias\n" for k in range(10)))  # the dataset's 10 classes
    res = package_triton(softmax_fixed, tmp_path / "repo", labels_file=labels)
    d = tmp_path / "repo" / res["models"][0]["name"]
    cfg = _parse(model_config_pb2, d / "config.pbtxt")
    assert cfg.parameters["sedeploy.output_kind"].string_value == "probabilities"
    assert cfg.parameters["sedeploy.label_offset"].string_value == "1"
    assert (d / "labels.txt").read_text().splitlines() == ["background"] + [f"class-{k}" for k in range(10)]
    labels.write_text("".join(f"n{k:08d} class-{k}\n" for k in range(9)))
    with pytest.raises(SedeployError, match="9 names"):
        package_triton(softmax_fixed, tmp_path / "repo2", labels_file=labels)


def test_request_batches_pad_a_fixed_batch_and_drop_the_padding():
    from sedeploy.serving.client import request_batches

    x = np.random.default_rng(0).normal(size=(5, 3, 8, 8)).astype(np.float32)
    sent = list(request_batches(x, 0, [2, 3, 8, 8]))
    assert [p.shape[0] for p, _ in sent] == [2, 2, 2] and [r for _, r in sent] == [2, 2, 1]
    assert np.array_equal(np.concatenate([p[:r] for p, r in sent]), x)
    assert [p.shape[0] for p, _ in request_batches(x, 4, [3, 8, 8])] == [4, 1]  # a batching model: no padding
    assert [p.shape[0] for p, _ in request_batches(x, 0, [-1, 3, 8, 8])] == [5]  # any batch: one request


def test_probabilities_and_class_names_follow_output_kind_and_offset():
    from sedeploy.serving.client import class_names, probabilities

    z = np.random.default_rng(1).normal(size=(3, 11)) * 3
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert np.allclose(probabilities(z, "logits"), p)
    assert np.allclose(probabilities(p, "probabilities"), p)  # no second softmax
    assert np.allclose(probabilities(np.log(p), "log_probabilities"), p)
    names = [f"c{k}" for k in range(10)]
    assert class_names(names, 11, 1, "f")[:2] == ["background", "c0"]
    assert class_names(names + ["x"], 11, 1, "f")[0] == "c0"  # a table naming every output
    with pytest.raises(SedeployError, match="names 10 classes"):
        class_names(names, 11, 0, "f")


def test_one_preprocessing_rule_warns_and_honours_height_width_and_layout(tmp_path, caplog):
    import logging

    from sedeploy.preprocess import Preprocess, recorded_preprocess
    from sedeploy.serving.triton_config import TensorSpec
    from sedeploy.serving.triton_repo import engine_preprocess

    good = Preprocess.for_size(24, width=40, channel_order="bgr")
    assert recorded_preprocess(good.as_dict(), (24, 40)) == good
    assert recorded_preprocess(json.dumps(good.as_dict()), (24, 40)) == good  # config.pbtxt carries the JSON text
    for stored in ({"size": 24, "channel_order": "xyz"}, "not json", good.as_dict()):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sedeploy"):
            pp = recorded_preprocess(stored, (32, 48), name="m")
        assert pp.shape == (32, 48) and pp.channel_order == "rgb" and "m" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sedeploy"):  # an engine that cannot be described: NHWC shape
        pp = engine_preprocess(tmp_path / "missing.onnx", [TensorSpec("x", "TYPE_FP32", [-1, 24, 40, 3])])
    assert pp.shape == (24, 40) and "missing.onnx" in caplog.text


def test_start_closes_the_log_file_when_the_repository_cannot_be_written(tmp_path, monkeypatch):
    from sedeploy.serving import server

    opened = []

    def open_log(path):
        opened.append(open(path, "ab"))
        return opened[-1]

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(server, "triton_distribution", lambda: object())
    monkeypatch.setattr(server, "remove_stale_workdirs", lambda: None)
    monkeypatch.setattr(server, "open_log_file", open_log)
    monkeypatch.setattr(server, "write_repository", fail)
    with pytest.raises(OSError):
        server.start_server(object(), server.ServeOptions(log_file=str(tmp_path / "t.log")))
    assert len(opened) == 1 and opened[0].closed


def test_package_artifacts_with_labels_for_classification(engines, tmp_path, model_config_pb2):
    from sedeploy.serving.triton_repo import package_triton

    labels = tmp_path / "synset_words.txt"
    labels.write_text("".join(f"n{k:08d} class-{k}, alias\n" for k in range(10)))
    res = package_triton(engines, tmp_path / "repo", artifacts=True, labels_file=labels)
    assert [m["name"] for m in res["models"]] == ["tiny_fp32_onnx"]
    d = tmp_path / "repo" / "tiny_fp32_onnx"
    cfg = _parse(model_config_pb2, d / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx" and cfg.output[0].label_filename == "labels.txt"
    assert (d / "labels.txt").read_text().splitlines() == [f"class-{k}" for k in range(10)]
    assert (d / "1" / "model.onnx").read_bytes() == (engines / "tiny.fp32.onnx").read_bytes()  # the artifact
    labels.write_text("n00000000 only-one\n")
    with pytest.raises(SedeployError, match="1 names"):
        package_triton(engines, tmp_path / "repo2", labels_file=labels)


def test_package_takes_a_copied_folders_own_files(engines, tmp_path):
    """A copy of a build folder is packaged from its own files (bench's rule, sedeploy.layout.Manifest): never the
    original folder's, whose paths its manifest still records; a file missing from the copy is an error."""
    import shutil

    from sedeploy.serving.triton_repo import manifest_engines

    copy = tmp_path / "copy"
    shutil.copytree(engines, copy)
    entries = manifest_engines(copy)
    assert entries and all(e["path"].parent == copy and e["sidecar"].parent == copy for e in entries)
    assert all(e["from"].parent == copy for e in entries)
    (copy / entries[0]["sidecar"].name).unlink()  # the original still has it
    with pytest.raises(SedeployError, match=rf"lists '{entries[0]['sidecar'].name}', which is not in"):
        manifest_engines(copy)


def test_package_is_atomic_and_refuses_to_overwrite(engines, tmp_path, model_config_pb2):
    import shutil

    from sedeploy.serving.triton_repo import package_triton

    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SedeployError, match="non-empty folder that is not a sedeploy Triton repository"):
        package_triton(engines, out)
    assert (out / "keep.txt").read_text() == "mine"
    broken = tmp_path / "broken"
    shutil.copytree(engines, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["engines"].append({**manifest["engines"][0], "path": "gone.ort-opt.onnx"})
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SedeployError, match="gone.ort-opt.onnx"):
        package_triton(broken, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    with pytest.raises(SedeployError, match="not a sedeploy Triton repository"):
        package_triton(engines, out, force=True)  # --force replaces only a previous repository
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    package_triton(engines, out)
    first = (out / "tiny_fp32_ort" / "config.pbtxt").read_text()
    with pytest.raises(SedeployError, match="--force"):
        package_triton(engines, out)
    package_triton(engines, out, force=True, max_batch=16)
    assert (out / "tiny_fp32_ort" / "config.pbtxt").read_text() != first  # replaced, whole
    assert "max_batch_size: 16" in (out / "tiny_fp32_ort" / "config.pbtxt").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.")]  # no staging or old copy left


def test_cli_package_json(engines, tmp_path, model_config_pb2):
    from click.testing import CliRunner

    from sedeploy.cli import cli

    r = CliRunner().invoke(cli, ["package", str(engines), "-o", str(tmp_path / "repo"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert [m["name"] for m in d["models"]] == ["tiny_fp32_ort"]
    assert d["models"][0]["platform"] == "onnxruntime_onnx"


@pytest.mark.parametrize("command", ["package", "serve"])
def test_missing_serve_extra_exits_4_with_install_hint(engines, tmp_path, monkeypatch, command):
    import importlib.util

    from click.testing import CliRunner

    from sedeploy.cli import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tritonclient", "pytriton") else real(name, *a))
    args = ["package", str(engines), "--triton", "-o", str(tmp_path / "r")] if command == "package" else \
        ["serve", str(engines), "--port", "1"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 4, r.output
    assert "pip install 'sedeploy[serve]'" in r.output
    assert not (tmp_path / "r").exists()


def test_stub_libpython_detection_matches_ldd(pytriton_ready):
    """The fix is applied exactly when the stub would load another libpython than this interpreter's."""
    from sedeploy.serving.env import server_environment, stub_libpython

    info = stub_libpython()
    if info.stub is None or info.loads is None or info.ours is None:
        pytest.skip(f"nothing to compare on this machine: {info.as_dict()}")
    env = server_environment()
    differs = info.loads.resolve() != info.ours.resolve()
    assert ("LD_LIBRARY_PATH" in env) == differs
    if differs:  # with the fix, the loader resolves the interpreter's own library
        fixed = stub_libpython({**os.environ, **env})
        assert fixed.loads is not None and fixed.loads.resolve() == info.ours.resolve()


# ------------------------------------------------------------------------------------------------ the server
def test_real_images_through_server_match_engine(server, direct):
    x = _images(server)
    assert len(x) == 8
    client = _client(server)
    try:
        batched = _infer(client, server, x)
        singles = np.concatenate([_infer(client, server, x[i:i + 1]) for i in range(len(x))])
    finally:
        client.close()
    want = direct.infer(x)
    assert batched.shape == want.shape == (8, 10)
    assert np.abs(batched - want).max() <= 1e-4
    assert np.abs(singles - want).max() <= 1e-4
    assert np.ptp(want) > 1e-3  # the logits differ between images: the comparison means something


def test_grpc_health_and_metrics(server, direct):
    import urllib.request

    import tritonclient.grpc as tg

    x = _images(server)[:2]
    client = tg.InferenceServerClient(server.grpc_url)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(server.name)
        inp = tg.InferInput(server.input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        y = client.infer(server.name, [inp]).as_numpy(server.output_name)
    finally:
        client.close()
    assert np.abs(y - direct.infer(x)).max() <= 1e-4
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{server.name}/ready"):
        assert urllib.request.urlopen(server.http_url + path, timeout=10).status == 200
    metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    line = next(m for m in metrics.splitlines()
                if m.startswith("nv_inference_request_success{") and f'model="{server.name}"' in m)
    assert float(line.rsplit(None, 1)[1]) >= 1


def test_infer_images_top5(server, direct, monkeypatch):
    from sedeploy.serving.client import infer_images

    monkeypatch.delenv("SEDEPLOY_LABELS", raising=False)
    res = infer_images(IMAGES[:3], server.http_url, server.name, top_k=5)
    assert res["labels"] is None and res["output_kind"] == "logits"  # no table given: output indices, no other
    assert all(t["label"] == str(t["index"]) for r in res["results"] for t in r["top"])
    want = direct.infer(_images(server)[:3])
    assert np.abs(np.asarray(res["logits"]) - want).max() <= 1e-4
    for r, row in zip(res["results"], want):
        assert [t["index"] for t in r["top"]] == list(np.argsort(-row, kind="stable")[:5])
        assert r["top"][0]["probability"] >= r["top"][-1]["probability"]


def test_cli_infer_prints_top5_with_label_names(server, direct, tmp_path):
    from click.testing import CliRunner

    from sedeploy.cli import cli

    labels = tmp_path / "synset_words.txt"
    labels.write_text("".join(f"n{k:08d} class-{k}, alias\n" for k in range(10)))
    r = CliRunner().invoke(cli, ["infer", str(IMAGES[0]), "--url", server.http_url, "--model", server.name,
                                 "--labels-file", str(labels), "--json"])
    assert r.exit_code == 0, r.output
    top = json.loads(r.output)["results"][0]["top"]
    want = np.argsort(-direct.infer(_images(server)[:1])[0], kind="stable")[:5]
    assert [t["index"] for t in top] == list(want)
    assert [t["label"] for t in top] == [f"class-{k}" for k in want]
    r = CliRunner().invoke(cli, ["infer", str(IMAGES[0]), "--url", server.http_url, "--model", "no_such_model"])
    assert r.exit_code == 2 and "no_such_model" in r.output


@pytest.mark.slow
def test_infer_fixed_batch_probabilities_and_label_offset(softmax_fixed, pytriton_ready, shared_data, monkeypatch):
    from sedeploy.onnxcore import run_model
    from sedeploy.preprocess import Preprocess, load_batch
    from sedeploy.serving.client import infer_images
    from sedeploy.serving.server import ServeOptions, running_server

    labels = shared_data / "labels" / "synset_words.txt"
    http_port, grpc_port, metrics_port = _free_ports(3)
    opts = ServeOptions(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, exit_timeout_s=5)
    small = softmax_fixed.parent / "small-labels.txt"  # the first 10 lines of a real table: the dataset's classes
    small.write_text("".join(labels.read_text().splitlines(keepends=True)[:10]))
    monkeypatch.setenv("SEDEPLOY_LABELS", str(small))
    with running_server(softmax_fixed, options=opts) as served:
        assert served.max_batch_size == 0
        res = infer_images(IMAGES[:3], served.http_url, served.name, top_k=11)  # 3 images, a fixed batch of 2
        pp = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in served.preprocess.items()})
    x, _ = load_batch(IMAGES[:3], pp)
    want = run_model(served.engine, x)
    from sedeploy.classes import read_class_names

    names = read_class_names(small)
    assert res["output_kind"] == "probabilities" and res["label_offset"] == 1
    assert np.abs(np.asarray(res["logits"]) - want).max() <= 1e-5
    for r, row in zip(res["results"], want):
        got = {t["index"]: t for t in r["top"]}
        assert np.allclose([got[k]["probability"] for k in range(11)], row / row.sum(), atol=1e-5)
        assert got[0]["label"] == "background" and got[0]["class"] is None
        assert [got[k]["label"] for k in range(1, 11)] == names and got[3]["class"] == 2


def _raw_post(served, path: str, body: bytes) -> tuple[int, str]:
    host, port = served.http_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


@pytest.mark.parametrize("case", ["wrong shape", "wrong dtype", "batch above max", "nan", "empty body",
                                  "unknown model"])
def test_bad_request_gets_clear_error_and_server_keeps_serving(server, direct, case):
    from tritonclient.utils import InferenceServerException

    x = _images(server)[:1]
    client = _client(server)
    try:
        if case == "empty body":
            status, text = _raw_post(server, f"/v2/models/{server.name}/infer", b"")
            assert status == 400 and text, (status, text)
        else:
            with pytest.raises(InferenceServerException) as err:
                if case == "wrong shape":
                    _infer(client, server, np.zeros((1, 3, 16, 16), np.float32))
                elif case == "wrong dtype":
                    _infer(client, server, x.astype(np.float64), "FP64")
                elif case == "batch above max":
                    _infer(client, server, np.zeros((server.max_batch_size + 1, 3, 32, 32), np.float32))
                elif case == "nan":
                    _infer(client, server, np.full_like(x, np.nan))
                else:
                    _infer(client, server, x, model="no_such_model")
            expect = {"wrong shape": "shape", "wrong dtype": "data-type", "batch above max": "batch",
                      "nan": "NaN", "unknown model": "no_such_model"}[case]
            assert expect.lower() in str(err.value).lower(), str(err.value)
        good = _infer(client, server, x)  # the next good request is served
    finally:
        client.close()
    assert np.abs(good - direct.infer(x)).max() <= 1e-4


def _load(served, clients: int, requests: int, x: np.ndarray, time_limit_s: float) -> dict:
    """``clients`` threads each send ``requests`` single-image requests; latency per request."""
    latencies, errors = [], []
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit_s

    def worker(k: int) -> None:
        client = _client(served)
        try:
            for i in range(requests):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"load test exceeded {time_limit_s} s")
                t0 = time.perf_counter()
                y = _infer(client, served, x[(k + i) % len(x)][None])
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if y.shape != (1, 10):
                        errors.append(f"shape {y.shape}")
        except Exception as err:  # any failure counts as an error of the load test
            with lock:
                errors.append(repr(err))
        finally:
            client.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {"errors": errors, "n": len(latencies), "wall_s": wall, "throughput": len(latencies) / wall,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None}




@pytest.mark.slow
def test_load_dynamic_batching_vs_batch_one(engines, pytriton_ready):
    """16 concurrent clients × 50 single-image requests against the dynamic batcher, then against the same
    engine with batching off (each request runs alone), interleaved in one test; zero errors in both."""
    from sedeploy.serving.client import batch_stats
    from sedeploy.serving.server import ServeOptions, running_server

    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    report = {}
    for batching in (True, False):
        ports = _free_ports(3)
        opts = ServeOptions(http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], batching=batching,
                            queue_delay_us=2000, exit_timeout_s=5)
        with running_server(engines, options=opts) as served:
            _load(served, 4, 5, x, 60)  # warm-up
            before = batch_stats(served.metrics_url, served.name)
            r = _load(served, 16, 50, x, 120)
            after = batch_stats(served.metrics_url, served.name)
        r["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
        report["dynamic" if batching else "batch-1"] = r
        assert r["errors"] == [] and r["n"] == 16 * 50, r["errors"][:3]
    print("\nload test (16 clients x 50 requests, tiny model):",
          json.dumps({k: {m: v[m] for m in ("throughput", "p50_ms", "p99_ms", "mean_batch")}
                      for k, v in report.items()}), f"load average {os.getloadavg()}")
    assert report["batch-1"]["mean_batch"] == pytest.approx(1.0)
    assert report["dynamic"]["mean_batch"] > 1.5  # the batcher grouped concurrent requests


# ------------------------------------------------------------------------------------------------ the CLI
def _serve_cmd(engines, ports, *extra) -> list[str]:
    return [sys.executable, "-m", "sedeploy", "serve", str(engines), "--port", str(ports[0]), "--grpc-port",
            str(ports[1]), "--metrics-port", str(ports[2]), *map(str, extra)]


def _cli_env(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH for this checkout; TMPDIR of the test's own, so what the server leaves in it can be checked."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "TMPDIR": str(tmp_path / "tmp")}


def _ours(folder: Path) -> list[str]:
    """sedeploy's files in a temporary folder (onnxruntime's own '.ses' file there is not sedeploy's)."""
    return [p.name for p in folder.iterdir() if "sedeploy" in p.name or "triton" in p.name]


def _session_processes(sid: int) -> list[int]:
    """Live processes of a session (a server started with start_new_session=True, and everything it started)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _start_cli_server(cmd, env) -> tuple[subprocess.Popen, list[str], threading.Event]:
    """The CLI in a session of its own (as a terminal's foreground job); stdout lines collected as they come."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if '"status": "ready"' in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    return proc, lines, ready


def _kill_session(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.parametrize("signum,target,exit_timeout", [
    pytest.param(signal.SIGINT, "group", 10, marks=pytest.mark.slow),  # Ctrl-C, with the default exit timeout
    (signal.SIGTERM, "group", 2), (signal.SIGTERM, "process", 2)])
def test_cli_serve_stops_on_signal_with_requests_in_flight(engines, pytriton_ready, tmp_path, signum, target,
                                                           exit_timeout):
    """Ctrl-C (SIGINT to the foreground process group), a group SIGTERM (systemd, docker stop) or a SIGTERM to
    the process alone, while clients keep sending: everything ends within the exit timeout + 5 s (15 s with the
    default), the command exits 128 + signal, stdout holds only the JSON Lines events, and no process or
    temporary file is left."""
    ports = _free_ports(3)
    log_file = tmp_path / "triton.log"
    extra = ["--json", "--exit-timeout", exit_timeout] + (["--log-file", log_file] if target == "group" else [])
    proc, lines, ready = _start_cli_server(_serve_cmd(engines, ports, *extra), _cli_env(tmp_path))
    codes: list = []
    stop_load = threading.Event()

    def client() -> None:
        import tritonclient.http as th

        c = th.InferenceServerClient(f"127.0.0.1:{ports[0]}", network_timeout=30)
        x = np.zeros((1, 3, 32, 32), np.float32)
        try:
            while not stop_load.is_set():
                inp = th.InferInput("input", [1, 3, 32, 32], "FP32")
                inp.set_data_from_numpy(x)
                try:
                    c.infer("tiny_fp32_ort", [inp])
                    codes.append(200)
                except Exception as err:  # refused or cut off while the server stops: counted, not raised
                    codes.append(type(err).__name__)
                    time.sleep(0.05)
        finally:
            c.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    try:
        assert ready.wait(120), proc.stderr.read() if proc.poll() is not None else "not ready in 120 s"
        for t in threads:
            t.start()
        time.sleep(1.5)
        assert 200 in codes  # requests are in flight when the signal comes
        t0 = time.monotonic()
        if target == "group":
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        proc.wait(timeout=30)
        while _session_processes(proc.pid) and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        left = _session_processes(proc.pid)
        stop_load.set()
        err = proc.stderr.read()
        assert proc.returncode == 128 + signum, err
        assert left == [] and elapsed < exit_timeout + 5, (left, elapsed)
        events = [json.loads(line) for line in lines]  # every stdout line is JSON
        assert [e["status"] for e in events] == ["ready", "stopped"], lines
        assert events[1]["signal"] == signal.Signals(signum).name
        assert "Traceback" not in err and "exited with failure" not in err, err
        assert _ours(tmp_path / "tmp") == []  # the repository and the temporary log are gone
        if target == "group":
            assert "Started HTTPService" in log_file.read_text()  # tritonserver's output went to the log file
        print(f"\n{signal.Signals(signum).name} to the {target}: all processes gone after {elapsed:.2f} s; "
              f"requests while running: {codes.count(200)} ok")
    finally:
        stop_load.set()
        if proc.poll() is None or _session_processes(proc.pid):
            _kill_session(proc)


def test_cli_serve_sigterm_while_starting_never_says_ready(engines, pytriton_ready, tmp_path):
    ports = _free_ports(3)
    proc, lines, ready = _start_cli_server(_serve_cmd(engines, ports, "--json"), _cli_env(tmp_path))
    try:
        deadline = time.monotonic() + 60
        while not any("tritonserver" in _cmdline(p) for p in _session_processes(proc.pid)):
            assert time.monotonic() < deadline and proc.poll() is None, "tritonserver did not start"
            time.sleep(0.02)
        assert not ready.is_set()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        time.sleep(0.5)
        err = proc.stderr.read()
        assert proc.returncode == 143, err
        assert [json.loads(line)["status"] for line in lines] == ["stopped"], lines
        assert _session_processes(proc.pid) == [] and "Traceback" not in err, err
        assert _ours(tmp_path / "tmp") == []
    finally:
        if proc.poll() is None or _session_processes(proc.pid):
            _kill_session(proc)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("case", ["http port of a running Triton", "busy grpc port", "equal ports"])
def test_cli_serve_refuses_busy_or_equal_ports_at_once(engines, pytriton_ready, server, direct, tmp_path, case):
    """A port that another program (here: another Triton) holds, or two equal ports: one error naming the port
    and the option, before anything starts; the other server is not touched."""
    ports = _free_ports(3)
    listener = socket.socket()
    try:
        if case == "http port of a running Triton":
            ports[0] = int(server.http_url.rsplit(":", 1)[1])
            option, port = "--port", ports[0]
        elif case == "busy grpc port":
            listener.bind(("127.0.0.1", ports[1]))
            listener.listen()
            option, port = "--grpc-port", ports[1]
        else:
            ports[2] = ports[1]
            option, port = "--metrics-port", ports[1]
        t0 = time.monotonic()
        r = subprocess.run(_serve_cmd(engines, ports), capture_output=True, text=True, env=_cli_env(tmp_path),
                           timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        listener.close()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert str(port) in r.stderr and option in r.stderr, r.stderr
    assert elapsed < 30, elapsed  # refused before any server starts
    assert _ours(tmp_path / "tmp") == []
    client = _client(server)  # the other server still serves its model
    try:
        x = _images(server)[:1]
        assert np.abs(_infer(client, server, x) - direct.infer(x)).max() <= 1e-4
    finally:
        client.close()


@pytest.mark.parametrize("args,needle", [(["--max-batch", "0"], "--max-batch 0"),
                                         (["--queue-delay-us", "-5"], "--queue-delay-us -5"),
                                         (["--threads", "0"], "--threads 0"),
                                         (["--port", "70000"], "--port 70000"),
                                         (["--exit-timeout", "-1"], "--exit-timeout -1"),
                                         (["--log-file", "."], "is a folder")])
def test_cli_serve_refuses_invalid_options(engines, args, needle):
    from click.testing import CliRunner

    from sedeploy.cli import cli

    r = CliRunner().invoke(cli, ["serve", str(engines), *args])
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output


def test_nan_request_fails_alone_in_its_batch(server, direct):
    """7 good requests and 1 holding NaN, sent together (one dynamic batch), 10 times: every good request gets
    its logits, every NaN request its own 400 error naming the problem, without traceback or server paths."""
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    from sedeploy.serving.client import batch_stats

    x = _images(server)[:7]
    want = direct.infer(x)
    bad = np.full((1, 3, 32, 32), np.nan, np.float32)
    ok, errors, other = 0, [], []
    barrier = threading.Barrier(8)
    before = batch_stats(server.metrics_url, server.name)

    def send(k: int) -> None:
        nonlocal ok
        client = th.InferenceServerClient(server.http_url.removeprefix("http://"), network_timeout=60)
        try:
            for _ in range(10):
                barrier.wait(timeout=60)
                try:
                    y = _infer(client, server, bad if k == 7 else x[k:k + 1])
                except InferenceServerException as err:
                    (errors if k == 7 else other).append((err.status(), str(err)))
                    continue
                if k == 7:
                    other.append("a NaN request was answered")
                elif np.abs(y - want[k:k + 1]).max() <= 1e-4:
                    ok += 1
                else:
                    other.append(f"wrong logits for image {k}")
        finally:
            client.close()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(send, range(8)))
    inferences, executions = (a - b for a, b in zip(batch_stats(server.metrics_url, server.name), before))
    print(f"\nNaN mix: {ok} of 70 good requests served; {len(errors)} NaN requests refused; "
          f"mean batch {inferences / max(executions, 1):.2f}")
    assert other == [] and ok == 70
    assert len(errors) == 10 and all(status == "400" for status, _ in errors), errors[:2]
    text = errors[0][1]
    assert "NaN" in text and "Traceback" not in text and "/" not in text.split(":", 1)[1], text
    assert inferences / max(executions, 1) > 1.5  # the bad request really was batched with good ones


def test_request_checks_one_by_one():
    from sedeploy.serving.python_model import request_error, split_rows

    ok = np.zeros((2, 3, 4, 4), np.float32)
    assert request_error(ok, name="input", item_shape=[3, 4, 4], max_batch=8) is None
    assert request_error(ok, name="input", item_shape=[3, -1, -1], max_batch=0) is None
    nan = ok.copy()
    nan[1, 0, 0, 0] = np.nan
    nan[0, 2, 3, 3] = -np.inf
    assert "2 NaN or infinite" in request_error(nan, name="input", item_shape=[3, 4, 4], max_batch=8)
    assert "FP32" in request_error(ok.astype(np.float64), name="input", item_shape=[3, 4, 4], max_batch=8)
    assert "shape [2, 3, 4, 4]" in request_error(ok, name="input", item_shape=[3, 8, 8], max_batch=8)
    assert "batch 2" in request_error(ok, name="input", item_shape=[3, 4, 4], max_batch=1)
    y = np.arange(12).reshape(6, 2)
    parts = split_rows(y, [1, 3, 2])
    assert [p.tolist() for p in parts] == [y[:1].tolist(), y[1:4].tolist(), y[4:].tolist()]


def test_cli_infer_default_model_and_bad_urls_or_labels(server, direct, tmp_path, engines):
    """Without --model the served model is used; the gRPC port as --url, a model file as --labels-file and a
    table with another class count each end in one clear error (exit 2)."""
    from click.testing import CliRunner

    from sedeploy.cli import cli

    r = CliRunner().invoke(cli, ["infer", str(IMAGES[0]), "--url", server.http_url, "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["model"] == server.name
    assert np.abs(np.asarray(d["logits"]) - direct.infer(_images(server)[:1])).max() <= 1e-4
    nine = tmp_path / "nine.txt"
    nine.write_text("".join(f"class-{k}\n" for k in range(9)))
    for args, needle in ((["--url", server.grpc_url], "does not speak HTTP"),
                         (["--url", server.http_url, "--labels-file", str(engines / "tiny.fp32.onnx")],
                          "not a text file"),
                         (["--url", server.http_url, "--labels-file", str(nine)], "names 9 classes")):
        r = CliRunner().invoke(cli, ["infer", str(IMAGES[0]), *args])
        assert r.exit_code == 2, r.output
        assert needle in r.output and "Traceback" not in r.output, r.output


def test_packaging_an_fp16_artifact_for_triton_onnxruntime_on_cpu_says_it_runs_in_fp32(tiny_onnx, tmp_path, caplog):
    """Triton's ONNX Runtime backend (KIND_CPU) computes an FP16 artifact in FP32 where ORT has no FP16 kernels:
    packaging it says so (it is still packaged: the artifact is valid, only its precision on this CPU differs)."""
    import logging

    from sedeploy.backends.ort import cpu_computes_fp16
    from sedeploy.build import BuildOptions, build_engines
    from sedeploy.serving.triton_repo import package_triton

    build_engines(tiny_onnx, tmp_path / "eng", BuildOptions.from_flat(backend="none", fp16=True, progress=False))
    with caplog.at_level(logging.WARNING, logger="sedeploy"):
        res = package_triton(tmp_path / "eng", tmp_path / "repo", artifacts=True)
    assert {m["name"] for m in res["models"]} == {"tiny_fp32_onnx", "tiny_fp16_onnx"}
    said = [r.getMessage() for r in caplog.records if "computes them in FP32" in r.getMessage()]
    assert len(said) == (0 if cpu_computes_fp16() else 1) and all(s.startswith("tiny.fp16.onnx") for s in said)


def test_run_folders_of_killed_servers_are_removed(tmp_path):
    """A serve run killed with SIGKILL leaves its folder; the next run removes it, never a live run's."""
    from sedeploy.serving.server import remove_stale_workdirs

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"sedeploy-serve-{int(done.stdout)}-abc"
    live = tmp_path / f"sedeploy-serve-{os.getpid()}-def"
    other = tmp_path / "sedeploy-serve-notes"
    for d in (dead, live, other):
        (d / "repository").mkdir(parents=True)
    assert remove_stale_workdirs(tmp_path) == [dead]
    assert not dead.exists() and live.is_dir() and other.is_dir()
