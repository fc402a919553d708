"""SE-ResNet exactly as mmclassification / mmpretrain defines it, and its plain-ResNet siblings.

Squeeze-and-Excitation networks: J. Hu, L. Shen, G. Sun, "Squeeze-and-Excitation Networks", CVPR 2018
(arXiv:1709.01507). The SE layer pools each channel globally, passes the vector through a bottleneck of two 1×1
convolutions (ReLU between, Sigmoid after) and rescales the block's output channels with the result.

The module tree mirrors the mmcls checkpoint layout (``backbone.layer1.0.se_layer.conv1.conv.weight`` …,
``head.fc.weight``), so an mmcls state dict loads with no renaming. SE is added through one block argument
(``se_ratio``), as in timm's resnet.py: the same constructor builds plain ResNet-18…152 and SE-ResNet-18…152.

Two switches model the *other* SE-ResNet that circulates (Cadene's ``se_resnet50``, timm ``legacy_seresnet50``):
``style="caffe"`` puts the stride on the first 1×1 conv instead of the 3×3, and ``stem_pool_ceil=True`` uses
MaxPool(3, 2, padding 0, ceil_mode) in the stem. Both default to the mmcls network.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sedeploy.errors import SedeployError

#: depth → (block type, blocks per stage)
ARCH = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
SUPPORTED_DEPTHS = tuple(ARCH)



def make_divisible(value: float, divisor: int = 8, min_ratio: float = 0.9) -> int:
    """mmcls ``make_divisible``: round to a multiple of ``divisor``, never dropping below ``min_ratio``·value."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < min_ratio * value:
        new_value += divisor
    return new_value


class ConvAct(nn.Module):
    """1×1 conv with bias followed by an activation (mmcv ``ConvModule`` without norm: keys ``conv.*``)."""

    def __init__(self, cin: int, cout: int, act: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=True)
        self.activate = act

    def forward(self, x):
        return self.activate(self.conv(x))


class SELayer(nn.Module):
    """Squeeze (global average pool) → 1×1 conv → ReLU → 1×1 conv → Sigmoid → scale the input."""

    def __init__(self, channels: int, ratio: int = 16):
        super().__init__()
        squeeze = make_divisible(channels // ratio, 8)
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.conv1 = ConvAct(channels, squeeze, nn.ReLU(inplace=True))
        self.conv2 = ConvAct(squeeze, channels, nn.Sigmoid())

    def forward(self, x):
        return x * self.conv2(self.conv1(self.global_avgpool(x)))


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, se_ratio=None, style="pytorch"):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se_layer = SELayer(cout, se_ratio) if se_ratio else None
        self.downsample = _downsample(cin, cout, stride) if (stride != 1 or cin != cout) else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se_layer is not None:
            out = self.se_layer(out)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, se_ratio=None, style="pytorch"):
        super().__init__()
        cout = planes * self.expansion
        s1, s3 = (1, stride) if style == "pytorch" else (stride, 1)
        self.conv1 = nn.Conv2d(cin, planes, 1, stride=s1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=s3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.se_layer = SELayer(cout, se_ratio) if se_ratio else None
        self.downsample = _downsample(cin, cout, stride) if (stride != 1 or cin != cout) else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se_layer is not None:
            out = self.se_layer(out)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """The backbone: stem (7×7/2 conv, BN, ReLU, 3×3/2 max-pool) and four stages."""

    def __init__(self, depth: int, se_ratio: int | None = 16, base_channels: int = 64, style: str = "pytorch",
                 stem_pool_ceil: bool = False):
        super().__init__()
        kind, stages = ARCH[depth]
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        self.conv1 = nn.Conv2d(3, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        if stem_pool_ceil:
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=0, ceil_mode=True)
        else:
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = base_channels
        for i, n in enumerate(stages):
            planes = base_channels * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, planes, stride, se_ratio, style))
                cin = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = cin

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class GlobalAveragePooling(nn.Module):
    """mmcls ``GlobalAveragePooling`` neck: AdaptiveAvgPool2d(1) then flatten."""

    def __init__(self):
        super().__init__()
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return torch.flatten(self.gap(x), 1)


class LinearHead(nn.Module):
    """mmcls ``LinearClsHead``: one Linear layer (``head.fc``); softmax is left to the caller."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.fc(x)


@dataclass(frozen=True)
class ModelSpec:
    """Everything that identifies a network in this family (recorded in ONNX metadata and engine sidecars)."""

    depth: int = 50
    se: bool = True
    num_classes: int = 1000
    base_channels: int = 64
    style: str = "pytorch"
    stem_pool_ceil: bool = False

    @property
    def name(self) -> str:
        prefix = "se-resnet" if self.se else "resnet"
        suffix = "" if (self.style, self.stem_pool_ceil) == ("pytorch", False) else "-caffe"
        width = "" if self.base_channels == 64 else f"-w{self.base_channels}"
        return f"{prefix}{self.depth}{width}{suffix}"


class ImageClassifier(nn.Module):
    """backbone → neck → head, returning logits (N, num_classes) for NCHW float input."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.backbone = ResNet(spec.depth, 16 if spec.se else None, spec.base_channels, spec.style,
                               spec.stem_pool_ceil)
        self.neck = GlobalAveragePooling()
        self.head = LinearHead(self.backbone.out_channels, spec.num_classes)

    def forward(self, x):
        return self.head(self.neck(self.backbone(x)))


def build_model(depth: int = 50, *, se: bool = True, num_classes: int = 1000, base_channels: int = 64,
                style: str = "pytorch", stem_pool_ceil: bool = False, seed: int | None = 0) -> ImageClassifier:
    """Build an (SE-)ResNet classifier in eval mode.

    With ``seed`` set the weights are random but *not degenerate* (see :func:`init_random_weights`); pass
    ``seed=None`` to keep PyTorch's default init (when a checkpoint will overwrite every tensor anyway).
    """
    if depth not in ARCH:
        raise SedeployError(f"Unsupported depth {depth!r}.",
                            expected=f"one of {', '.join(map(str, SUPPORTED_DEPTHS))}",
                            fix="pass --depth 50 (SE-ResNet-50) or --depth 101")
    if num_classes < 1:
        raise SedeployError(f"num_classes must be positive, got {num_classes}.", fix="pass --num-classes 1000")
    if style not in ("pytorch", "caffe"):
        raise SedeployError(f"Unknown block style {style!r}.", expected="'pytorch' or 'caffe'")
    spec = ModelSpec(depth, se, num_classes, base_channels, style, stem_pool_ceil)
    model = ImageClassifier(spec)
    if seed is not None:
        init_random_weights(model, seed)
    return model.eval()


@torch.no_grad()
def init_random_weights(model: ImageClassifier, seed: int = 0, input_size: int = 128) -> None:
    """Random weights that behave like a trained network's, so tests and benchmarks measure something.

    Kaiming-normal convs; BN affine parameters drawn around (1, 0), with the last BN of each residual branch
    drawn in [0.2, 0.5) — small, like a trained network's, but never zero (timm's zero-gamma init silences every
    residual branch, so a benchmark on it measures nothing); BN running statistics estimated from a forward pass
    on smooth random images; and the classifier scaled so logits have a standard deviation of about 3, so they
    differ from image to image at a trained network's magnitude (FP32 tolerances then mean what they say).
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
        elif isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (1.0 / m.in_features) ** 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    # Estimate BN statistics on images with a natural-image power spectrum (1/f noise).
    x = pink_noise(16, input_size, gen)
    for block in model.modules():
        if isinstance(block, (Bottleneck, BasicBlock)):
            last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
            last_bn.weight.copy_(0.2 + 0.3 * torch.rand(last_bn.weight.shape, generator=gen))
    model.train()
    model(x)
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    fc = model.head.fc
    feats = model.neck(model.backbone(x))
    mean = feats.mean(0, keepdim=True)
    scale = 3.0 / float(((feats - mean) @ fc.weight.T).std().clamp_min(1e-6))
    fc.weight.mul_(scale)
    # Cancel the component every image shares, or one class would win for all inputs.
    fc.bias.copy_(-(mean @ fc.weight.T).squeeze(0) + 0.1 * torch.randn(fc.bias.shape, generator=gen))


def pink_noise(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """N×3×S×S noise whose amplitude spectrum falls as 1/f, like photographs; unit variance, channels correlated."""
    fy = torch.fft.fftfreq(size).abs().view(-1, 1)
    fx = torch.fft.rfftfreq(size).view(1, -1)
    amp = 1.0 / torch.sqrt(fx**2 + fy**2).clamp_min(1.0 / size)
    spec = torch.complex(torch.randn((n, 1, size, size // 2 + 1), generator=gen),
                         torch.randn((n, 1, size, size // 2 + 1), generator=gen)) * amp
    base = torch.fft.irfft2(spec, s=(size, size))
    tint = torch.fft.irfft2(torch.complex(torch.randn((n, 3, size, size // 2 + 1), generator=gen),
                                          torch.randn((n, 3, size, size // 2 + 1), generator=gen)) * amp,
                            s=(size, size))
    x = base + 0.5 * tint
    return (x - x.mean()) / x.std()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def se_block_count(spec: ModelSpec) -> int:
    """Number of SE layers the network has (one per residual block), 0 for plain ResNet."""
    return sum(ARCH[spec.depth][1]) if spec.se else 0
