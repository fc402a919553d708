"""Option values that click's types do not check: R,G,B triples, batch lists, the TensorRT profile."""
from __future__ import annotations

import math

from sedeploy.errors import SedeployError

#: largest batch size `bench --batch` accepts (a batch of 4096 SE-ResNet-50 images is ~2.4 GiB of input alone)
MAX_BATCH = 4096
#: `build-engine --trt-profile` when not given: TensorRT's smallest, tuned and largest batch
DEFAULT_TRT_PROFILE = (1, 8, 32)


def parse_triple(text: str | None, option: str, *, positive: bool = False,
                 channel_order: str | None = None) -> tuple[float, float, float] | None:
    """``--mean``/``--std`` text → three finite numbers, one per input channel in the model's ``channel_order``
    (R, G, B; B, G, R for ``"bgr"``); ``positive``: each must be > 0 (a std)."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values) or (positive and min(values) <= 0):
        raise SedeployError(f"{option} '{text}' is not valid.",
                            expected=f"three comma-separated finite numbers ({','.join((channel_order or 'rgb').upper())})"
                                     + (", each > 0" if positive else ""),
                            fix=f"e.g. {option} " + ("58.395,57.12,57.375" if positive else "123.675,116.28,103.53")
                                + " (pixel scale 0–255)")
    return values  # type: ignore[return-value]


def parse_batch_list(text: str) -> list[int]:
    """``--batch 1,8,32`` → [1, 8, 32] (positive integers, duplicates dropped, order kept; an empty entry, as in
    ``1,,8``, is refused: it is more likely a lost digit than a stray comma)."""
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = []
    sizes = list(dict.fromkeys(sizes))
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_BATCH:
        raise SedeployError(f"--batch '{text}' is not valid.",
                            expected=f"comma-separated positive integers up to {MAX_BATCH}",
                            fix="e.g. --batch 1,8,32")
    return sizes


def parse_trt_profile(text: str | None, *, min_batch: int | None = None, opt_batch: int | None = None,
                      max_batch: int | None = None) -> tuple[int, int, int]:
    """``--trt-profile MIN,OPT,MAX`` → (min, opt, max): three positive integers with MIN ≤ OPT ≤ MAX.

    ``min_batch``/``opt_batch``/``max_batch`` are the deprecated --min-batch/--opt-batch/--max-batch: each replaces
    its part of the profile (of the default one when no --trt-profile is given)."""
    values: list[int] = list(DEFAULT_TRT_PROFILE)
    if text is not None:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            values = []
        if len(values) != 3 or min(values) < 1:
            raise SedeployError(f"--trt-profile '{text}' is not valid.",
                                expected="three comma-separated positive integers MIN,OPT,MAX",
                                fix="e.g. --trt-profile 1,8,32 (TensorRT accepts batches MIN..MAX, tuned for OPT)")
    for i, legacy in enumerate((min_batch, opt_batch, max_batch)):
        if legacy is not None:
            values[i] = legacy
    if min(values) < 1 or not values[0] <= values[1] <= values[2]:
        given = ",".join(map(str, values))
        raise SedeployError(f"TensorRT profile {given} is not valid.",
                            expected="positive integers with MIN ≤ OPT ≤ MAX (TensorRT tunes kernels for OPT and "
                                     "accepts MIN..MAX)",
                            fix="e.g. --trt-profile " + ",".join(map(str, sorted(max(v, 1) for v in values))))
    return values[0], values[1], values[2]
