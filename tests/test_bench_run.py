"""`run_bench` end to end on tiny models: files written and parseable, accuracy on real and trained data, the CI
gate, Ctrl-C partial results, and every bad input refused before the long part."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sedeploy.bench import engines as E
from sedeploy.bench.run import BenchInterrupted, bench_command_summary, run_bench
from sedeploy.errors import SedeployError

FAST = dict(warmup=1, repeats=3, threads=1, probe=False, progress=False)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, calib_dir):
    """An SE-ResNet-18 (width 8, 10 classes, 32 px) exported by sedeploy (full metadata) + its FP16 artifact."""
    from sedeploy.export import export_model
    from sedeploy.fp16 import convert_fp16

    d = tmp_path_factory.mktemp("bench")
    fp32 = d / "tiny.fp32.onnx"
    export_model(depth=18, base_channels=8, num_classes=10, input_size=32, output=fp32, verify_images=calib_dir,
                 verify_limit=4, opset=17)  # the TorchScript exporter: seconds faster than dynamo on a tiny net
    convert_fp16(fp32, d / "tiny.fp16.onnx")
    return fp32, d / "tiny.fp16.onnx"


@pytest.fixture(scope="module")
def trained_pair(tiny_trained_art, tmp_path_factory):
    """The tiny *trained* network (no sedeploy depth metadata: a 'foreign' ONNX), its FP16, and a labels file
    for its held-out folder (folders are '<index>_<name>', which only a labels file can map)."""
    from sedeploy.fp16 import convert_fp16

    d = tmp_path_factory.mktemp("trained")
    fp16 = d / "trained.fp16.onnx"
    convert_fp16(tiny_trained_art.onnx_path, fp16)
    root = tiny_trained_art.heldout_dir
    lines = [f"{p.relative_to(root).as_posix()}\t{int(p.parent.name.split('_')[0])}"
             for p in sorted(root.rglob("*.png"))]
    labels = d / "labels.tsv"
    labels.write_text("\n".join(lines) + "\n")
    return tiny_trained_art.onnx_path, fp16, labels, root


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_end_to_end_on_real_images(tiny_pair, shared_data, tmp_path):
    fp32, fp16 = tiny_pair
    out = tmp_path / "out"
    res = run_bench([fp32, fp16], images=shared_data / "imagenette" / "val", image_limit=8, batches=(1, 4),
                    compare_plain=True, out_dir=out, **{**FAST, "probe": True}, probe_seconds=0.05)
    assert res["complete"] is True and res["reference"] == "tiny.fp32"
    names = [e["name"] for e in res["engines"]]
    assert names[:2] == ["tiny.fp32", "tiny.fp16"]
    assert "pytorch-eager-fp32" in names, res["notes"]  # rebuilt from the metadata and checked against FP32
    plain = [e for e in res["engines"] if e["flavour"] == "no-SE"]
    assert len(plain) == 1 and plain[0]["gflops_total"] < res["engines"][0]["gflops_total"]
    for e in res["engines"]:
        assert set(e["batch"]) == {"1", "4"}
        for b, s in e["batch"].items():
            assert s["n"] == 3 and s["throughput"] > 0 and len(s["samples_s"]) == 3
            assert s["latency_ms"]["p50"] <= s["latency_ms"]["p99"]
    acc = {e["name"]: e["accuracy"] for e in res["engines"]}
    assert acc["pytorch-eager-fp32"] is None and acc[plain[0]["name"]] is None  # timed only
    for name in ("tiny.fp32", "tiny.fp16"):
        assert acc[name]["labelled"] and acc[name]["n_images"] == 8
    assert acc["tiny.fp32"]["top1_agreement_pct"] == 100.0
    assert res["labels"]["source"] == "synset folders" and "rank in sorted order" in res["labels"]["rule"]
    assert res["flops"]["source"] == "ONNX metadata" and res["ceilings"]["fp32"]["per_s"] > 0
    assert res["se_cost"] and {r["batch"] for r in res["se_cost"]} == {1, 4}

    data = json.loads((out / "results.json").read_text())
    assert data["complete"] is True and len(data["engines"]) == len(names)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * len(names) and {r["batch"] for r in rows} == {"1", "4"}
    assert all(float(r["p50_ms"]) > 0 for r in rows)
    md = (out / "results.md").read_text()
    assert "## Speed" in md and "## Accuracy drift" in md and "tiny.fp16" in md
    assert _png(out / "throughput_vs_gflops.png") and _png(out / "latency_vs_batch.png")
    text = bench_command_summary(res)
    assert "tiny.fp16" in text and "FLOPs per image" in text and "SE cost at batch 4" in text
    from sedeploy.backends.ort import cpu_computes_fp16

    said = [n for n in res["notes"] if n.startswith("Precision: tiny.fp16.onnx is an FP16 graph")]
    assert len(said) == (0 if cpu_computes_fp16() else 1) and not any("tiny.fp32" in n for n in said)
    assert all(n in text for n in said)  # printed too, not only in the JSON


def test_trained_heldout_gate_names_engine_and_figure(trained_pair, tmp_path):
    import onnx

    fp32, fp16, labels, root = trained_pair
    # an engine of the same model whose classifier is biased towards class 0: real drift the gate must catch
    proto = onnx.load(str(fp32))
    gemm = next(n for n in proto.graph.node if n.op_type in ("Gemm", "MatMul", "Add") and
                any(i.name == n.input[-1] and len(i.dims) == 1 for i in proto.graph.initializer))
    bias = next(i for i in proto.graph.initializer if i.name == gemm.input[-1])
    b = onnx.numpy_helper.to_array(bias).copy()
    b[0] += 3.0 * (np.abs(b).max() + 1.0)
    bias.CopyFrom(onnx.numpy_helper.from_array(b, bias.name))
    drifted = tmp_path / "trained.drifted.onnx"
    onnx.save(proto, str(drifted))

    res = run_bench([fp32, fp16, drifted], images=root, labels=labels, batches=(8,), reference=fp32.name,
                    max_top1_drop=0.5, min_agreement=99.0, out_dir=tmp_path / "out", plots=False, **FAST)
    acc = {e["name"]: e["accuracy"] for e in res["engines"]}
    ref = fp32.name.removesuffix(".onnx")
    assert acc[ref]["n_images"] == 500 and acc[ref]["top1_pct"] >= 85.0  # trained to ≥ 90 %
    assert acc["trained.fp16"]["top1_agreement_pct"] >= 98.0
    assert acc["trained.drifted"]["flips_right_to_wrong"] > 50
    gate = res["gate"]
    assert gate["passed"] is False
    drifted_lines = [v for v in gate["violations"] if v.startswith("trained.drifted:")]
    assert any("top-1" in v and "points below" in v for v in drifted_lines)
    assert any("agreement" in v for v in drifted_lines)
    assert not any(v.startswith("trained.fp16:") for v in gate["violations"])
    assert "Accuracy budget: FAIL" in bench_command_summary(res)
    # a 'foreign' ONNX (no depth metadata): FLOPs from the graph, baseline and plain model skipped with reasons
    assert "Conv + Gemm" in res["flops"]["source"] and res["flops"]["gflops_total"] > 0
    assert any("PyTorch baseline skipped" in n and "metadata" in n for n in res["notes"])
    assert "pytorch-eager-fp32" not in acc
    assert json.loads((tmp_path / "out" / "results.json").read_text())["gate"]["passed"] is False


def test_mixed_models_are_refused_naming_the_engine(tiny_pair, tmp_path):
    import onnx

    fp32, fp16 = tiny_pair
    # another model, as the check sees it: other weights, another depth, another input size (declared shape and
    # metadata; the check runs before any engine does)
    proto = onnx.load(str(fp32))
    meta = {p.key: p for p in proto.metadata_props}
    meta["sedeploy.weights"].value = "random (seed 1)"
    meta["sedeploy.depth"].value = "34"
    for d in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_value = 40
    other = tmp_path / "other.fp32.onnx"
    onnx.save(proto, str(other))
    with pytest.raises(SedeployError) as err:
        run_bench([fp32, fp16, other], reference="tiny.fp32", batches=(1,), **FAST)
    text = str(err.value)
    assert "other.fp32:" in text and "input 3×40×40 vs 3×32×32" in text and "depth 34 vs 18" in text
    assert "weights 'random (seed 1)' vs 'random (seed 0)'" in text
    assert "tiny.fp16" not in text.split("reference")[1].split("Fix")[0]  # the FP16 of the same model is fine
    with pytest.raises(SedeployError, match="Several FP32 engines"):
        run_bench([fp32, other], batches=(1,), **FAST)


class _Interrupting:
    """Wraps a runner; raises KeyboardInterrupt on the ``after``-th call whose batch has ``batch`` images."""

    def __init__(self, inner, batch: int, after: int):
        self.inner, self.batch, self.after, self.calls = inner, batch, after, 0
        self.input_dtype = inner.input_dtype

    def infer(self, x):
        if x.shape[0] == self.batch:
            self.calls += 1
            if self.calls >= self.after:
                raise KeyboardInterrupt
        return self.inner.infer(x)

    def deactivate(self):
        self.inner.deactivate()

    def __getattr__(self, name):  # everything else the runner protocol offers comes from the wrapped runner
        return getattr(self.inner, name)


def _patch_runner(monkeypatch, engine_name: str, batch: int, after: int):
    real = E.start_runner

    def fake(spec, **kw):
        runner = real(spec, **kw)
        return _Interrupting(runner, batch, after) if spec.name == engine_name else runner

    monkeypatch.setattr(E, "start_runner", fake)


def test_ctrl_c_during_timing_writes_partial_results(tiny_pair, tmp_path, monkeypatch):
    fp32, fp16 = tiny_pair
    _patch_runner(monkeypatch, "tiny.fp16", batch=4, after=3)  # warm-up call + 1 timed round of batch 4
    out = tmp_path / "out"
    with pytest.raises(BenchInterrupted) as err:
        run_bench([fp32, fp16], batches=(1, 4), out_dir=out, torch_baseline=False, **FAST)
    assert isinstance(err.value, KeyboardInterrupt)
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] is False and "Ctrl-C" in data["interrupted"] and "batch 4" in data["interrupted"]
    by = {e["name"]: e for e in data["engines"]}
    assert by["tiny.fp16"]["batch"]["1"]["n"] == 3  # batch 1 finished before the interrupt
    assert "4" in by["tiny.fp32"]["batch"]  # the round in progress kept what it measured
    assert "Incomplete" in (out / "results.md").read_text()
    assert err.value.results["complete"] is False and set(err.value.files) >= {"json", "csv", "md"}


def test_ctrl_c_during_accuracy_keeps_common_images(tiny_pair, tmp_path, monkeypatch, calib_dir):
    fp32, fp16 = tiny_pair
    _patch_runner(monkeypatch, "tiny.fp16", batch=5, after=2)  # batch 5 occurs only in the accuracy pass
    with pytest.raises(BenchInterrupted):
        run_bench([fp32, fp16], images=calib_dir, eval_batch=5, batches=(1,), out_dir=tmp_path, plots=False,
                  torch_baseline=False, **FAST)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["complete"] is False and "accuracy pass after 5 of" in data["interrupted"]
    acc = {e["name"]: e["accuracy"] for e in data["engines"]}
    assert acc["tiny.fp16"]["n_images"] == 5 and acc["tiny.fp16"]["labelled"] is False  # a flat folder
    assert data["engines"][0]["batch"]["1"]["n"] == 3  # timing had completed


def test_static_batch(tiny_model, tmp_path, calib_dir):
    from sedeploy.export import export_onnx

    static = export_onnx(tiny_model, tmp_path / "static.onnx", dynamic_batch=False, batch_size=2, input_size=32,
                         opset=17)
    with pytest.raises(SedeployError, match=r"Batch size 1, 8 does not fit 'static', which has a static batch "
                                            r"of 2"):
        run_bench([static], batches=(1, 2, 8), **FAST)
    with pytest.raises(SedeployError, match="--dynamic-batch"):  # the fix names the option that makes it dynamic
        run_bench([static], batches=(1,), **FAST)
    # the accuracy pass pads the last chunk for a static-batch engine (5 images, batch 2)
    res = run_bench([static], batches=(2,), images=calib_dir, image_limit=5, torch_baseline=False, **FAST)
    assert res["engines"][0]["accuracy"]["n_images"] == 5 and res["complete"]
    # no --batch: the engine's fixed batch is timed, and a note says so
    res = run_bench([static], torch_baseline=False, **FAST)
    assert list(res["engines"][0]["batch"]) in ([2], ["2"]), res["engines"][0]["batch"].keys()
    assert any("fixed batch" in n and "Batch 2 only" in n for n in res["notes"]), res["notes"]


def test_engines_with_different_fixed_batches_are_refused_naming_each(tiny_model, tmp_path):
    from sedeploy.export import export_onnx

    a = export_onnx(tiny_model, tmp_path / "a" / "tiny.onnx", dynamic_batch=False, batch_size=2, input_size=32,
                    opset=17)
    b = export_onnx(tiny_model, tmp_path / "b" / "tiny3.onnx", dynamic_batch=False, batch_size=3, input_size=32,
                    opset=17)
    with pytest.raises(SedeployError, match=r"different fixed batches: tiny \(batch 2\), tiny3 \(batch 3\)"):
        run_bench([a, b], reference="tiny", torch_baseline=False, **FAST)


def _with_offset(src: Path, dest: Path, offset: int) -> Path:
    import onnx

    from sedeploy.onnxcore import META, set_metadata

    proto = onnx.load(str(src))
    set_metadata(proto, {META.LABEL_OFFSET: offset})
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(dest))
    return dest


def test_label_offset_recorded_by_the_build_is_used(tiny_pair, tmp_path):
    fp32, fp16 = tiny_pair
    assert run_bench([fp32], batches=(1,), torch_baseline=False, **FAST)["config"]["label_offset"] == 0
    one = _with_offset(fp32, tmp_path / "one" / "tiny.fp32.onnx", 1)
    res = run_bench([one], batches=(1,), torch_baseline=False, **FAST)
    assert res["config"]["label_offset"] == 1 and not any("label offset" in n for n in res["notes"])
    # an explicit --label-offset wins, with a warning naming both
    res = run_bench([one], batches=(1,), torch_baseline=False, label_offset=0, **FAST)
    assert res["config"]["label_offset"] == 0
    assert any(n.startswith("WARNING") and "--label-offset 0" in n and "offset 1" in n for n in res["notes"])
    # engines recording different offsets are not one build
    zero = _with_offset(fp16, tmp_path / "one" / "tiny.fp16.onnx", 0)
    with pytest.raises(SedeployError, match="different label offsets"):
        run_bench([one, zero], batches=(1,), torch_baseline=False, **FAST)


def test_bad_inputs_are_refused_before_measuring(tiny_pair, tmp_path, calib_dir, shared_data):
    fp32, fp16 = tiny_pair
    with pytest.raises(SedeployError, match="No engines"):
        run_bench([], **FAST)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SedeployError, match="not writable"):
        run_bench([fp32], out_dir=blocker / "sub", **FAST)
    with pytest.raises(SedeployError, match="needs images"):
        run_bench([fp32, fp16], min_agreement=99, **FAST)
    labels = tmp_path / "labels.tsv"
    labels.write_text("astronaut.jpg\t3\nnot_there.jpg\t1\n")
    with pytest.raises(SedeployError, match="not_there.jpg"):
        run_bench([fp32], images=calib_dir, labels=labels, **FAST)
    names = sorted(p.name for p in calib_dir.iterdir() if p.suffix == ".jpg")
    labels.write_text("".join(f"{n}\t{12 if i == 0 else 1}\n" for i, n in enumerate(names)))
    with pytest.raises(SedeployError, match=r"outside 0…9.*12"):
        run_bench([fp32], images=calib_dir, labels=labels, **FAST)
    with pytest.raises(SedeployError, match="cannot be matched to a model with 10 classes"):
        run_bench([fp32], images=shared_data / "imagenet-samples-500", **FAST)
    with pytest.raises(SedeployError, match="needs labels"):
        run_bench([fp32, fp16], images=calib_dir, max_top1_drop=0.5, **FAST)


def test_tensorrt_plan_without_tensorrt_is_an_error_not_dropped(tiny_pair, tmp_path):
    from sedeploy.backends.tensorrt import trt_version

    if trt_version() is not None:
        pytest.skip("TensorRT is installed here: the missing-TensorRT path cannot be exercised")
    fp32, _ = tiny_pair
    plan = tmp_path / "tiny.fp16.plan"
    plan.write_bytes(b"not a real plan")
    (tmp_path / "tiny.fp16.trt.json").write_text(json.dumps(
        {"backend": "trt", "precision": "fp16", "source_model": str(fp32),
         "profile": {"input": "input", "min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [16, 3, 32, 32]}}))
    with pytest.raises(SedeployError, match="beyond|profile up to batch 16"):
        run_bench([fp32, plan], batches=(1, 32), **FAST)
    with pytest.raises(SedeployError, match=r"Cannot run the TensorRT engine 'tiny.fp16.plan'.*tensorrt"):
        run_bench([fp32, plan], batches=(1, 8), **FAST)


def test_a_folder_means_the_files_in_it(tmp_path, monkeypatch):
    """A build folder stands for the files the build wrote *into it*: a copy whose manifest still names the
    original's paths (absolute, or relative to where the build ran) must not time the original's files. An input
    the build used where it was (an artifact given as MODEL, outside the output folder) is taken from there."""
    orig, copy, elsewhere = tmp_path / "orig", tmp_path / "copy", tmp_path / "inputs"
    for d in (orig, copy, elsewhere):
        d.mkdir()
    for d in (orig, copy):
        (d / "m.fp32.onnx").write_bytes(b"x")
    (orig / "m.int8-cpu.onnx").write_bytes(b"x")
    (elsewhere / "given.fp16.onnx").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)  # the relative paths below resolve from here, as from where the build ran
    for out_dir, entries in ((str(orig), [str(orig / "m.fp32.onnx"), str(orig / "m.int8-cpu.onnx")]),
                             ("orig", ["orig/m.fp32.onnx", "orig/m.int8-cpu.onnx"])):
        manifest = {"out_dir": out_dir, "engines": [{"path": e} for e in entries]}
        (copy / "manifest.json").write_text(json.dumps(manifest))
        (copy / "m.int8-cpu.onnx").unlink(missing_ok=True)
        with pytest.raises(SedeployError, match=r"lists 'm.int8-cpu.onnx', which is not in 'copy'"):
            E.expand_engine_paths(["copy"])
        (copy / "m.int8-cpu.onnx").write_bytes(b"x")
        assert E.expand_engine_paths(["copy"]) == [Path("copy/m.fp32.onnx"), Path("copy/m.int8-cpu.onnx")]
    manifest = {"out_dir": "copy", "artifacts": [{"path": "inputs/given.fp16.onnx"}]}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert E.expand_engine_paths(["copy"]) == [Path("inputs/given.fp16.onnx")]  # an input, used where it was
    (elsewhere / "given.fp16.onnx").unlink()
    with pytest.raises(SedeployError, match=r"which is not at 'inputs/given.fp16.onnx' \(an input"):
        E.expand_engine_paths(["copy"])
    for bad in ([1, 2], {"engines": ["m.fp32.onnx"]}, {"engines": [{"file": "m.fp32.onnx"}]}):
        (copy / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(SedeployError, match="is not a build-engine manifest"):
            E.expand_engine_paths(["copy"])


def test_engine_source_is_found_beside_the_engine_and_checked(tmp_path):
    """One rule for every reader of a compiled engine's source ONNX (metadata, FLOPs, stem width, peers): the file
    of the recorded name beside the engine, then the recorded path, each only with the recorded sha256."""
    from sedeploy.bench.engines import source_onnx
    from sedeploy.onnxcore import sha256_file

    src = tmp_path / "orig" / "m.fp32.onnx"
    src.parent.mkdir()
    src.write_bytes(b"model")
    side = {"source_model": str(src), "source_sha256": sha256_file(src)}
    copy = tmp_path / "copy"
    copy.mkdir()
    engine = copy / "m.fp32.ov.xml"
    assert source_onnx(tmp_path / "x.onnx", None) == tmp_path / "x.onnx"  # an ONNX engine is its own source
    assert source_onnx(engine, side) == src  # nothing beside it: the recorded file
    (copy / "m.fp32.onnx").write_bytes(b"model")
    assert source_onnx(engine, side) == copy / "m.fp32.onnx"  # beside it first
    (copy / "m.fp32.onnx").write_bytes(b"other model")
    assert source_onnx(engine, side) == src  # beside it but different: the recorded one still matches
    src.unlink()
    with pytest.raises(SedeployError, match="differ"):
        source_onnx(engine, side)
    (copy / "m.fp32.onnx").unlink()
    assert source_onnx(engine, side) is None  # moved without its ONNX: not found (callers say what they skip)


def test_bench_threads_are_bounded(tiny_pair, tmp_path):
    from sedeploy.onnxcore import default_threads

    fp32, _ = tiny_pair
    with pytest.raises(SedeployError, match=rf"--threads {4 * default_threads() + 1} is not valid"):
        run_bench([fp32], out_dir=tmp_path, **{**FAST, "threads": 4 * default_threads() + 1})


def test_results_folder_holds_one_run(tiny_pair, tmp_path, calib_dir):
    """A run without plots into a folder with an earlier run's plots removes them (they describe other results);
    --out inside --images is refused (the next run would score the plots as images); a results folder this run
    made and wrote nothing into is removed when it fails."""
    fp32, fp16 = tiny_pair
    out = tmp_path / "r"
    run_bench([fp32], batches=(1,), out_dir=out, torch_baseline=False, **FAST)
    assert (out / "latency_vs_batch.png").is_file()
    run_bench([fp32, fp16], batches=(1,), out_dir=out, torch_baseline=False, plots=False, **FAST)
    assert not list(out.glob("*.png")) and (out / "results.json").is_file()
    images = tmp_path / "imgs"
    shutil.copytree(calib_dir, images)
    with pytest.raises(SedeployError, match=r"results folder \(--out\) .* is inside the image folder"):
        run_bench([fp32], images=images, out_dir=images / "res", **FAST)
    assert not (images / "res").exists()
    with pytest.raises(SedeployError):
        run_bench([fp32, tmp_path / "missing.onnx"], out_dir=tmp_path / "new" / "res", **FAST)
    assert not (tmp_path / "new").exists()


def test_swapped_ort_engine_is_refused(tmp_path, tiny_onnx):
    """An .ort-opt.onnx swapped in from another build (same name, other bytes) is not run under this sidecar."""
    from sedeploy.backends.ort import build_ort_engine

    eng = build_ort_engine(tiny_onnx, tmp_path / "a", threads=1)
    assert E.describe_engine(eng.path).sidecar["engine_sha256"]
    import onnx

    other = onnx.load(str(eng.path))
    other.metadata_props.add(key="swapped", value="1")  # still a valid model, but not the file that was built
    onnx.save(other, str(eng.path))
    with pytest.raises(SedeployError, match="is not the file its sidecar .* describes"):
        E.describe_engine(eng.path)
    art = tmp_path / "b" / "m.fp32.onnx"  # an artifact beside the engine built from it: its name maps to that
    art.parent.mkdir()                     # engine's sidecar, which does not describe the artifact
    shutil.copy(tiny_onnx, art)
    build_ort_engine(art, art.parent, threads=1)
    assert E.describe_engine(art).sidecar is None


def test_build_folder_missing_a_sidecar_is_refused(tiny_onnx, tmp_path):
    """bench DIR: every file the manifest lists for an engine must be there, its sidecar too (without it the
    engine's sha256 could not be checked, and a swapped engine would run under this build's name)."""
    from sedeploy.build import BuildOptions, build_engines

    out = tmp_path / "eng"
    build_engines(tiny_onnx, out, BuildOptions.from_flat(backend="ort", progress=False))
    assert E.expand_engine_paths([out])
    (out / "tiny.fp32.ort.json").unlink()
    with pytest.raises(SedeployError, match=r"lists 'tiny\.fp32\.ort\.json', which is not in"):
        E.expand_engine_paths([out])


def test_accuracy_streams_the_folder_in_bounded_chunks(tiny_pair, tmp_path, calib_dir, monkeypatch):
    """The image folder is decoded a chunk at a time (never whole), an undecodable file in the middle is skipped,
    and the figures are those of scoring the decoded images in the same batches all at once."""
    from sedeploy import preprocess
    from sedeploy.bench.accuracy import engine_accuracy
    from sedeploy.onnxcore import run_model

    fp32, fp16 = tiny_pair
    images = tmp_path / "imgs"
    shutil.copytree(calib_dir, images)
    names = [p.name for p in preprocess.find_images(images).paths]
    (images / (names[len(names) // 2][:-4] + "_broken.png")).write_bytes(b"not a PNG")  # sorts mid-folder
    seen = []
    real = preprocess.load_batch

    def spy(paths, *a, **k):
        seen.append(len(paths))
        return real(paths, *a, **k)

    monkeypatch.setattr(preprocess, "load_batch", spy)
    res = run_bench([fp32, fp16], images=images, eval_batch=4, batches=(1, 2), torch_baseline=False, **FAST)
    assert seen and max(seen) <= 4  # chunks of eval_batch (and the timing pool's head of 4), never the folder
    n = len(names)
    acc = {e["name"]: e["accuracy"] for e in res["engines"]}
    assert acc["tiny.fp16"]["n_images"] == n and res["config"]["n_images"] == n  # the broken file is skipped
    monkeypatch.setattr(preprocess, "load_batch", real)
    x, _ = preprocess.load_folder(calib_dir, E.preprocess_for(E.describe_engine(fp32)))
    ref = np.concatenate([run_model(fp32, x[i:i + 4]) for i in range(0, n, 4)])
    eng = np.concatenate([run_model(fp16, x[i:i + 4]) for i in range(0, n, 4)])
    whole = engine_accuracy(ref, eng)
    for key in ("top1_agreement_pct", "disagreements", "nonfinite_images"):
        assert acc["tiny.fp16"][key] == whole[key], key
    assert acc["tiny.fp16"]["mean_kl"] == pytest.approx(whole["mean_kl"], rel=1e-6, abs=1e-12)
    assert acc["tiny.fp16"]["max_abs_logit_diff"] == pytest.approx(whole["max_abs_logit_diff"], rel=1e-6)


def _nan_model(src: Path, dest: Path) -> Path:
    """``src`` with its classifier bias set to NaN: every output is NaN, as in a model whose weights diverged."""
    import onnx

    proto = onnx.load(str(src))
    inits = {i.name: i for i in proto.graph.initializer}
    bias = next(inits[n.input[2]] for n in reversed(proto.graph.node) if n.op_type == "Gemm" and len(n.input) > 2)
    b = onnx.numpy_helper.to_array(bias).copy()
    b[:] = np.nan
    bias.CopyFrom(onnx.numpy_helper.from_array(b, bias.name))
    onnx.save(proto, str(dest))
    return dest


def test_nan_outputs_are_flagged_never_scored_as_agreement(tiny_pair, tmp_path, calib_dir):
    """A model whose outputs are all NaN: as the reference it is refused (exit 3) before any timing; as another
    engine it scores 0 % agreement (not 100 %), no KL, and fails the gate even without a budget."""
    from sedeploy.errors import VerificationError

    fp32, _ = tiny_pair
    nan = _nan_model(fp32, tmp_path / "tiny.nan.onnx")
    with pytest.raises(VerificationError, match=r"reference engine 'tiny.nan' .* non-finite outputs") as err:
        run_bench([nan], images=calib_dir, image_limit=8, batches=(1,), torch_baseline=False, **FAST)
    assert err.value.exit_code == 3
    res = run_bench([fp32, nan], images=calib_dir, image_limit=8, batches=(1,), reference=fp32.name,
                    torch_baseline=False, **FAST)
    acc = {e["name"]: e["accuracy"] for e in res["engines"]}
    bad = acc["tiny.nan"]
    assert bad["top1_agreement_pct"] == 0.0 and bad["disagreements"] == 8 and bad["nonfinite_images"] == 8
    assert bad["mean_kl"] is None and bad["max_abs_logit_diff"] is None
    assert acc["tiny.fp32"]["top1_agreement_pct"] == 100.0 and acc["tiny.fp32"]["nonfinite"] == 0
    assert res["gate"]["passed"] is False and res["gate"]["max_top1_drop_pts"] is None
    assert len(res["gate"]["violations"]) == 1 and res["gate"]["violations"][0].startswith("tiny.nan: ")
    text = bench_command_summary(res)
    assert "WARNING: tiny.nan produced" in text and "on 8 of 8 images" in text and "Accuracy budget: FAIL" in text


def test_omp_num_threads_that_openmp_cannot_use_is_refused(tiny_pair, monkeypatch):
    fp32, _ = tiny_pair
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("OMP_NUM_THREADS", bad)
        with pytest.raises(SedeployError, match=f"OMP_NUM_THREADS='{bad}' is not valid") as err:
            run_bench([fp32], batches=(1,), **FAST)
        assert err.value.exit_code == 2 and "unset OMP_NUM_THREADS" in str(err.value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert run_bench([fp32], batches=(1,), torch_baseline=False, **FAST)["complete"]


def test_a_second_bench_into_the_same_results_folder_is_refused(tiny_pair, tmp_path):
    from sedeploy.fsutil import folder_lock

    fp32, _ = tiny_pair
    out = tmp_path / "res"
    out.mkdir()
    with folder_lock(out, what="results folder", command="bench"):  # another bench holds it
        with pytest.raises(SedeployError, match=r"Another bench run is writing into the results folder") as err:
            run_bench([fp32], batches=(1,), out_dir=out, torch_baseline=False, **FAST)
    assert "--out DIR" in str(err.value) and not any(out.iterdir())
    run_bench([fp32], batches=(1,), out_dir=out, torch_baseline=False, plots=False, **FAST)
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json", "results.md"]


def test_1001_outputs_without_an_offset_hint_at_label_offset_1(tmp_path):
    from PIL import Image

    from flatten_model import flatten_classifier

    src = flatten_classifier(tmp_path / "bg.onnx", classes=1001, size=32)
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"{k}.png")
    labels = tmp_path / "labels.txt"
    labels.write_text("0.png\t3\n1.png\t7\n")
    res = run_bench([src], batches=(1,), images=root, labels=labels, torch_baseline=False, **FAST)
    assert any(n.startswith("WARNING") and "--label-offset 1" in n for n in res["notes"]), res["notes"]
    res = run_bench([src], batches=(1,), images=root, labels=labels, torch_baseline=False, label_offset=1, **FAST)
    assert not any("--label-offset 1" in n for n in res["notes"]), res["notes"]
