"""The INT8 budget search's pieces (sedeploy.int8_budget): the statistical bounds (Wilson agreement bound, paired
top-1 drop bound), the up-front image-count refusal, the budget judged on the bounds under --budget-confidence,
the fallback orders and the per-layer multiply-add count they use."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sedeploy.errors import SedeployError
from sedeploy.int8_budget import FALLBACK_ORDERS, Budget, rank_key
from sedeploy.metrics import agreement_lower_bound, drop_upper_bound, images_needed, images_needed_for_drop, metrics


@given(n=st.integers(1, 20000), frac=st.floats(0, 1), conf=st.floats(0.5, 0.999))
def test_agreement_bound_is_below_the_point_and_in_range(n, frac, conf):
    k = int(round(frac * n))
    lb = agreement_lower_bound(k, n, conf)
    assert 0.0 <= lb <= 100.0 * k / n + 1e-9


def test_agreement_bound_tightens_with_images_and_loosens_with_confidence():
    assert agreement_lower_bound(990, 1000, 0.95) < agreement_lower_bound(9900, 10000, 0.95) < 99.0
    assert agreement_lower_bound(990, 1000, 0.99) < agreement_lower_bound(990, 1000, 0.95)
    # Wilson's closed form at p̂ = 0.99, n = 2000, z = 1.645 (computed by hand): 98.56 %
    assert agreement_lower_bound(1980, 2000, 0.95) == pytest.approx(98.562, abs=0.005)


@pytest.mark.parametrize("p, n", [(0.99, 300), (0.985, 2000), (0.95, 120)])
def test_agreement_bound_covers_the_true_rate(p, n):
    """Over 4,000 simulated held-out sets, the 95 % lower bound lies at or below the true rate ≈ 95 % of the time
    (Wilson's interval is close to nominal; a bound computed as the point figure would cover ≈ 50 %)."""
    rng = np.random.default_rng(0)
    k = rng.binomial(n, p, size=4000)
    covered = np.mean([agreement_lower_bound(int(x), n, 0.95) <= 100 * p for x in k])
    assert 0.93 <= covered <= 0.97  # a two-sided z (0.975) or the point figure (≈ 0.5) would fall outside


@pytest.mark.parametrize("p12, p21, n, most", [(0.015, 0.010, 1000, 0.97), (0.005, 0.001, 500, 0.98),
                                                (0.002, 0.0, 1000, 1.0)])  # few flips: conservative, never short
def test_drop_bound_covers_the_true_drop(p12, p21, n, most):
    """Paired drop: per image +1 (right only in FP32) with p12, −1 (right only in INT8) with p21; the 95 % upper
    bound lies at or above the true drop 100·(p12 − p21) in ≈ 95 % of 4,000 simulated sets — also when few
    predictions flip (a plain normal approximation covers only ≈ 0.87 at p12 = 0.002, p21 = 0)."""
    rng = np.random.default_rng(1)
    cells = rng.multinomial(n, [p12, p21, 1 - p12 - p21], size=4000)
    covered = np.mean([drop_upper_bound(int(b), int(c), n, 0.95) >= 100 * (p12 - p21) - 1e-12 for b, c, _ in cells])
    assert 0.93 <= covered <= most


def test_drop_bound_value():
    # Bonett–Price: p12 = 5/502, p21 = 1/502, d = 4/502; d + 1.645·√((6/502 − d²)/502), in points
    assert drop_upper_bound(4, 0, 500, 0.95) == pytest.approx(1.5973, abs=1e-3)


def test_drop_bound_has_spread_without_disagreements():
    assert drop_upper_bound(0, 0, 100, 0.95) > 1.5  # 100 images with no flips do not prove a zero drop
    assert drop_upper_bound(0, 0, 100000, 0.95) < 0.01


def test_bounds_refuse_impossible_counts():
    for call in (lambda: agreement_lower_bound(0, 0, 0.95), lambda: agreement_lower_bound(11, 10, 0.95),
                 lambda: drop_upper_bound(6, 5, 10, 0.95), lambda: drop_upper_bound(-1, 0, 10, 0.95)):
        with pytest.raises(SedeployError, match="not valid"):
            call()


def test_images_needed_is_the_smallest_count():
    need = images_needed(99.0, 0.95)
    assert need == 268
    assert agreement_lower_bound(need, need, 0.95) >= 99.0 > agreement_lower_bound(need - 1, need - 1, 0.95)
    assert images_needed(100.0, 0.95) is None
    need = images_needed_for_drop(0.5, 0.95)
    assert drop_upper_bound(0, 0, need, 0.95) <= 0.5 < drop_upper_bound(0, 0, need - 1, 0.95)
    assert images_needed_for_drop(0.0, 0.95) is None


def test_budget_refuses_too_few_images_and_bad_confidence():
    with pytest.raises(SedeployError, match=r"(?s)200 held-out images cannot show .* 99.0 %.*≥ 268") as err:
        Budget(min_agreement=99.0, confidence=0.95).check_images(200)
    assert err.value.exit_code == 2
    Budget(min_agreement=99.0, confidence=0.95).check_images(268)
    Budget(min_agreement=99.0).check_images(20)  # point figures: any count the search accepts
    with pytest.raises(SedeployError, match="100 % agreement"):
        Budget(min_agreement=100.0, confidence=0.9)
    with pytest.raises(SedeployError, match="zero drop"):
        Budget(max_top1_drop=0.0, confidence=0.9)
    need = images_needed_for_drop(0.5, 0.95)
    with pytest.raises(SedeployError, match=f"(?s)top-1 drop ≤ 0.5 pt.*≥ {need} held-out"):
        Budget(max_top1_drop=0.5, confidence=0.95).check_images(need - 1)
    Budget(max_top1_drop=0.5, confidence=0.95).check_images(need)
    for bad in (0.3, 1.0, 1.5, float("nan")):
        with pytest.raises(SedeployError, match="--budget-confidence"):
            Budget(min_agreement=99.0, confidence=bad)


def _outputs(n, flips, classes=10, seed=0):
    """FP32 logits and a copy with ``flips`` rows' argmax moved to another class; labels = FP32's argmax except
    for the first 20 % (so top-1 is not trivially 100 %)."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(n, classes))
    got = ref.copy()
    a = ref.argmax(1)
    for i in range(flips):
        got[i, (a[i] + 1) % classes] = ref[i].max() + 1.0
    labels = a.copy()
    labels[n - n // 5:] = (a[n - n // 5:] + 2) % classes
    return ref, got, labels


def test_point_passes_where_the_bound_does_not():
    ref, got, labels = _outputs(500, flips=4)  # 99.2 % agreement on 500 images: 95 % lower bound ≈ 98.2 %
    m = metrics(ref, got, labels)
    assert m["n"] == 500 and m["agree"] == 496 and m["agreement_pct"] == pytest.approx(99.2)
    assert m["agreement_lcb_pct"] < 99.0 and m["top1_drop_pts"] == pytest.approx(0.8)
    assert m["fp32_only"] == 4 and m["int8_only"] == 0 and m["top1_drop_ucb_pts"] > m["top1_drop_pts"]
    assert Budget(min_agreement=99.0).violations(m) == []
    v = Budget(min_agreement=99.0, confidence=0.95).violations(m)
    assert len(v) == 1 and "0.95 bound; point 99.20" in v[0]
    v = Budget(max_top1_drop=1.0, confidence=0.95).violations(m)
    assert len(v) == 1 and "top-1 drop" in v[0]
    ref, got, labels = _outputs(5000, flips=20)  # 99.6 % on 5,000 images: the bound clears 99 %
    assert Budget(min_agreement=99.0, confidence=0.95).violations(metrics(ref, got, labels)) == []


def test_layer_macs_counts_each_weighted_layer(tmp_path):
    """A 32 px net, Conv 3→8 3×3 stride 2 (16×16 out), Conv 8→16 1×1, Linear 16→10: counted by hand."""
    import torch
    from torch import nn

    from sedeploy import quantize

    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "n"}})
    macs = quantize.layer_macs(path)
    conv1, conv2, fc = quantize.weighted_layers(path)
    assert macs == {conv1: 16 * 16 * 8 * 3 * 9, conv2: 16 * 16 * 16 * 8, fc: 16 * 10}


def test_layer_macs_grouped_conv(tmp_path):
    """Depthwise 3×3 on 8 channels at 16×16: 16·16·8·9 (the weight holds Cin/groups = 1 per output channel)."""
    import torch
    from torch import nn

    from sedeploy import quantize

    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 4)).eval()
    path = tmp_path / "dw.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    pw, dw, fc = quantize.weighted_layers(path)
    assert quantize.layer_macs(path) == {pw: 16 * 16 * 8 * 3, dw: 16 * 16 * 8 * 9, fc: 8 * 4}


def test_fallback_orders():
    rows = [{"layer": "big", "kl_gain": 0.010, "macs": 1000},
            {"layer": "small", "kl_gain": 0.004, "macs": 100},
            {"layer": "noise", "kl_gain": -0.001, "macs": 1},
            {"layer": "zero", "kl_gain": 0.0, "macs": 1}]
    by = {o: [r["layer"] for r in sorted(rows, key=lambda r: rank_key(r, o))] for o in FALLBACK_ORDERS}
    assert by["sensitivity"] == ["big", "small", "zero", "noise"]
    assert by["gain-per-cost"] == ["small", "big", "zero", "noise"]  # no gain: last, however cheap
