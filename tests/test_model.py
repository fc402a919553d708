"""The network is exactly mmcls's: parameter counts, FLOPs, key layout, SE placement, non-degenerate init."""
import numpy as np
import pytest
import torch

from sedeploy import model as M
from sedeploy.errors import SedeployError
from sedeploy.flops import count_complexity

# Published figures (the mmcls model zoo); not computed by our code.
PARAMS = {50: 28_088_024, 101: 49_326_872, 152: 66_821_848}
SEED_FLOPS = {50: 4_127_927_392, 101: 7_861_162_208}


@pytest.mark.parametrize("depth", [50, 101, 152])
def test_param_counts_match_mmcls(depth):
    assert M.count_params(M.build_model(depth, seed=None)) == PARAMS[depth]


@pytest.mark.parametrize("depth", [50, 101])
def test_seed_flops_exact(depth):
    cx = count_complexity(M.build_model(depth, seed=None), 224)
    assert cx.seed_macs == SEED_FLOPS[depth]
    # Total adds what the seed leaves out: head (2048·1000 + 1000) and per-block scale/add/sigmoid.
    assert cx.head_macs == 2048 * 1000 + 1000
    assert cx.total_macs > cx.seed_macs + cx.head_macs


def test_basic_block_se_variants_match_timm_figures():
    # timm: seresnet18 11.78 M params / 1.82 GFLOPs, seresnet34 21.96 M / 3.68 G
    for depth, params_m, gflops in ((18, 11.78, 1.82), (34, 21.96, 3.68)):
        net = M.build_model(depth, seed=None)
        cx = count_complexity(net)
        assert round(cx.params / 1e6, 2) == params_m
        assert round(cx.seed_macs / 1e9, 2) == gflops


def test_plain_resnet_has_no_se_and_fewer_params():
    plain, se = M.build_model(50, se=False, seed=None), M.build_model(50, seed=None)
    assert M.count_params(plain) == 25_557_032  # torchvision resnet50
    assert not any(isinstance(m, M.SELayer) for m in plain.modules())
    assert sum(isinstance(m, M.SELayer) for m in se.modules()) == 16 == M.se_block_count(se.spec)


def test_state_dict_uses_mmcls_keys():
    keys = set(M.build_model(50, seed=None).state_dict())
    for k in ("backbone.conv1.weight", "backbone.bn1.running_var", "backbone.layer1.0.downsample.0.weight",
              "backbone.layer4.2.se_layer.conv1.conv.weight", "backbone.layer4.2.se_layer.conv2.conv.bias",
              "head.fc.weight"):
        assert k in keys
    # SE 1×1 convs carry biases; the squeeze width is C/16 (make_divisible has no effect for C ≥ 256)
    sd = M.build_model(50, seed=None).state_dict()
    assert sd["backbone.layer1.0.se_layer.conv1.conv.weight"].shape == (16, 256, 1, 1)
    assert sd["backbone.layer4.0.se_layer.conv2.conv.weight"].shape == (2048, 128, 1, 1)


def test_se_sits_after_bn3_before_the_residual_add():
    block = M.build_model(50, seed=None).backbone.layer1[0]
    seen = []
    block.bn3.register_forward_hook(lambda m, i, o: seen.append("bn3"))
    block.se_layer.register_forward_hook(lambda m, i, o: seen.append("se"))
    block.downsample.register_forward_hook(lambda m, i, o: seen.append("downsample"))
    block(torch.randn(1, 64, 8, 8))
    assert seen == ["bn3", "se", "downsample"]


def test_pytorch_style_strides_on_3x3_caffe_on_1x1():
    pt = M.build_model(50, seed=None).backbone.layer2[0]
    cf = M.build_model(50, style="caffe", seed=None).backbone.layer2[0]
    assert (pt.conv1.stride, pt.conv2.stride) == ((1, 1), (2, 2))
    assert (cf.conv1.stride, cf.conv2.stride) == ((2, 2), (1, 1))


@pytest.mark.slow
def test_random_init_is_not_degenerate(calib_dir):
    from sedeploy.preprocess import load_folder

    net = M.build_model(50)
    for m in net.modules():  # no zero-gamma branches
        if isinstance(m, torch.nn.BatchNorm2d):
            assert float(m.weight.detach().abs().min()) > 0.1
    x, _ = load_folder(calib_dir)
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
    assert len(set(logits.argmax(1).tolist())) >= 5  # different photos → different classes
    assert 1.0 < logits.std() < 50.0  # a trained network's scale, not exploding


def test_seed_changes_weights():
    a = M.build_model(18, base_channels=8, seed=1).state_dict()["head.fc.weight"]
    b = M.build_model(18, base_channels=8, seed=2).state_dict()["head.fc.weight"]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("bad", [0, 7, 200])
def test_unsupported_depth_is_a_clear_error(bad):
    with pytest.raises(SedeployError, match=r"(?s)Unsupported depth.*18, 34, 50, 101, 152"):
        M.build_model(bad)


def test_make_divisible_matches_mmcls():
    assert [M.make_divisible(c // 16, 8) for c in (64, 128, 256, 2048)] == [8, 8, 16, 128]
    assert np.isclose(M.make_divisible(10, 8), 16)  # 8 would be < 0.9·10
