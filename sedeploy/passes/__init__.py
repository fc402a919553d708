"""Graph passes on exported ONNX models.

:func:`fuse_se_blocks` rewrites every Squeeze-and-Excitation block into one measured form (see
:mod:`sedeploy.passes.se_fusion`); :func:`find_se_blocks` only reports what it would match and why it refuses
the rest (matching rules: :mod:`sedeploy.passes.se_patterns`); :func:`se_block_nodes` is the one SE
recogniser the precision policies use; :func:`reduce_mean_to_global_pool` spells every H,W mean as
GlobalAveragePool (the INT8 CPU form needs it for the classifier's pool too); :func:`make_batch_dynamic` renames
a fixed batch to ``N`` when that is provably safe; :func:`squeeze_first` pools each bottleneck SE squeeze before
the expanding 1×1 conv (exact; applied to FP32 CPU engines only, see :mod:`sedeploy.passes.squeeze_first`).
"""
from sedeploy.passes.dynamic_batch import batch_dependence, make_batch_dynamic
from sedeploy.passes.global_pool import reduce_mean_to_global_pool
from sedeploy.passes.se_fusion import (DEFAULT_FORM, FORMS, FusionReport, SEBlockNodes, SECandidate, find_se_blocks,
                                       fuse_se_blocks, se_block_nodes)
from sedeploy.passes.squeeze_first import SqueezeFirstReport, find_squeeze_first, squeeze_first

__all__ = ["batch_dependence", "make_batch_dynamic", "DEFAULT_FORM", "FORMS", "FusionReport", "SEBlockNodes", "SECandidate", "find_se_blocks", "fuse_se_blocks",
           "reduce_mean_to_global_pool", "se_block_nodes", "SqueezeFirstReport", "find_squeeze_first",
           "squeeze_first"]
