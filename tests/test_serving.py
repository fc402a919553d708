"""Serving: Triton model repositories (configs parsed by Triton's ModelConfig protobuf) and a real tritonserver
(PyTriton) serving the tiny SE-ResNet: exact logits, bad requests, a bounded load test, SIGTERM shutdown.

Server tests skip with the reason when nvidia-pytriton cannot serve here (not installed, or numpy ≥ 2, which its
0.7 stub does not support); servers listen on 127.0.0.1 on free ports and are always stopped.
"""
from __future__ import annotations

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
    from sedeploy.pipeline import BuildOptions, build_engines

    out = tmp_path_factory.mktemp("serve-engines")
    build_engines(tiny_onnx, out, BuildOptions(backend="ort", progress=False))
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
    opts = ServeOptions(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, exit_timeout_s=5)
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
    from sedeploy.pipeline import BuildOptions, build_engines
    from sedeploy.serving.triton_repo import package_triton

    onnx_path = export_onnx(tiny_model, tmp_path / "fixed.onnx", input_size=32, dynamic_batch=False, batch_size=2)
    build_engines(onnx_path, tmp_path / "eng", BuildOptions(progress=False, backend="none"))
    package_triton(tmp_path / "eng", tmp_path / "repo")
    cfg = _parse(model_config_pb2, tmp_path / "repo" / "fixed_fp32_onnx" / "config.pbtxt")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [2, 3, 32, 32]


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


def test_package_is_atomic_and_refuses_to_overwrite(engines, tmp_path, model_config_pb2):
    import shutil

    from sedeploy.serving.triton_repo import package_triton

    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SedeployError, match="not empty"):
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
    package_triton(engines, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "tiny_fp32_ort" / "config.pbtxt").is_file()


def test_cli_package_json(engines, tmp_path, model_config_pb2):
    from click.testing import CliRunner

    from sedeploy.cli import cli

    r = CliRunner().invoke(cli, ["package", str(engines), "--triton", "-o", str(tmp_path / "repo"), "--json"])
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


def test_infer_images_top5(server, direct):
    from sedeploy.serving.client import infer_images

    res = infer_images(IMAGES[:3], server.http_url, server.name, top_k=5)
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
def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_cli_serve_sigterm_shuts_down_cleanly(engines, pytriton_ready):
    http_port, grpc_port, metrics_port = _free_ports(3)
    cmd = [sys.executable, "-m", "sedeploy", "serve", str(engines), "--port", str(http_port), "--grpc-port",
           str(grpc_port), "--metrics-port", str(metrics_port), "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=2)
                conn.request("GET", "/v2/health/ready")
                ready = conn.getresponse().status == 200
                conn.close()
            except OSError:
                ready = False
            if ready:
                break
            time.sleep(0.5)
        assert ready, proc.stderr.read() if proc.poll() is not None else "not ready in 120 s"
        family = _descendants(proc.pid)
        assert family, "tritonserver should run as a child of sedeploy serve"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert [e["status"] for e in events] == ["ready", "stopped"], out
        time.sleep(1)
        left = [p for p in family if _alive(p)]
        assert left == [], f"processes left behind: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_packaging_an_fp16_artifact_for_triton_onnxruntime_on_cpu_says_it_runs_in_fp32(tiny_onnx, tmp_path, caplog):
    """Triton's ONNX Runtime backend (KIND_CPU) computes an FP16 artifact in FP32 where ORT has no FP16 kernels:
    packaging it says so (it is still packaged: the artifact is valid, only its precision on this CPU differs)."""
    import logging

    from sedeploy.backends.ort import cpu_computes_fp16
    from sedeploy.pipeline import BuildOptions, build_engines
    from sedeploy.serving.triton_repo import package_triton

    build_engines(tiny_onnx, tmp_path / "eng", BuildOptions(backend="none", fp16=True, progress=False))
    with caplog.at_level(logging.WARNING, logger="sedeploy"):
        res = package_triton(tmp_path / "eng", tmp_path / "repo", artifacts=True)
    assert {m["name"] for m in res["models"]} == {"tiny_fp32_onnx", "tiny_fp16_onnx"}
    said = [r.getMessage() for r in caplog.records if "computes them in FP32" in r.getMessage()]
    assert len(said) == (0 if cpu_computes_fp16() else 1) and all(s.startswith("tiny.fp16.onnx") for s in said)
