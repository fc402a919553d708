"""Graph passes on exported ONNX models.

:func:`fuse_se_blocks` rewrites every Squeeze-and-Excitation block into one measured form (see
:mod:`sedeploy.passes.se_fusion`); :func:`find_se_blocks` only reports what it would match and why it refuses
the rest (matching rules: :mod:`sedeploy.passes.se_patterns`).
"""
from sedeploy.passes.se_fusion import (DEFAULT_FORM, FORMS, FusionReport, SECandidate, find_se_blocks,
                                       fuse_se_blocks)

__all__ = ["DEFAULT_FORM", "FORMS", "FusionReport", "SECandidate", "find_se_blocks", "fuse_se_blocks"]
