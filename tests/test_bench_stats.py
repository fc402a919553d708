"""Benchmark core: interleaved timing (fake clock), statistics, accuracy drift, the budget gate, labels, GEMM probe."""
import gc
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from sedeploy import classes as C
from sedeploy import labels as L
from sedeploy import metrics as M
from sedeploy.bench import accuracy as A
from sedeploy.bench.probe import ceiling_kind, probe_fp32_gemm, probe_int8_gemm
from sedeploy.backends.timing import DEFAULT_TIMER_COVERAGE, latency_stats, paired_speedup, speedup_interval, time_runners
from sedeploy.errors import SedeployError


# ------------------------------------------------------------------------------------------------ fakes
class FakeClock:
    """Time advances only when a fake runner 'works': timings are exact and the tests instantaneous."""

    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class FakeRunner:
    """Deterministic runner: each call costs the next duration of ``costs`` (cycled) per image, logs its name."""

    def __init__(self, name, clock, costs, log, *, classes=10, interrupt_on_call=None, **attrs):
        self.name, self.clock, self.costs, self.log = name, clock, itertools.cycle(costs), log
        self.classes, self.interrupt_on_call, self.calls, self.seen_dtypes = classes, interrupt_on_call, 0, []
        self.__dict__.update(attrs)

    def infer(self, x):
        self.calls += 1
        if self.calls == self.interrupt_on_call:
            raise KeyboardInterrupt
        self.log.append(self.name)
        self.seen_dtypes.append(x.dtype)
        self.clock.t += next(self.costs) * x.shape[0]
        return np.tile(np.arange(self.classes, dtype=np.float32), (x.shape[0], 1))


@pytest.fixture
def clock():
    return FakeClock()


X = np.zeros((4, 3, 8, 8), np.float32)


# ------------------------------------------------------------------------------------------------ statistics
def test_latency_stats_match_numpy_percentiles():
    rng = np.random.default_rng(7)
    samples = rng.lognormal(-4, 0.5, 101)  # skewed, like real latencies
    st = latency_stats(samples, batch=8)
    ms = samples * 1e3
    for q in (10, 25, 50, 75, 90, 99):
        assert st["latency_ms"][f"p{q}"] == pytest.approx(np.percentile(ms, q), rel=1e-12)
    assert st["latency_ms"]["mean"] == pytest.approx(ms.mean())
    assert st["latency_ms"]["std"] == pytest.approx(ms.std(ddof=1))
    assert st["latency_ms"]["min"] == pytest.approx(ms.min())
    assert st["throughput"] == pytest.approx(8 / np.median(samples))
    assert st["throughput_total"] == pytest.approx(8 * 101 / samples.sum())
    p25, p50, p75 = np.percentile(ms, [25, 50, 75])
    assert st["spread"]["iqr_pct"] == pytest.approx((p75 - p25) / p50 * 100)
    assert st["spread"]["p90_over_p10"] == pytest.approx(np.percentile(ms, 90) / np.percentile(ms, 10))
    assert st["n"] == 101


def test_latency_stats_small_known_case():
    st = latency_stats([0.001, 0.002, 0.003, 0.004], batch=1)  # 1..4 ms
    assert st["latency_ms"]["p50"] == pytest.approx(2.5)
    assert st["latency_ms"]["p90"] == pytest.approx(3.7)  # linear: 1 + 0.9·3
    assert st["throughput"] == pytest.approx(400.0)
    assert st["throughput_total"] == pytest.approx(4 / 0.010)


@pytest.mark.parametrize("bad", [[], [0.0, 0.1], [float("nan")], [-1e-3]])
def test_latency_stats_rejects_bad_samples(bad):
    with pytest.raises(SedeployError):
        latency_stats(bad, batch=1)


def test_paired_speedup_uses_rounds():
    ref = [2.0, 4.0, 2.0, 10.0]
    eng = [1.0, 2.0, 1.0]  # interrupted one round short: only 3 pairs
    assert paired_speedup(ref, eng) == pytest.approx(2.0)
    assert paired_speedup([], eng) is None


def test_speedup_interval_order_statistics_and_coverage():
    ref, eng = [1.0] * 20, [1.0 / r for r in np.linspace(0.5, 1.5, 20)]  # ratios 0.5 … 1.5, evenly spaced
    lo, hi = speedup_interval(ref, eng)
    ratios = np.sort(np.linspace(0.5, 1.5, 20))
    # n = 20 at 95 %: P(Binomial(20, 1/2) ≤ 5) = 0.0207 ≤ 0.025 < P(≤ 6) = 0.0577, so the 6th and 15th ratios
    assert (lo, hi) == pytest.approx((ratios[5], ratios[14]))
    assert lo <= paired_speedup(ref, eng) <= hi
    assert speedup_interval(ref[:5], eng[:5]) is None  # 2 / 2**5 > 0.05: no 95 % interval from 5 rounds
    assert speedup_interval(ref[:6], eng[:6]) == pytest.approx((ratios[0], ratios[5]))  # 6 rounds: min and max
    big = np.linspace(0.5, 1.5, 5001)  # past 1023 rounds 2**n is no float: the interval must still come out
    lo, hi = speedup_interval(np.ones(5001), 1.0 / big)
    assert 0.98 < lo < 1.0 < hi < 1.02  # ±1.96·sqrt(n)/2 ranks around the middle one, of 5001 spaced 0.0002 apart
    with pytest.raises(SedeployError, match="Confidence"):
        speedup_interval(ref, eng, confidence=95)
    # coverage: per-round ratios from a right-skewed distribution whose median is 1.1 (an exponential's median is
    # scale·ln 2); the interval must hold it in ≥ 95 % of runs (94 %: the simulation's own noise)
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(2000):
        ratios = 1.1 * (1.0 + rng.exponential(0.1, 25) - 0.1 * np.log(2))
        lo, hi = speedup_interval(np.ones(25), 1.0 / ratios)
        hits += lo <= 1.1 <= hi
    assert hits / 2000 >= 0.94


# ------------------------------------------------------------------------------------------------ timing
def test_interleaved_rotated_order_and_exact_samples(clock):
    log = []
    runners = [FakeRunner("a", clock, [0.001], log), FakeRunner("b", clock, [0.002], log),
               FakeRunner("c", clock, [0.004], log)]
    res = time_runners(runners, X, batch_sizes=[1, 2], warmup=1, repeats=4, min_repeats=1, clock=clock)
    assert res.complete and res.interrupted is None
    rounds = ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert res.order[1] == rounds and res.order[2] == rounds
    # the full call log: warm-up round (not timed) then the timed rounds, per batch size
    assert log == (["a", "b", "c"] + rounds) * 2
    assert res.samples["a"][1] == pytest.approx([0.001] * 4)
    assert res.samples["c"][2] == pytest.approx([0.008] * 4)  # cost per image × batch 2
    st = res.stats("b", 2)
    assert st["latency_ms"]["p50"] == pytest.approx(4.0) and st["throughput"] == pytest.approx(500.0)
    assert res.timer == {n: DEFAULT_TIMER_COVERAGE for n in "abc"}


def test_percentiles_through_timing_match_numpy(clock):
    costs = [0.003, 0.001, 0.007, 0.002, 0.005, 0.004, 0.010, 0.006, 0.008, 0.009]
    res = time_runners({"x": FakeRunner("x", clock, costs, [])}, X, batch_sizes=[1], warmup=0, repeats=10,
                       clock=clock)
    st = res.stats("x", 1)
    for q in (50, 90, 99):
        assert st["latency_ms"][f"p{q}"] == pytest.approx(np.percentile(np.array(costs) * 1e3, q))


def test_time_budget_stops_after_min_repeats(clock):
    log = []
    runners = {"a": FakeRunner("a", clock, [0.1], log), "b": FakeRunner("b", clock, [0.1], log)}
    res = time_runners(runners, X, batch_sizes=[1], warmup=0, repeats=100, min_repeats=2, max_seconds=0.35,
                       clock=clock)
    assert len(res.samples["a"][1]) == 2 and res.complete  # 0.2 s after round 1, 0.4 s ≥ 0.35 after round 2
    res = time_runners(runners, X, batch_sizes=[1], warmup=0, repeats=100, min_repeats=5, max_seconds=0.35,
                       clock=clock)
    assert len(res.samples["b"][1]) == 5  # the budget never cuts below min_repeats
    res = time_runners(runners, X, batch_sizes=[1], warmup=0, repeats=7, min_repeats=2, max_seconds=None,
                       clock=clock)
    assert len(res.samples["b"][1]) == 7


def test_keyboard_interrupt_returns_partial_results(clock):
    log = []
    # warm-up 1 call + 3 timed calls at batch 1, then Ctrl-C on b's 5th call (round 4)
    runners = [FakeRunner("a", clock, [0.001], log), FakeRunner("b", clock, [0.002], log, interrupt_on_call=5)]
    assert gc.isenabled()
    res = time_runners(runners, X, batch_sizes=[1, 4], warmup=1, repeats=10, clock=clock)
    assert res.complete is False
    assert "batch 1" in res.interrupted and "timed" in res.interrupted
    # round 4 (index 3) starts with b (rotation), which is interrupted: a has 3 samples, b has 3
    assert len(res.samples["a"][1]) == 3 and len(res.samples["b"][1]) == 3
    assert 4 not in res.samples["a"] and res.stats("a", 4) is None
    assert gc.isenabled()  # the collector is switched back on
    d = res.as_dict()
    assert d["complete"] is False and d["stats"]["a"]["1"]["n"] == 3 and "4" not in d["stats"]["a"]


def test_interrupt_during_warmup(clock):
    res = time_runners([FakeRunner("a", clock, [0.001], [], interrupt_on_call=1)], X, batch_sizes=[1],
                       clock=clock)
    assert res.complete is False and "warm-up" in res.interrupted and res.samples["a"] == {}


def test_runner_declared_timer_and_input_dtype(clock):
    r = FakeRunner("gpu", clock, [0.001], [], timer_coverage="kernel only", input_dtype=np.float16)
    res = time_runners([r], X, batch_sizes=[3], warmup=1, repeats=2, clock=clock)
    assert res.timer["gpu"] == "kernel only"
    assert set(r.seen_dtypes) == {np.dtype(np.float16)}
    assert res.config["interleaving"].startswith("round-robin")


def test_input_pool_is_cycled_and_callable_inputs(clock):
    seen = []

    class Echo:
        name = "echo"

        def infer(self, x):
            seen.append(x.copy())
            clock.t += 0.001
            return x.reshape(x.shape[0], -1)

    pool = np.arange(3, dtype=np.float32).reshape(3, 1)
    time_runners([Echo()], pool, batch_sizes=[5], warmup=0, repeats=1, clock=clock)
    assert seen[0].ravel().tolist() == [0, 1, 2, 0, 1]
    time_runners([Echo()], lambda b: np.full((b, 1), 7, np.float32), batch_sizes=[2], warmup=0, repeats=1,
                 clock=clock)
    assert seen[-1].ravel().tolist() == [7, 7]


def test_timing_input_errors(clock):
    r = FakeRunner("a", clock, [0.001], [])
    with pytest.raises(SedeployError, match="unique"):
        time_runners([r, FakeRunner("a", clock, [0.001], [])], X, clock=clock)
    with pytest.raises(SedeployError, match="has no name"):
        time_runners([object()], X, clock=clock)
    with pytest.raises(SedeployError, match="no infer"):
        time_runners({"x": object()}, X, clock=clock)
    with pytest.raises(SedeployError, match="Batch sizes"):
        time_runners([r], X, batch_sizes=[0], clock=clock)
    with pytest.raises(SedeployError, match="min_repeats"):
        time_runners([r], X, repeats=2, min_repeats=3, clock=clock)
    with pytest.raises(SedeployError, match="budget"):
        time_runners([r], X, max_seconds=0, clock=clock)

    class WrongBatch:
        name = "static"

        def infer(self, x):
            return np.zeros((1, 10), np.float32)

    with pytest.raises(SedeployError, match="static.*batch of 4"):
        time_runners([WrongBatch()], X, batch_sizes=[4], clock=clock)


# ------------------------------------------------------------------------------------------------ accuracy
def _crafted():
    # 4 images, 6 classes. reference top-1: 0,1,2,3   engine top-1: 0,2,2,5   labels: 0,1,5,5
    ref = np.array([[5, 1, 0, 0, 0, 0], [0, 5, 1, 0, 0, 0], [0, 0, 5, 1, 0, 0], [0, 0, 0, 5, 1, 2]], np.float32)
    eng = ref.copy()
    eng[0] += 3.0  # constant shift: same softmax, KL 0, |Δlogit| 3
    eng[1] = [0, 1, 5, 0, 0, 0]
    eng[3] = [0, 0, 0, 1, 1, 5]
    labels = np.array([0, 1, 5, 5])
    return ref, eng, labels


def test_engine_accuracy_on_crafted_logits():
    ref, eng, labels = _crafted()
    a = A.engine_accuracy(ref, eng, labels)
    assert a["top1_agreement_pct"] == 50.0 and a["disagreements"] == 2
    assert a["reference_top1_pct"] == 50.0 and a["top1_pct"] == 50.0 and a["top1_drop_pts"] == 0.0
    assert a["flips_right_to_wrong"] == 1 and a["flips_wrong_to_right"] == 1  # image 1 and image 3
    assert a["max_abs_logit_diff"] == pytest.approx(4.0)  # image 1: 5 → 1 and 1 → 5
    kl = M.kl_divergence(ref, eng)
    assert kl[0] == pytest.approx(0.0, abs=1e-12) and kl[2] == pytest.approx(0.0, abs=1e-12)
    assert kl[1] > 1.0 and a["mean_kl"] == pytest.approx(kl.mean())
    # top-5 over 6 classes: image 2's label 5 is ranked last by the reference, 6th → wrong; all others right
    assert a["reference_top5_pct"] == 75.0


def test_kl_hand_computed():
    p = np.array([[0.0, 0.0]])
    q = np.array([[0.0, math.log(3.0)]])  # softmax → (1/4, 3/4)
    assert M.kl_divergence(p, q)[0] == pytest.approx(0.5 * math.log(4 / 3))
    big = np.array([[1000.0, 0.0]])  # stable for large logits
    assert np.isfinite(M.kl_divergence(big, big[:, ::-1])).all()


def test_topk_with_ties_and_rank():
    logits = np.array([[7, 6, 5, 4, 3, 2, 1], [7, 6, 5, 4, 3, 2, 1], [1, 1, 1, 1, 1, 1, 1]], np.float32)
    labels = np.array([4, 5, 4])  # 5th place → in top-5; 6th → not; all tied → first five indices win
    assert M.topk_correct(logits, labels, 5).tolist() == [True, False, True]
    assert M.topk_correct(logits, np.array([0, 1, 5]), 1).tolist() == [True, False, False]


def test_accuracy_without_labels_has_agreement_only():
    ref, eng, _ = _crafted()
    a = A.engine_accuracy(ref, eng)
    assert a["labelled"] is False and "top1_pct" not in a and a["top1_agreement_pct"] == 50.0


def test_accuracy_rejects_mismatched_inputs():
    ref, eng, labels = _crafted()
    with pytest.raises(SedeployError, match="reference's are"):
        A.engine_accuracy(ref, eng[:3])
    with pytest.raises(SedeployError, match="outside 0…5"):
        A.engine_accuracy(ref, eng, np.array([0, 1, 6, 5]))
    with pytest.raises(SedeployError, match="no logits"):
        A.compare_engines("fp32", {"int8": eng})


def test_compare_and_budget_gate():
    ref, eng, labels = _crafted()
    worse = ref.copy()
    worse[0] = [0, 9, 0, 0, 0, 0]  # image 0 right → wrong as well
    res = A.compare_engines("fp32", {"fp32": ref, "int8": eng, "int8-bad": worse}, labels)
    assert res["fp32"]["top1_agreement_pct"] == 100.0 and res["fp32"]["mean_kl"] == pytest.approx(0, abs=1e-12)
    assert res["int8-bad"]["top1_drop_pts"] == pytest.approx(25.0)
    assert A.check_budget(res) == []
    v = A.check_budget(res, max_top1_drop_pts=10)
    assert len(v) == 1 and v[0].startswith("int8-bad:") and "25.00 points" in v[0] and "budget 10 points" in v[0]
    assert A.check_budget(res, max_top1_drop_pts=30) == []
    v = A.check_budget(res, min_agreement_pct=80)  # agreement: int8 50 %, int8-bad 75 %
    assert [x.split(":")[0] for x in v] == ["int8", "int8-bad"] and "50.00%" in v[0]  # the reference is not gated
    assert "2 of 4 images differ" in v[0] and "75.00%" in v[1]
    assert [x.split(":")[0] for x in A.check_budget(res, min_agreement_pct=75)] == ["int8"]
    assert A.check_budget(res, min_agreement_pct=50) == []
    # full results dict form
    full = {"engines": [{"name": n, "accuracy": a} for n, a in res.items()]}
    assert len(A.check_budget(full, max_top1_drop_pts=10, min_agreement_pct=80)) == 3


def test_budget_errors_and_nonfinite():
    ref, eng, labels = _crafted()
    unlabelled = A.compare_engines("fp32", {"fp32": ref, "int8": eng})
    with pytest.raises(SedeployError, match="needs labels"):
        A.check_budget(unlabelled, max_top1_drop_pts=1)
    with pytest.raises(SedeployError, match="percentage"):
        A.check_budget(unlabelled, min_agreement_pct=101)
    with pytest.raises(SedeployError, match="no engine"):
        A.check_budget(A.compare_engines("fp32", {"fp32": ref}), min_agreement_pct=90)
    nan = ref.copy()
    nan[2, 1] = np.nan
    res = A.compare_engines("fp32", {"fp32": ref, "broken": nan})
    assert res["broken"]["nonfinite"] == 1
    assert any("non-finite" in v for v in A.check_budget(res, min_agreement_pct=0))


# ------------------------------------------------------------------------------------------------ labels
def _touch(root: Path, *names: str) -> list[Path]:
    paths = []
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
        paths.append(p)
    return sorted(paths)


IMAGENETTE = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042",
              "n03425413", "n03445777", "n03888257"]


def test_shipped_synsets_are_sorted_imagenet_order():
    s = C.IMAGENET_SYNSETS
    assert len(s) == 1000 and len(set(s)) == 1000 and list(s) == sorted(s)
    assert [s.index(x) for x in IMAGENETTE] == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]


def test_synset_folders_full_and_subset_models(tmp_path):
    paths = _touch(tmp_path, *(f"{s}/img{i}.jpg" for s in IMAGENETTE for i in range(2)))
    full = L.resolve_labels(paths, tmp_path, num_classes=1000)
    assert full.source == "synset folders"
    assert full.indices.tolist() == [i for i in (0, 217, 482, 491, 497, 566, 569, 571, 574, 701) for _ in (0, 1)]
    sub = L.resolve_labels(paths, tmp_path, num_classes=10)
    assert sub.indices.tolist() == [i for i in range(10) for _ in (0, 1)] and "sorted" in sub.rule
    # mapping of a 10-class model does not depend on which images are evaluated (first 2 files only)
    assert L.resolve_labels(paths[-2:], tmp_path, num_classes=10).indices.tolist() == [9, 9]
    with pytest.raises(SedeployError, match="10 synset classes.*7 classes"):
        L.resolve_labels(paths, tmp_path, num_classes=7)
    rev = list(reversed(IMAGENETTE))
    assert L.resolve_labels(paths[:2], tmp_path, num_classes=10, model_classes=rev).indices.tolist() == [9, 9]


def test_unknown_synset_and_custom_table(tmp_path):
    paths = _touch(tmp_path, "n01440764/a.jpg", "n99999999/b.jpg")
    with pytest.raises(SedeployError, match="does not have: n99999999"):
        L.resolve_labels(paths, tmp_path, num_classes=1000)
    table = tmp_path / "table.tsv"
    table.write_text("index\tsynset\tname\n0\tn99999999\tthing\n1\tn01440764\ttench\n")
    assert C.read_synset_table(table) == ("n99999999", "n01440764")
    got = L.resolve_labels(paths, tmp_path, num_classes=2, synsets=table)
    assert got.indices.tolist() == [1, 0] and "table" in got.rule  # the table's size matches: table order
    got = L.resolve_labels(paths, tmp_path, num_classes=2)  # default 1000-entry table: sorted-rank rule
    assert got.indices.tolist() == [0, 1] and "sorted" in got.rule
    got = L.resolve_labels(paths, tmp_path, num_classes=2, model_classes=["n01440764", "n99999999"])
    assert got.indices.tolist() == [0, 1]


def test_index_folders(tmp_path):
    paths = _touch(tmp_path, "0/a.jpg", "7/b.jpg", "7/c.jpg")
    got = L.resolve_labels(paths, tmp_path, num_classes=10)
    assert got.source == "index folders" and got.indices.tolist() == [0, 7, 7]
    with pytest.raises(SedeployError, match="does not have: 7"):
        L.resolve_labels(paths, tmp_path, num_classes=5)


def test_unusable_folder_layouts(tmp_path):
    paths = _touch(tmp_path, "cats/a.jpg", "n01440764/b.jpg")
    with pytest.raises(SedeployError, match="cats"):
        L.resolve_labels(paths, tmp_path, num_classes=1000)
    mixed = tmp_path / "mixed"
    paths = _touch(mixed, "n01440764/a.jpg", "loose.jpg")
    with pytest.raises(SedeployError, match="loose.jpg"):
        L.resolve_labels(paths, mixed, num_classes=1000)
    with pytest.raises(SedeployError, match="not inside"):
        L.resolve_labels([tmp_path / "x.jpg"], mixed, num_classes=1000)


def test_flat_folders(tmp_path):
    named = tmp_path / "named"
    paths = _touch(named, "n01443537_goldfish.JPEG", "n01440764_tench.JPEG")
    got = L.resolve_labels(paths, named, num_classes=1000)
    assert got.source == "synset file names" and got.indices.tolist() == [0, 1]
    plain = tmp_path / "plain"
    assert L.resolve_labels(_touch(plain, "a.jpg", "b.jpg"), plain, num_classes=1000) is None


def test_labels_file(tmp_path):
    img = tmp_path / "images"
    paths = _touch(img, "a.jpg", "b.jpg", "c.jpg")
    lf = tmp_path / "labels.tsv"
    lf.write_text("file\tlabel\na.jpg\t472\nb.jpg\tn01443537\n\nc.jpg\t0\n")
    got = L.resolve_labels(paths, img, num_classes=1000, labels_file=lf)
    assert got.source == "labels file" and got.indices.tolist() == [472, 1, 0]
    assert L.resolve_labels(paths[:1], img, num_classes=1000, labels_file=lf).indices.tolist() == [472]

    lf.write_text("a.jpg\t1\nzzz.jpg\t2\nb.jpg\t3\nc.jpg\t4\n")
    with pytest.raises(SedeployError, match="not in .*zzz.jpg"):
        L.resolve_labels(paths, img, num_classes=1000, labels_file=lf)
    lf.write_text("a.jpg\t1\nb.jpg\t10\nc.jpg\t4\n")
    with pytest.raises(SedeployError, match=r"outside 0…9: line 2: b.jpg → 10"):
        L.resolve_labels(paths, img, num_classes=10, labels_file=lf)
    lf.write_text("a.jpg\t1\nb.jpg\t2\n")
    with pytest.raises(SedeployError, match="no line in the labels file.*c.jpg"):
        L.resolve_labels(paths, img, num_classes=10, labels_file=lf)
    lf.write_text("a.jpg\t1\nb.jpg\tcat\n")
    with pytest.raises(SedeployError, match="Line 2.*'cat'"):
        L.resolve_labels(paths, img, num_classes=10, labels_file=lf)
    with pytest.raises(SedeployError, match="does not exist"):
        L.resolve_labels(paths, img, num_classes=10, labels_file=tmp_path / "nope.tsv")


def test_synset_table_formats(tmp_path):
    caffe = tmp_path / "synset_words.txt"
    caffe.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    assert C.read_synset_table(caffe) == ("n01440764", "n01443537")
    gap = tmp_path / "gap.tsv"
    gap.write_text("0\tn01440764\tx\n2\tn01443537\ty\n")
    with pytest.raises(SedeployError, match="missing: 1"):
        C.read_synset_table(gap)
    dup = tmp_path / "dup.txt"
    dup.write_text("n01440764\nn01440764\n")
    with pytest.raises(SedeployError, match="more than once"):
        C.read_synset_table(dup)


def test_shipped_table_matches_research_tables(shared_data):
    labels_dir = shared_data / "labels"
    assert C.read_synset_table(labels_dir / "imagenet1k_index_synset_name.tsv") == C.IMAGENET_SYNSETS
    assert C.read_synset_table(labels_dir / "synset_words.txt") == C.IMAGENET_SYNSETS


def test_real_imagenette_and_val_labels(shared_data):
    from sedeploy.preprocess import find_images

    val = shared_data / "imagenette" / "val"
    found = find_images(val)
    got = L.resolve_labels(found.paths, val, num_classes=1000)
    assert sorted(set(got.indices.tolist())) == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    assert sorted(set(L.resolve_labels(found.paths, val, num_classes=10).indices.tolist())) == list(range(10))
    images = shared_data / "imagenet-val-1300" / "images"
    found = find_images(images)
    got = L.resolve_labels(found.paths[:50], images, num_classes=1000,
                           labels_file=shared_data / "imagenet-val-1300" / "labels.tsv")
    assert got.indices.size == 50 and got.indices.max() < 1000
    with pytest.raises(SedeployError, match="outside"):
        L.resolve_labels(found.paths[:50], images, num_classes=10,
                         labels_file=shared_data / "imagenet-val-1300" / "labels.tsv")


# ------------------------------------------------------------------------------------------------ probe
def test_int8_probe_graph_computes_the_product():
    import onnxruntime as ort

    from sedeploy.bench.probe import int8_matmul_model

    # 7-bit weights: the product must be exact, also on AVX2 CPUs without VNNI (int16 pair sums)
    model = int8_matmul_model(128, seed=5)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(2).integers(0, 256, (128, 128), dtype=np.uint8)
    from onnx import numpy_helper

    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
    expected = (a.astype(np.int32) - 128) @ w.astype(np.int32)
    np.testing.assert_array_equal(sess.run(["y"], {"a": a})[0], expected)


def test_probes_report_consistent_figures():
    for probe in (probe_fp32_gemm, probe_int8_gemm):
        r = probe(64, threads=1, seconds=0.02, warmup=1, min_calls=3)
        assert r["ops_per_call"] == 2 * 64 ** 3 and r["calls"] >= 3 and r["shape"] == [64, 64, 64]
        assert r["per_s"] == pytest.approx(r["ops_per_call"] / (r["best_ms"] / 1e3) / 1e9)
        assert r["per_s"] >= r["median_per_s"] > 0
    with pytest.raises(SedeployError, match="too small"):
        probe_fp32_gemm(4)
    assert ceiling_kind("int8") == "int8" and ceiling_kind("fp16") == "fp32" and ceiling_kind("fp32", "cuda") is None


class ColdRunner(FakeRunner):
    """Slow (10 ms) on a call that follows another engine's call, fast (1 ms) when it follows its own: the cache
    and thread-pool effect that makes interleaved batch-1 timings pessimistic."""

    def infer(self, x):
        cold = not self.log or self.log[-1] != self.name
        self.costs = itertools.cycle([0.010 if cold else 0.001])
        return super().infer(x)


@pytest.mark.parametrize("settle, expected", [(0, 0.010), (1, 0.001), (2, 0.001)])
def test_settle_times_a_warm_call_and_keeps_pairing(clock, settle, expected):
    log = []
    runners = [ColdRunner(n, clock, [0.0], log) for n in "abc"]
    res = time_runners(runners, X, batch_sizes=[1], warmup=1, repeats=4, min_repeats=1, clock=clock, settle=settle)
    assert all(res.samples[n][1] == pytest.approx([expected] * 4) for n in "abc")
    assert res.order[1] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]  # timed calls only
    assert len(log) == 3 + 12 * (settle + 1) and res.config["settle_calls"] == settle


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_settle_must_be_a_count(clock, bad):
    with pytest.raises(SedeployError, match="settle"):
        time_runners([FakeRunner("a", clock, [0.001], [])], X, settle=bad, clock=clock)


@pytest.mark.parametrize("kw, message", [
    ({"repeats": 0, "min_repeats": 0}, r"Timed rounds \(--repeats\) = 0"),
    ({"warmup": -1}, r"Warm-up rounds \(--warmup\) = -1"),
    ({"max_seconds": 0.0}, r"Time budget per batch size \(--max-seconds\) = 0.0"),
])
def test_timing_options_are_named_as_the_user_typed_them(kw, message):
    from sedeploy.backends.timing import check_timing_config

    args = {"batch_sizes": [1], "warmup": 3, "repeats": 20, "min_repeats": 3, "max_seconds": None, **kw}
    with pytest.raises(SedeployError, match=message) as err:
        check_timing_config(**args)
    assert err.value.fix and "--" in err.value.fix


def test_drift_gathered_in_chunks_equals_one_pass():
    """Bench scores a folder chunk by chunk (bounded memory): the figures must not depend on the chunking."""
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(103, 12)).astype(np.float32)
    eng = (ref + rng.normal(scale=0.4, size=ref.shape)).astype(np.float32)
    eng[7, 3] = np.inf
    labels = rng.integers(0, 12, 103)
    whole = A.engine_accuracy(ref, eng, labels)
    for chunk in (1, 5, 32, 103):
        d = A.Drift()
        for i in range(0, 103, chunk):
            d.add(ref[i:i + chunk], eng[i:i + chunk])
        assert d.result(labels) == whole, chunk
    assert whole["nonfinite_images"] == 1 and whole["disagreements"] >= 1
    # the top-k and tie rules are those of topk_correct / argmax
    ok = M.topk_correct(eng, labels, 5) & np.isfinite(eng).all(axis=1)
    assert whole["top5_pct"] == pytest.approx(100.0 * ok.mean())
    with pytest.raises(SedeployError, match="No images"):
        A.Drift().result()


def test_all_nan_model_scores_nothing_as_agreement():
    """A model whose outputs are all NaN (its own reference too) used to show 100 % agreement and KL 0."""
    nan = np.full((6, 4), np.nan, np.float32)
    res = A.compare_engines("fp32", {"fp32": nan, "int8": nan.copy()}, np.array([0, 1, 2, 3, 0, 1]))
    for a in res.values():
        assert a["top1_agreement_pct"] == 0.0 and a["top1_pct"] == 0.0 and a["nonfinite_images"] == 6
        assert a["mean_kl"] is None and a["max_abs_logit_diff"] is None
    lines = A.nonfinite_violations(res)
    assert [v.split(":")[0] for v in lines] == ["fp32", "int8"] and "on 6 of 6 images" in lines[0]
