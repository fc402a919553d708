"""Benchmark results: assembly from timing + accuracy + ceilings, and the files (json, csv, md, png) written."""
import csv
import json

import numpy as np
import pytest

from sedeploy.bench import accuracy as A
from sedeploy.bench import report as R
from sedeploy.bench import tables as T
from sedeploy.backends.timing import time_runners
from sedeploy.errors import SedeployError


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Fake:
    """Costs ``ms`` per image; returns fixed logits (only timing matters here)."""

    def __init__(self, name, clock, ms):
        self.name, self.clock, self.ms = name, clock, ms

    def infer(self, x):
        self.clock.t += self.ms * 1e-3 * x.shape[0]
        return np.zeros((x.shape[0], 10), np.float32)


CEILINGS = {"fp32": {"kind": "fp32", "unit": "GFLOP/s", "per_s": 100.0, "shape": [64, 64, 64], "threads": 2},
            "int8": {"kind": "int8", "unit": "GOP/s", "per_s": 200.0, "shape": [64, 64, 64], "threads": 2}}
MACHINE = {"cpu": "Test CPU", "usable_cores": 2, "ram_gib": 8.0, "os": "Linux", "python": "3.11",
           "versions": {"onnxruntime": "1.x"}, "loadavg": [0.1, 0.1, 0.1]}


def _results(complete_run=True):
    clock = Clock()
    runners = [Fake("r50-fp32", clock, 50.0), Fake("r50-int8", clock, 25.0), Fake("r101-fp32", clock, 100.0)]
    timing = time_runners(runners, np.zeros((2, 3, 4, 4), np.float32), batch_sizes=[1, 4], warmup=0,
                          repeats=5, clock=clock)
    if not complete_run:
        timing.complete, timing.interrupted = False, "interrupted (Ctrl-C) during batch 4, timed rounds"
    engines = [R.EngineInfo("r50-fp32", "SE-ResNet-50", "fp32", 8.0, depth=50, gflops_seed=4.13),
               R.EngineInfo("r50-int8", "SE-ResNet-50", "int8", 8.0, depth=50, flavour="qoperator"),
               {"name": "r101-fp32", "model": "SE-ResNet-101", "precision": "fp32", "gflops_total": 15.0,
                "depth": 101}]
    ref = np.array([[3, 1, 0], [0, 2, 1], [1, 0, 4], [2, 0, 1]], np.float32)
    eng = ref.copy()
    eng[1] = [2, 0, 1]
    eng[3, 0] = np.nan  # a NaN must become null in JSON, never the invalid token NaN
    acc = A.compare_engines("r50-fp32", {"r50-fp32": ref, "r50-int8": eng}, np.array([0, 1, 2, 0]))
    return R.assemble_results(engines, timing, accuracy=acc, ceilings=CEILINGS, reference="r50-fp32",
                              config={"images": "test"}, machine=MACHINE,
                              labels={"source": "labels file", "rule": "file<TAB>class index"})


@pytest.fixture(scope="module")
def results():
    return _results()


class Drifting(Fake):
    """Like Fake, but every call costs ``step`` ms more than the one before (a machine slowing down)."""

    def __init__(self, name, clock, ms, step):
        super().__init__(name, clock, ms)
        self.step = step

    def infer(self, x):
        self.ms += self.step
        return super().infer(x)


def test_speedup_interval_in_json_csv_and_table(tmp_path):
    clock = Clock()
    runners = [Fake("ref", clock, 50.0), Drifting("fast", clock, 20.0, 0.8)]
    timing = time_runners(runners, np.zeros((1, 3, 4, 4), np.float32), batch_sizes=[1], warmup=0, repeats=12,
                          clock=clock)
    engines = [R.EngineInfo("ref", "SE-ResNet-50", "fp32", 8.0), R.EngineInfo("fast", "SE-ResNet-50", "int8", 8.0)]
    res = R.assemble_results(engines, timing, reference="ref", machine=MACHINE)
    e = {x["name"]: x["batch"]["1"] for x in res["engines"]}
    ratios = np.sort(50.0 / (20.0 + 0.8 * np.arange(1, 13)))
    # 12 rounds at 95 %: P(Binomial(12, 1/2) ≤ 2) = 0.0193 ≤ 0.025, so the 3rd and 10th smallest ratios
    assert e["fast"]["speedup_ci95"] == pytest.approx([ratios[2], ratios[9]])
    assert e["fast"]["speedup_ci95"][0] < e["fast"]["speedup_vs_reference"] < e["fast"]["speedup_ci95"][1]
    assert e["ref"]["speedup_ci95"] is None  # the reference against itself: no interval
    R.write_reports(res, tmp_path)
    row = next(r for r in csv.DictReader(open(tmp_path / "results.csv")) if r["engine"] == "fast")
    assert float(row["speedup_ci95_low"]) == pytest.approx(ratios[2])
    assert (ratios[2], ratios[9]) == pytest.approx((1.7857, 2.2321), abs=1e-4)
    assert "1.78–2.24" in T.format_table(res)  # rounded outwards (to nearest: 1.79–2.23)
    assert "1.78–2.24" in T.to_markdown(res) and "No 95 % CI" not in T.format_table(res)
    assert "CEILING UNRELIABLE" not in T.format_table(res) and res["ceiling_exceeded"] == []  # no ceilings given


def test_assembled_figures(results):
    e = {x["name"]: x for x in results["engines"]}
    b1 = e["r50-fp32"]["batch"]["1"]
    assert b1["latency_ms"]["p50"] == pytest.approx(50.0) and b1["throughput"] == pytest.approx(20.0)
    assert b1["gflops_achieved"] == pytest.approx(160.0)  # 8 GFLOP × 20 img/s
    assert b1["fraction_of_ceiling"] == pytest.approx(1.6) and b1["ceiling"] == "fp32"
    b4 = e["r50-int8"]["batch"]["4"]
    assert b4["throughput"] == pytest.approx(40.0) and b4["fraction_of_ceiling"] == pytest.approx(320 / 200)
    assert b4["speedup_vs_reference"] == pytest.approx(2.0) and len(b4["samples_s"]) == 5
    assert e["r101-fp32"]["batch"]["1"]["speedup_vs_reference"] == pytest.approx(0.5)
    assert b4["speedup_ci95"] is None  # 5 rounds: too few for a 95 % interval of the median
    assert "No 95 % CI at batch 1, 4: fewer than 6 paired rounds" in T.format_table(results)
    # image 1 flips; image 3 has a NaN: a broken row counts as a disagreement and as wrong, never as agreeing
    assert e["r50-int8"]["accuracy"]["top1_agreement_pct"] == 50.0
    assert e["r50-int8"]["accuracy"]["nonfinite_images"] == 1 and e["r50-int8"]["accuracy"]["top1_pct"] == 50.0
    assert e["r101-fp32"]["accuracy"] is None
    assert results["complete"] is True and results["schema"] == R.SCHEMA
    assert results["config"]["images"] == "test" and results["config"]["repeats"] == 5


def test_gpu_engines_get_no_cpu_ceiling():
    clock = Clock()
    timing = time_runners([Fake("trt", clock, 2.0)], np.zeros((1, 3, 4, 4), np.float32), warmup=0, repeats=3,
                          clock=clock)
    res = R.assemble_results([R.EngineInfo("trt", "SE-ResNet-50", "fp16", 8.0, backend="trt", device="cuda")],
                             timing, ceilings=CEILINGS, machine=MACHINE)
    b = res["engines"][0]["batch"]["1"]
    assert b["fraction_of_ceiling"] is None and b["ceiling"] is None and b["gflops_achieved"] == pytest.approx(4000)


def test_assemble_rejects_inconsistent_input():
    clock = Clock()
    timing = time_runners([Fake("a", clock, 1.0)], np.zeros((1, 1), np.float32), warmup=0, repeats=1, clock=clock)
    with pytest.raises(SedeployError, match="without a description: a"):
        R.assemble_results([R.EngineInfo("b", "m", "fp32", 1.0)], timing, machine=MACHINE)
    with pytest.raises(SedeployError, match="reference engine 'zz'"):
        R.assemble_results([R.EngineInfo("a", "m", "fp32", 1.0)], timing, reference="zz", machine=MACHINE)


def test_report_files_parse(results, tmp_path):
    written = R.write_reports(results, tmp_path / "out")
    assert set(written) == {"json", "csv", "md", "throughput_plot", "latency_plot"}
    data = json.loads(written["json"].read_text())  # strict JSON: no NaN tokens
    json.loads(written["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["engines"][1]["accuracy"]["max_abs_logit_diff"] is not None
    assert data["engines"][1]["batch"]["4"]["samples_s"] == results["engines"][1]["batch"]["4"]["samples_s"]
    assert data["complete"] is True and data["machine"]["cpu"] == "Test CPU"

    rows = list(csv.DictReader(written["csv"].open()))
    assert len(rows) == 3 * 2  # engine × batch size
    row = next(r for r in rows if r["engine"] == "r50-int8" and r["batch"] == "4")
    assert float(row["throughput"]) == pytest.approx(40.0) and row["precision"] == "int8"
    assert float(row["top1_agreement_pct"]) == 50.0 and row["complete"] == "True"

    md = written["md"].read_text()
    assert "| engine | precision | batch | p50 ms |" in md and "| r101-fp32 | fp32 | 4 |" in md
    assert "## Accuracy drift" in md and "Test CPU" in md and "Incomplete" not in md

    import matplotlib.image as mpimg

    for key in ("throughput_plot", "latency_plot"):
        raw = written[key].read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(written[key])
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not list((tmp_path / "out").glob(".*partial"))


def test_terminal_table(results):
    text = T.format_table(results)
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("engine") and "p50 ms" in l)
    table = lines[start:start + 2 + 6]  # header, rule, 3 engines × 2 batch sizes
    assert [l.split()[0] for l in table[2:]] == ["r50-fp32"] * 2 + ["r50-int8"] * 2 + ["r101-fp32"] * 2
    assert len({len(l) for l in table}) == 1  # columns aligned
    assert "+0.00" in text and "-50.00" in text  # Δtop-1: reference, int8
    assert "WARNING: r50-int8 produced 1 non-finite output value(s) (NaN/Inf) on 1 of 4 images" in text
    assert "2.00×" in text  # int8 vs reference
    assert "160% fp32" in text  # fraction of ceiling, r50-fp32 at batch 1
    # every fake engine beats the fake ceiling (1.5–1.6×): the ceiling is called unreliable, per engine and batch,
    # and the fractions stay as measured (nothing clamped)
    over = {(r["engine"], r["batch"]) for r in results["ceiling_exceeded"]}
    assert over == {(n, b) for n in ("r50-fp32", "r50-int8", "r101-fp32") for b in (1, 4)}
    assert "CEILING UNRELIABLE: above 100 % of the CPU ceiling: r50-fp32 batch 1 160 % of fp32, " in text
    assert "r50-int8 batch 4 160 % of int8" in text and "not clamped" in text
    assert "CPU ceiling (GEMM probe): fp32 100 GFLOP/s" in text
    assert "Timer: runner.infer() wall time" in text and "INCOMPLETE" not in text


def test_incomplete_run_is_marked(tmp_path):
    res = _results(complete_run=False)
    assert res["complete"] is False and "Ctrl-C" in res["interrupted"]
    assert T.format_table(res).startswith("Machine") and "INCOMPLETE RESULTS" in T.format_table(res)
    written = R.write_reports(res, tmp_path, plots=False)
    assert json.loads(written["json"].read_text())["complete"] is False
    assert "> **Incomplete:**" in written["md"].read_text()
    assert {r["complete"] for r in csv.DictReader(written["csv"].open())} == {"False"}


def test_writes_are_atomic(results, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    R.write_reports(results, tmp_path, plots=False)
    png = tmp_path / R.FILES["throughput_plot"]
    png.write_bytes(b"old plot")

    def broken_savefig(self, fname, **kw):
        with open(fname, "wb") as fh:
            fh.write(b"\x89PNG half")  # a partial file …
        raise KeyboardInterrupt  # … then Ctrl-C

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(KeyboardInterrupt):
        R.write_reports(results, tmp_path)
    assert png.read_bytes() == b"old plot"  # the previous file is untouched
    assert not list(tmp_path.glob(".*partial"))  # no temporary left behind
    assert json.loads((tmp_path / "results.json").read_text())["schema"] == R.SCHEMA  # text files came first


def test_machine_description_is_real():
    m = R.machine_description({"note": "x"})
    assert m["cpu"] and m["logical_cores"] >= 1 and m["python"].count(".") == 2
    assert "onnxruntime" in m["versions"] and "numpy" in m["versions"] and m["note"] == "x"
    assert m["timestamp"].endswith("+00:00")


@pytest.mark.parametrize("fault", ["disk full", "second Ctrl-C"])
def test_a_failed_write_keeps_the_previous_set_whole(results, tmp_path, monkeypatch, fault):
    """A full disk while plotting, or a second Ctrl-C while the partial results are written: the folder keeps the
    previous run's json/csv/md *and* plots, never new results beside old plots, and no staging folder."""
    import errno

    out = tmp_path / "out"
    R.write_reports(results, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 5
    second = {**results, "created": "later", "complete": False, "interrupted": "interrupted (Ctrl-C) during timing"}

    from matplotlib.figure import Figure

    def failing_savefig(fig, path, **kw):  # what matplotlib meets on a full disk, or the user's second Ctrl-C
        if fault == "disk full":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(SedeployError if fault == "disk full" else KeyboardInterrupt) as err:
        R.write_reports(second, out)
    if fault == "disk full":
        assert "disk is full" in str(err.value) and "Nothing partial was kept" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # hidden staging folders included: none left
    monkeypatch.undo()
    R.write_reports(second, out, plots=False)  # a set without plots removes the previous run's plots
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json", "results.md"]
    assert json.loads((out / "results.json").read_text())["created"] == "later"
