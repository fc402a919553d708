"""The model card `sedeploy info` prints: what the network is and what it costs."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from sedeploy import model as M
from sedeploy.export import check_export_options
from sedeploy.flops import count_complexity
from sedeploy.preprocess import Preprocess


@dataclass
class ModelCard:
    model: str
    depth: int
    se: bool
    se_blocks: int
    num_classes: int
    params: int
    flops: int  # model-zoo convention (mmcv), multiply-adds
    total_macs: int
    total_gflops: float
    input: list
    preprocessing: dict

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        pp = self.preprocessing
        return "\n".join([
            f"{self.model}",
            f"  params        {self.params:,}",
            f"  FLOPs         {self.flops:,} multiply-adds ({self.flops / 1e9:.2f} G, model-zoo convention:"
            " backbone+neck, no sigmoid/scale/add/head)",
            f"  total         {self.total_macs:,} multiply-adds ({self.total_gflops:.2f} GFLOP per image incl."
            " head, SE scale, sigmoid, residual adds)",
            f"  SE blocks     {self.se_blocks}",
            f"  classes       {self.num_classes}",
            f"  input         {'×'.join(map(str, self.input))} float32, NCHW, RGB",
            f"  preprocessing resize short side {pp['resize_short']} (bilinear), centre crop {pp['size']},"
            f" mean {tuple(pp['mean'])}, std {tuple(pp['std'])} on 0–255 pixels",
        ])


def model_card(depth: int = 50, *, se: bool = True, input_size: int = 224, num_classes: int = 1000) -> ModelCard:
    check_export_options(depth=depth, input_size=input_size, num_classes=num_classes)
    net = M.build_model(depth, se=se, num_classes=num_classes, seed=None)
    cx = count_complexity(net, input_size)
    return ModelCard(model=net.spec.name, depth=depth, se=se, se_blocks=M.se_block_count(net.spec),
                     num_classes=num_classes, params=cx.params, flops=cx.seed_macs, total_macs=cx.total_macs,
                     total_gflops=round(cx.total_gflops, 4), input=["N", 3, input_size, input_size],
                     preprocessing=Preprocess.for_size(input_size).as_dict())
