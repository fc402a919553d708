"""Count multiply-adds the way the mmcls model zoo does, and the total a deployment engine actually executes.

Seed convention (mmcv ``get_model_complexity_info``, what the SE-ResNet table quotes): backbone + neck only;
conv = output elements × (k·k·Cin/groups) + output elements for a bias; BatchNorm = 2 per input element;
ReLU = 1 per element, counted on *every call*; every pooling layer (incl. the SE squeeze and the neck) = 1 per
input element. Not counted: Sigmoid, the SE scale multiply, residual adds, the classifier.

Total (``total_macs``): the seed count plus the classifier (in·out + out), the SE scale (1 per element), every
Sigmoid (1 per element) and every residual add (1 per element) — the operations an engine really runs.
GFLOPs in the benchmarks are 2 × total multiply-adds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from sedeploy import model as M


@dataclass(frozen=True)
class Complexity:
    params: int
    seed_macs: int  # mmcv convention, backbone + neck
    head_macs: int
    se_scale_macs: int
    sigmoid_macs: int
    residual_add_macs: int
    input_size: int

    @property
    def total_macs(self) -> int:
        return self.seed_macs + self.head_macs + self.se_scale_macs + self.sigmoid_macs + self.residual_add_macs

    @property
    def total_gflops(self) -> float:
        """Floating-point operations (2 per multiply-add) per image, in units of 1e9."""
        return 2 * self.total_macs / 1e9

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total_macs"] = self.total_macs
        d["seed_gflops"] = self.seed_macs / 1e9  # the model zoo's "Flops (G)" column
        d["total_gflops"] = self.total_gflops
        return d


def _numel(t: torch.Tensor) -> int:
    return int(t[0].numel())  # per image


@torch.no_grad()
def count_complexity(model: M.ImageClassifier, input_size: int = 224) -> Complexity:
    """Run one 1×3×S×S forward pass with counting hooks; returns per-image counts."""
    counts = {"seed": 0, "head": 0, "scale": 0, "sigmoid": 0, "add": 0}
    in_backbone: set[int] = set()
    for name, mod in model.named_modules():
        if name.startswith(("backbone", "neck")):
            in_backbone.add(id(mod))

    def hook(mod, inputs, output):
        x = inputs[0]
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            n = _numel(output) * k + (_numel(output) if mod.bias is not None else 0)
        elif isinstance(mod, nn.BatchNorm2d):
            n = _numel(x) * (2 if mod.affine else 1)
        elif isinstance(mod, (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            n = _numel(x)
        elif isinstance(mod, nn.Sigmoid):
            counts["sigmoid"] += _numel(x)
            return
        elif isinstance(mod, nn.Linear):
            counts["head"] += mod.in_features * mod.out_features + (mod.out_features if mod.bias is not None else 0)
            return
        else:
            return
        if id(mod) in in_backbone:
            counts["seed"] += n

    def block_hook(mod, inputs, output):
        counts["add"] += _numel(output)  # the residual add, same shape as the block output
        if mod.se_layer is not None:
            counts["scale"] += _numel(output)

    handles = []
    for mod in model.modules():
        if isinstance(mod, (M.Bottleneck, M.BasicBlock)):
            handles.append(mod.register_forward_hook(block_hook))
        elif len(list(mod.children())) == 0:
            handles.append(mod.register_forward_hook(hook))
    try:
        was_training = model.training
        model.eval()
        model(torch.zeros(1, 3, input_size, input_size))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return Complexity(M.count_params(model), counts["seed"], counts["head"], counts["scale"], counts["sigmoid"],
                      counts["add"], input_size)
