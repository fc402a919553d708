"""Time several runners against each other, interleaved, and summarise the samples.

Why interleaved: on a shared or thermally throttling machine the speed drifts over minutes. Timing engine A
for a minute and then engine B for a minute turns that drift into a fake difference between them. Here every
*round* calls each runner once, and the order inside a round is rotated (A B C, B C A, C A B, …), so a slow
spell hits all runners alike and no runner always runs right after the same neighbour (cache state, turbo).
Because samples of the same round were taken seconds apart, per-round ratios between two runners
(:func:`paired_speedup`) are more robust than a ratio of two medians. :func:`speedup_interval` says how far that
median could be from the truth: a lead whose interval includes 1.0 is not shown by the run.

What is timed: one ``runner.infer(x)`` call, host numpy array in → host numpy array out, measured with
:func:`time.perf_counter` (monotonic, highest resolution). For a GPU backend that includes the host↔device copies
and the synchronisation. A runner may describe its own coverage in a ``timer_coverage`` attribute; it is copied
into the result so that nobody compares a kernel-only GPU time with a host-to-host CPU time by accident.

Settling: with ``settle = k``, each timed call is preceded by k untimed calls of the *same* runner. Without it,
every timed call follows other engines' calls, so it finds its weights evicted from the caches and its thread
pool parked. That penalty is worst at batch 1, where SE-ResNet-50 measured about 2× slower (FP32 10–11 vs 15–19
img/s, INT8 16–18 vs 35 img/s). It describes no deployment, because a served engine runs back to back. Settled
calls still pair by round, so the drift cancellation above is kept.

Per batch size: warm-up rounds first (not recorded: first calls allocate, prepack weights, JIT), then timed rounds
until ``repeats`` rounds, or until ``max_seconds`` of timed rounds have passed once at least ``min_repeats`` are
done. The garbage collector is paused while timing (as :mod:`timeit` does) so a collection of unrelated objects
does not land inside one call.

Ctrl-C (KeyboardInterrupt) stops the run and returns what was measured, with ``complete = False``; the caller
writes those partial results marked incomplete instead of losing them.
"""
from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sedeploy.backends import Runner
from sedeploy.errors import SedeployError
from sedeploy.preprocess import layout_batch

log = logging.getLogger("sedeploy")

__all__ = ["Runner", "TimingResult", "time_runners", "latency_stats", "paired_speedup", "speedup_interval",
           "DEFAULT_TIMER_COVERAGE", "PERCENTILE_METHOD", "SPEEDUP_CONFIDENCE"]

DEFAULT_TIMER_COVERAGE = ("runner.infer() wall time: host input → host output "
                          "(includes H2D/D2H copies on GPU backends)")
#: numpy's default percentile definition (linear interpolation between closest ranks), stated in the results.
PERCENTILE_METHOD = "linear"
#: Confidence of the interval :func:`speedup_interval` reports with every speed-up.
SPEEDUP_CONFIDENCE = 0.95


@dataclass
class TimingResult:
    """Raw samples (seconds per ``infer`` call) per engine and batch size, in the order they were taken.

    ``samples[name][b][i]`` was taken in round ``i`` of batch size ``b``; a run interrupted mid-round leaves the
    runners that came later in that round one sample short. ``order[b]`` lists the engine names of every timed
    call in call order (what the interleaving actually did).
    """

    engines: list[str]
    batch_sizes: list[int]
    samples: dict[str, dict[int, list[float]]]
    order: dict[int, list[str]]
    timer: dict[str, str]
    config: dict[str, Any]
    complete: bool = True
    interrupted: str | None = None
    elapsed_s: dict[int, float] = field(default_factory=dict)

    def stats(self, name: str, batch: int) -> dict[str, Any] | None:
        """:func:`latency_stats` of one engine at one batch size; None if nothing was measured."""
        got = self.samples.get(name, {}).get(batch, [])
        return latency_stats(got, batch) if got else None

    def as_dict(self) -> dict[str, Any]:
        return {"engines": list(self.engines), "batch_sizes": list(self.batch_sizes), "complete": self.complete,
                "interrupted": self.interrupted, "timer": dict(self.timer), "config": dict(self.config),
                "elapsed_s": {str(b): s for b, s in self.elapsed_s.items()},
                "samples_s": {n: {str(b): list(v) for b, v in per.items()} for n, per in self.samples.items()},
                "stats": {n: {str(b): self.stats(n, b) for b in self.batch_sizes if self.samples[n].get(b)}
                          for n in self.engines}}


def latency_stats(samples_s: Sequence[float], batch: int) -> dict[str, Any]:
    """Summarise seconds-per-call samples: latency in ms, throughput in images/s, spread.

    Percentiles use numpy's default (linear) definition. ``throughput`` is ``batch / p50`` (robust to outliers,
    the headline figure); ``throughput_total`` is all images over all time (what a long job would see, outliers
    included). Spread: ``iqr_pct`` = (p75 − p25) / p50 in %, and ``p90_over_p10``.
    """
    if batch < 1:
        raise SedeployError(f"Batch size {batch} in timing statistics.", expected="a batch size ≥ 1")
    s = np.asarray(samples_s, dtype=np.float64)
    if s.size == 0:
        raise SedeployError("No timing samples to summarise.", expected="at least one timed call")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise SedeployError("Timing samples must be positive, finite durations in seconds.",
                            fix="check the clock function passed to time_runners")
    ms = s * 1e3
    p10, p25, p50, p75, p90, p99 = np.percentile(ms, [10, 25, 50, 75, 90, 99])
    return {
        "n": int(s.size),
        "latency_ms": {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean()),
                       "std": float(ms.std(ddof=1)) if s.size > 1 else 0.0, "min": float(ms.min()),
                       "max": float(ms.max()), "p10": float(p10), "p25": float(p25), "p75": float(p75)},
        "throughput": batch / (p50 / 1e3),
        "throughput_total": batch * s.size / float(s.sum()),
        "spread": {"iqr_pct": float((p75 - p25) / p50 * 100.0), "p90_over_p10": float(p90 / p10)},
    }


def paired_speedup(reference_s: Sequence[float], engine_s: Sequence[float]) -> float | None:
    """Median over rounds of reference time / engine time (> 1: the engine is faster). Uses the rounds both
    have; None if there are none. Pairing by round cancels drifts slower than one round."""
    n = min(len(reference_s), len(engine_s))
    if n == 0:
        return None
    ratios = np.asarray(reference_s[:n], np.float64) / np.asarray(engine_s[:n], np.float64)
    return float(np.median(ratios))


def speedup_interval(reference_s: Sequence[float], engine_s: Sequence[float],
                     confidence: float = SPEEDUP_CONFIDENCE) -> tuple[float, float] | None:
    """A distribution-free confidence interval for :func:`paired_speedup` (the median of per-round ratios).

    The interval runs between two order statistics of the ratios, ``r(k) ≤ median ≤ r(n+1-k)``, with the largest
    ``k`` whose binomial tail keeps the coverage at least ``confidence`` (the sign-test interval for a median: no
    assumption on the ratios' distribution, only that rounds are independent draws, which interleaving with a
    rotated order approximates). None when there are too few rounds for that coverage (fewer than 6 at 95 %).
    """
    if not 0.0 < confidence < 1.0:
        raise SedeployError(f"Confidence {confidence!r} is not valid.", expected="a fraction in (0, 1), e.g. 0.95")
    n = min(len(reference_s), len(engine_s))
    alpha_half = (1.0 - confidence) / 2.0
    k, tail = 0, 0.0  # tail = P(Binomial(n, 1/2) ≤ k - 1); the pmf in logs: 2**n overflows a float past 1023 rounds
    while k < n // 2:
        nxt = tail + math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2.0))
        if nxt > alpha_half:
            break
        k, tail = k + 1, nxt
    if k == 0:
        return None
    ratios = np.sort(np.asarray(reference_s[:n], np.float64) / np.asarray(engine_s[:n], np.float64))
    return float(ratios[k - 1]), float(ratios[n - k])


def _named(runners: Mapping[str, Runner] | Sequence[Runner]) -> list[tuple[str, Runner]]:
    if isinstance(runners, Mapping):
        items = [(str(k), v) for k, v in runners.items()]
    else:
        items = []
        for i, r in enumerate(runners):
            name = getattr(r, "name", None)
            if not isinstance(name, str) or not name:
                raise SedeployError(f"Runner #{i} ({type(r).__name__}) has no name.",
                                    fix="pass a dict {name: runner} or give each runner a `name` attribute")
            items.append((name, r))
    if not items:
        raise SedeployError("No runners to time.", expected="one or more engines")
    names = [n for n, _ in items]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise SedeployError(f"Engine names must be unique; repeated: {', '.join(dups)}.",
                            fix="name each engine after its file, precision and backend")
    for name, r in items:
        if not callable(getattr(r, "infer", None)):
            raise SedeployError(f"Engine '{name}' ({type(r).__name__}) has no infer(x) method.",
                                expected="an active runner with infer(x: np.ndarray) -> np.ndarray (sedeploy.backends.Runner)")
    return items


def check_timing_config(batch_sizes: Sequence[int], warmup: int, repeats: int, min_repeats: int,
                  max_seconds: float | None) -> list[int]:
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise SedeployError(f"Batch sizes {list(batch_sizes)}.", expected="one or more integers ≥ 1, e.g. 1,8,32")
    if len(set(sizes)) != len(sizes):
        raise SedeployError(f"Batch sizes {sizes} contain duplicates.", fix="list each batch size once")
    if warmup < 0:
        raise SedeployError(f"Warm-up rounds (--warmup) = {warmup}.", expected="0 or more",
                            fix="pass --warmup 3 (the default)")
    if repeats < 1:
        raise SedeployError(f"Timed rounds (--repeats) = {repeats}.", expected="1 or more (6 or more for a 95 % "
                            "interval of each speed-up)", fix="pass --repeats 20 (the default)")
    if min_repeats < 1 or repeats < min_repeats:
        raise SedeployError(f"min_repeats = {min_repeats} with repeats (--repeats) = {repeats}.",
                            expected="1 ≤ min_repeats ≤ repeats")
    if max_seconds is not None and not max_seconds > 0:
        raise SedeployError(f"Time budget per batch size (--max-seconds) = {max_seconds}.",
                            expected="a positive number of seconds",
                            fix="pass e.g. --max-seconds 60, or leave it out for no budget")
    return sizes


def _make_input(inputs: np.ndarray | Callable[[int], np.ndarray], batch: int) -> np.ndarray:
    """A pool N×… gives its first ``batch`` rows (cycled when N < batch); a callable is asked for the batch."""
    x = inputs(batch) if callable(inputs) else inputs
    if not isinstance(x, np.ndarray) or x.ndim < 1 or x.shape[0] < 1:
        raise SedeployError("Benchmark input must be a non-empty numpy array N×C×H×W, or a function batch → "
                            f"array; got {type(x).__name__}.")
    if callable(inputs):
        if x.shape[0] != batch:
            raise SedeployError(f"The input function returned {x.shape[0]} images for batch size {batch}.")
        return np.ascontiguousarray(x)
    idx = np.arange(batch) % x.shape[0]
    return np.ascontiguousarray(x[idx])


def _runner_input(runner: Runner, x: np.ndarray) -> np.ndarray:
    """Convert once, before timing, to the layout (``input_layout``, e.g. NHWC) and dtype a runner declares
    (``input_dtype``, e.g. an FP16-input graph)."""
    x = layout_batch(x, getattr(runner, "input_layout", None))
    want = getattr(runner, "input_dtype", None)
    return x if want is None or np.dtype(want) == x.dtype else x.astype(want)


def time_runners(runners: Mapping[str, Runner] | Sequence[Runner],
                 inputs: np.ndarray | Callable[[int], np.ndarray], *,
                 batch_sizes: Sequence[int] = (1,), warmup: int = 3, repeats: int = 20, min_repeats: int | None = None,
                 max_seconds: float | None = None, clock: Callable[[], float] = time.perf_counter,
                 pause_gc: bool = True, settle: int = 0,
                 on_round: Callable[[int, int], None] | None = None) -> TimingResult:
    """Time ``runners`` interleaved, per batch size; returns every sample (see the module docstring).

    ``inputs``: an image pool N×C×H×W (batch b = its first b images, cycled if N < b) or ``f(b) -> array``.
    Each runner gets the same batch, converted once to its ``input_dtype`` if it declares one.
    ``max_seconds``: time budget for the timed rounds of one batch size; rounds stop once it is spent and at
    least ``min_repeats`` rounds (default: min(3, repeats)) are done; a round in progress is finished.
    ``clock`` is injectable for tests. ``settle``: untimed calls of the same runner right before each timed one.
    ``on_round(batch, rounds_done)``: called after each timed round, outside the timed calls (progress bars).
    """
    named = _named(runners)
    if isinstance(settle, bool) or not isinstance(settle, int) or settle < 0:
        raise SedeployError(f"settle = {settle!r} is not valid.", expected="a whole number of calls ≥ 0",
                            fix="pass settle=1 (one untimed call before each timed one) or 0 (cold calls)")
    if min_repeats is None:
        min_repeats = min(3, repeats)
    sizes = check_timing_config(batch_sizes, warmup, repeats, min_repeats, max_seconds)
    names = [n for n, _ in named]
    result = TimingResult(
        engines=names, batch_sizes=sizes, samples={n: {} for n in names}, order={},
        timer={n: str(getattr(r, "timer_coverage", None) or DEFAULT_TIMER_COVERAGE) for n, r in named},
        config={"batch_sizes": sizes, "warmup": warmup, "repeats": repeats, "min_repeats": min_repeats,
                "max_seconds": max_seconds, "interleaving": "round-robin, order rotated by one every round",
                "clock": getattr(clock, "__name__", type(clock).__name__), "settle_calls": settle,
                "percentiles": PERCENTILE_METHOD, "gc_paused": pause_gc})
    gc_was_enabled = gc.isenabled()
    stage = "setup"
    try:
        for b in sizes:
            stage = f"batch {b}, preparing input"
            x = _make_input(inputs, b)
            feeds = {n: _runner_input(r, x) for n, r in named}
            order = result.order.setdefault(b, [])
            stage = f"batch {b}, warm-up"
            for w in range(warmup):
                for name, runner in _rotated(named, w):
                    out = runner.infer(feeds[name])
                    if w == 0:
                        _check_output(name, out, b)
            stage = f"batch {b}, timed rounds"
            if pause_gc:
                gc.collect()
                gc.disable()
            start = clock()
            rounds = 0
            while rounds < repeats:
                for name, runner in _rotated(named, rounds):
                    for _ in range(settle):
                        runner.infer(feeds[name])
                    t0 = clock()
                    runner.infer(feeds[name])
                    t1 = clock()
                    result.samples[name].setdefault(b, []).append(t1 - t0)
                    order.append(name)
                rounds += 1
                result.elapsed_s[b] = clock() - start
                if on_round is not None:
                    on_round(b, rounds)
                if max_seconds is not None and rounds >= min_repeats and result.elapsed_s[b] >= max_seconds:
                    break
            if gc_was_enabled:
                gc.enable()
            log.info("batch %d: %d round(s) of %d engine(s) in %.1f s%s", b, rounds, len(named),
                     result.elapsed_s.get(b, 0.0),
                     " (time budget reached)" if rounds < repeats else "")
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM raised as a KeyboardInterrupt subclass by the CLI
        result.complete = False
        result.interrupted = f"interrupted ({getattr(stop, 'signal_name', 'Ctrl-C')}) during {stage}"
        log.warning("Benchmark interrupted during %s; keeping the %d sample(s) measured so far.", stage,
                    sum(len(v) for per in result.samples.values() for v in per.values()))
    finally:
        if gc_was_enabled:
            gc.enable()
    return result


def _rotated(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


def _check_output(name: str, out: Any, batch: int) -> None:
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) < 1 or shape[0] != batch:
        raise SedeployError(f"Engine '{name}' returned {type(out).__name__} with shape {shape} for a batch of "
                            f"{batch}.", expected=f"logits with {batch} rows (batch × classes)")
