"""Benchmark results: one dict, and the files and tables written from it.

Results schema (``results.json`` is exactly this dict; ``SCHEMA`` names its version)::

    {
      "schema": "sedeploy.bench/2",
      "complete": bool,                 # False: interrupted (Ctrl-C) — figures are partial
      "interrupted": str | None,        # where it stopped
      "created": ISO-8601 UTC time,
      "machine": {cpu, cpu_features, logical_cores, usable_cores, ram_gib, os, python, loadavg,
                  versions: {sedeploy, numpy, torch, onnx, onnxruntime, …}, timestamp, …},
      "config": {batch_sizes, warmup, repeats, min_repeats, max_seconds, interleaving, percentiles, … caller's},
      "ceilings": {"fp32": {per_s, unit, shape, threads, method, kernels, isa_peak, …}, "int8": {…}} | None,
      "reference": name of the FP32 reference engine | None,
      "engines": [
        {
          "name", "model", "depth", "precision" (fp32|fp16|int8), "flavour", "backend", "device" (cpu|cuda),
          "gflops_seed",                # model-zoo "Flops (G)": multiply-adds ×1e-9, backbone + neck
          "gflops_total",               # 2 × all multiply-adds ×1e-9 per image (sedeploy.flops total_gflops)
          "timer",                      # what one timed call covers
          "info": {…},                  # free-form (runner.describe(), file, sha256…)
          "batch": {
            "<b>": {                    # JSON object keys are strings: "1", "8", "32"
              "n", "latency_ms": {p50, p90, p99, mean, std, min, max, p10, p25, p75},
              "throughput",             # images/s = b / p50
              "throughput_total",       # images/s = all images / all time
              "spread": {iqr_pct, p90_over_p10},
              "gflops_achieved",        # gflops_total × throughput
              "ceiling",                # "fp32" | "int8" | None (no CPU ceiling for GPU engines)
              "fraction_of_ceiling",    # gflops_achieved / ceilings[ceiling].per_s, or None
              "speedup_vs_reference",   # median over rounds of t_reference / t_engine, or None
              "speedup_ci95",           # [low, high]: 95 % interval of that median (sign test), or None
              "samples_s": [seconds per call, in round order]
            }
          },
          "accuracy": {…} | None        # sedeploy.bench.accuracy.engine_accuracy + "reference"
        }
      ],
      "labels": {source, rule, n_images, …} | None,
      "ceiling_exceeded": [{engine, batch, ceiling, pct, achieved, ceiling_per_s}]  # non-empty: ceiling unreliable
    }

Figures are floats in the units their names say; NaN/Inf are written as null. Files (:func:`write_reports`):
results.json, results.csv (one row per engine × batch size), results.md (tables + machine), and with
matplotlib: throughput_vs_gflops.png and latency_vs_batch.png. The set is written into a staging folder and
published whole (:mod:`sedeploy.fsutil`): an interrupted or failed write never leaves a truncated results file,
nor new results beside an older run's plots. The tables are drawn by :mod:`sedeploy.bench.tables`, the plots by
:mod:`sedeploy.bench.plots`.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sedeploy import __version__
from sedeploy.backends.timing import TimingResult, paired_speedup, speedup_interval
from sedeploy.bench.plots import PLOT_FILES, write_plots
from sedeploy.bench.probe import ceiling_kind
from sedeploy.bench.tables import CSV_FIELDS, ceiling_exceeded, csv_rows, to_markdown
from sedeploy.errors import SedeployError
from sedeploy.fsutil import atomic_write_text, ensure_writable_dir, publish_staged, staging_folder
from sedeploy.machine import cpu_description

__all__ = ["SCHEMA", "EngineInfo", "machine_description", "assemble_results", "se_cost", "write_reports", "FILES"]

#: /2: engine "backend" values are the backend table keys ("ort", "trt", "openvino") and "pytorch"
SCHEMA = "sedeploy.bench/2"
FILES = {"json": "results.json", "csv": "results.csv", "md": "results.md", **PLOT_FILES}
_VERSIONED = ("numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "tensorrt", "openvino", "nncf",
              "nvidia-pytriton", "tritonclient", "matplotlib")


@dataclass
class EngineInfo:
    """What an engine is, for the report; ``name`` must match the runner's name in the timing run."""

    name: str
    model: str  # e.g. "SE-ResNet-50"
    precision: str  # fp32 | fp16 | int8
    gflops_total: float  # 2 × total multiply-adds per image, ×1e-9
    depth: int | None = None
    flavour: str = ""  # e.g. "fused", "qdq", "qoperator-u8s8"
    backend: str = "ort"  # a key of sedeploy.backends.BACKENDS, or "pytorch"
    device: str = "cpu"
    gflops_seed: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- machine
def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def machine_description(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """CPU model and features, cores, RAM, OS, Python and library versions, load average, UTC timestamp.

    Versions come from package metadata, so describing the machine imports nothing heavy. The load average is
    recorded because other processes on a shared machine are the main source of noise in the timings.
    """
    cpu_desc = cpu_description()
    cpu, features = cpu_desc["cpu"], cpu_desc["cpu_features"]
    versions = {"sedeploy": __version__}
    for dist in _VERSIONED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    desc = {"cpu": cpu, "cpu_features": features, "logical_cores": os.cpu_count(), "usable_cores": usable,
            "ram_gib": _ram_gib(), "os": platform.platform(), "python": platform.python_version(),
            "loadavg": load, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "versions": versions,
            "timestamp": _now()}
    desc.update(extra or {})
    return desc


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------- assemble
def assemble_results(engines: Sequence[EngineInfo | Mapping[str, Any]], timing: TimingResult | None, *,
                     accuracy: Mapping[str, Mapping[str, Any]] | None = None,
                     ceilings: Mapping[str, Mapping[str, Any]] | None = None, reference: str | None = None,
                     config: Mapping[str, Any] | None = None, labels: Mapping[str, Any] | None = None,
                     machine: Mapping[str, Any] | None = None, complete: bool | None = None,
                     interrupted: str | None = None) -> dict[str, Any]:
    """Combine engine descriptions, timing samples, accuracy figures and ceilings into the results dict.

    ``complete`` defaults to the timing run's flag; pass False when a later stage (accuracy) was interrupted.
    """
    infos = [e if isinstance(e, EngineInfo) else EngineInfo(**e) for e in engines]
    names = [e.name for e in infos]
    if len(set(names)) != len(names):
        raise SedeployError(f"Engine names repeat: {names}.", fix="give every engine a unique name")
    if timing is not None:
        unknown = [n for n in timing.engines if n not in names]
        if unknown:
            raise SedeployError(f"Timed engines without a description: {', '.join(unknown)}.",
                                fix="pass an EngineInfo for every runner timed, with the same name")
    if reference is not None and reference not in names:
        raise SedeployError(f"The reference engine '{reference}' is not among the engines ({', '.join(names)}).")
    accuracy = accuracy or {}
    out_engines = []
    for e in infos:
        entry = asdict(e)
        entry["timer"] = timing.timer.get(e.name) if timing else None
        entry["batch"] = _batch_entries(e, timing, ceilings, reference) if timing else {}
        entry["accuracy"] = dict(accuracy[e.name]) if e.name in accuracy else None
        out_engines.append(entry)
    if complete is None:
        complete = timing.complete if timing is not None else True
    cfg = dict(timing.config) if timing else {}
    cfg.update(config or {})
    results = _jsonable({
        "schema": SCHEMA, "complete": bool(complete),
        "interrupted": interrupted or (timing.interrupted if timing else None), "created": _now(),
        "machine": dict(machine) if machine is not None else machine_description(), "config": cfg,
        "ceilings": dict(ceilings) if ceilings else None, "reference": reference, "engines": out_engines,
        "labels": dict(labels) if labels else None,
    })
    results["ceiling_exceeded"] = ceiling_exceeded(results)  # non-empty: the ceiling is unreliable for this run
    return results


def _batch_entries(e: EngineInfo, timing: TimingResult, ceilings, reference: str | None) -> dict[str, Any]:
    kind = ceiling_kind(e.precision, e.device)
    ceiling = ceilings.get(kind) if (ceilings and kind) else None
    out = {}
    for b in timing.batch_sizes:
        stats = timing.stats(e.name, b)
        if stats is None:
            continue
        achieved = e.gflops_total * stats["throughput"]
        samples = timing.samples[e.name][b]
        ref_samples = timing.samples.get(reference, {}).get(b, []) if reference else []
        stats.update({
            "gflops_achieved": achieved, "ceiling": kind if ceiling else None,
            "fraction_of_ceiling": achieved / ceiling["per_s"] if ceiling else None,
            "speedup_vs_reference": paired_speedup(ref_samples, samples) if reference else None,
            "speedup_ci95": (list(ci) if reference and e.name != reference
                             and (ci := speedup_interval(ref_samples, samples)) else None),
            "samples_s": list(samples),
        })
        out[str(b)] = stats
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def se_cost(results: dict[str, Any], timing) -> list[dict[str, Any]] | None:
    """With --compare-plain: per batch size, the SE model's FP32 time over the plain model's (paired by round)
    next to its FLOPs ratio — what SE costs in time versus what it costs in arithmetic."""
    plain = [e for e in results["engines"] if e.get("flavour") == "no-SE"]
    ref = results.get("reference")
    if not plain or timing is None or not ref:
        return None
    p = plain[0]
    ref_e = next(e for e in results["engines"] if e["name"] == ref)
    out = []
    for b in timing.batch_sizes:
        s_ref, s_plain = timing.samples.get(ref, {}).get(b, []), timing.samples.get(p["name"], {}).get(b, [])
        ratio = paired_speedup(s_plain, s_ref)  # median t_plain / t_se
        flops_ratio = (ref_e["gflops_total"] / p["gflops_total"]
                       if ref_e.get("gflops_total") and p.get("gflops_total") else None)
        out.append({"batch": b, "se_time_over_plain": (1 / ratio) if ratio else None,
                    "se_flops_over_plain": flops_ratio, "engine": ref, "plain": p["name"]})
    return out


# --------------------------------------------------------------------------------------------------- files
def write_reports(results: Mapping[str, Any], out_dir: str | os.PathLike, *, plots: bool = True,
                  locked: bool = False) -> dict[str, Path]:
    """Write results.json, results.csv, results.md (and the plots) into ``out_dir`` as one set; returns
    {kind: path}.

    Everything is written into a staging folder inside ``out_dir`` first and published only when every file was
    written (:func:`sedeploy.fsutil.publish_staged`: results.json last, Ctrl-C/SIGTERM/SIGHUP held back for the
    renames); files of the previous set that this one does not write (a plot) are removed. A failure or an
    interruption while writing (a full disk while plotting, a second Ctrl-C) leaves the previous set untouched:
    the folder never holds results of one run beside plots of another. ``locked``: the caller holds
    :func:`sedeploy.fsutil.folder_lock` on ``out_dir`` (as ``run_bench`` does for its whole run), so staging
    folders left by killed runs are removed too.
    """
    out = ensure_writable_dir(out_dir, "results folder", fix="choose another results folder or fix its permissions")
    data = _jsonable(results)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(data):
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    with staging_folder(out, locked=locked) as stage:
        written = {"json": atomic_write_text(stage / FILES["json"], json.dumps(data, indent=2, allow_nan=False)
                                             + "\n"),
                   "csv": atomic_write_text(stage / FILES["csv"], buf.getvalue()),
                   "md": atomic_write_text(stage / FILES["md"], to_markdown(data))}
        if plots:
            written.update(write_plots(data, stage))
        stale = [name for key, name in FILES.items() if key not in written]  # a previous run's plot goes too
        publish_staged(stage, out, [FILES[k] for k in written], last=FILES["json"], stale=stale)
    return {k: out / FILES[k] for k in written}
