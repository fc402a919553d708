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
nor new results beside an older run's plots.
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

from sedeploy.bench.probe import ceiling_kind
from sedeploy.backends.timing import TimingResult, paired_speedup, speedup_interval
from sedeploy.errors import MissingDependencyError, SedeployError
from sedeploy.fsutil import atomic_path, atomic_write_text, ensure_writable_dir, publish_staged, staging_folder

__all__ = ["SCHEMA", "EngineInfo", "machine_description", "assemble_results", "format_table", "csv_rows",
           "to_markdown", "write_reports", "write_plots", "ceiling_exceeded", "require_matplotlib", "engine_colors",
           "throughput_figure",
           "latency_figure", "FILES"]

#: /2: engine "backend" values are the backend table keys ("ort", "trt", "openvino") and "pytorch"
SCHEMA = "sedeploy.bench/2"
FILES = {"json": "results.json", "csv": "results.csv", "md": "results.md",
         "throughput_plot": "throughput_vs_gflops.png", "latency_plot": "latency_vs_batch.png"}
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
    from sedeploy import __version__

    from sedeploy.machine import cpu_description

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


# --------------------------------------------------------------------------------------------------- tables
_CSV_FIELDS = ["engine", "model", "depth", "precision", "flavour", "backend", "device", "batch", "n",
               "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "throughput", "throughput_total",
               "iqr_pct", "p90_over_p10", "speedup_vs_reference", "speedup_ci95_low", "speedup_ci95_high",
               "gflops_total", "gflops_achieved", "ceiling", "fraction_of_ceiling", "top1_pct", "top5_pct", "top1_drop_pts", "top1_agreement_pct",
               "flips_right_to_wrong", "flips_wrong_to_right", "mean_kl", "max_abs_logit_diff", "complete"]


def csv_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat row per engine × batch size (an engine with no timing gets one row, batch empty)."""
    rows = []
    for e in results["engines"]:
        acc = e.get("accuracy") or {}
        base = {"engine": e["name"], "model": e.get("model"), "depth": e.get("depth"),
                "precision": e.get("precision"), "flavour": e.get("flavour"), "backend": e.get("backend"),
                "device": e.get("device"), "gflops_total": e.get("gflops_total"), "complete": results["complete"],
                **{k: acc.get(k) for k in ("top1_pct", "top5_pct", "top1_drop_pts", "top1_agreement_pct",
                                           "flips_right_to_wrong", "flips_wrong_to_right", "mean_kl",
                                           "max_abs_logit_diff")}}
        batches = e.get("batch") or {}
        if not batches:
            rows.append({**base, "batch": None})
        for b, s in sorted(batches.items(), key=lambda kv: int(kv[0])):
            lat = s["latency_ms"]
            rows.append({**base, "batch": int(b), "n": s["n"], "p50_ms": lat["p50"], "p90_ms": lat["p90"],
                         "p99_ms": lat["p99"], "mean_ms": lat["mean"], "std_ms": lat["std"], "min_ms": lat["min"],
                         "throughput": s["throughput"], "throughput_total": s["throughput_total"],
                         "iqr_pct": s["spread"]["iqr_pct"], "p90_over_p10": s["spread"]["p90_over_p10"],
                         "speedup_vs_reference": s.get("speedup_vs_reference"),
                         "speedup_ci95_low": (s.get("speedup_ci95") or [None, None])[0],
                         "speedup_ci95_high": (s.get("speedup_ci95") or [None, None])[1],
                         "gflops_achieved": s.get("gflops_achieved"), "ceiling": s.get("ceiling"),
                         "fraction_of_ceiling": s.get("fraction_of_ceiling")})
    return rows


def _f(v: Any, fmt: str = ".2f", suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:{fmt}}{suffix}"


def _interval(low: float | None, high: float | None) -> str:
    """A speed-up interval at 2 decimals, rounded outwards (a low end of 0.996 shows as 0.99, never as 1.00)."""
    if low is None or high is None:
        return "–"
    return f"{math.floor(low * 100) / 100:.2f}–{math.ceil(high * 100) / 100:.2f}"


def _timing_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["engine", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s", "× ref", "95 % CI", "GFLOP/s",
            "% ceiling", "IQR %", "n"]
    rows = []
    for r in csv_rows(results):
        if r["batch"] is None:
            continue
        frac = r["fraction_of_ceiling"]
        rows.append([r["engine"], r["precision"] or "", str(r["batch"]), _f(r["p50_ms"]), _f(r["p90_ms"]),
                     _f(r["p99_ms"]), _f(r["throughput"], ".1f"), _f(r["speedup_vs_reference"], ".2f", "×"),
                     _interval(r["speedup_ci95_low"], r["speedup_ci95_high"]),
                     _f(r["gflops_achieved"], ".1f"),
                     _f(frac * 100 if frac is not None else None, ".0f", f"% {r['ceiling']}"),
                     _f(r["iqr_pct"], ".1f"), str(r["n"])])
    return head, rows


def _accuracy_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    engines = [e for e in results["engines"] if e.get("accuracy")]
    labelled = any(e["accuracy"].get("labelled") for e in engines)
    head = ["engine", "precision"] + (["top-1 %", "top-5 %", "Δtop-1 pts", "R→W", "W→R"] if labelled else []) + \
           ["agree %", "mean KL", "max |Δlogit|", "images"]
    rows = []
    for e in engines:
        a = e["accuracy"]
        row = [e["name"], e.get("precision") or ""]
        if labelled:
            row += [_f(a.get("top1_pct")), _f(a.get("top5_pct")),
                    _f(0.0 - a["top1_drop_pts"] if a.get("top1_drop_pts") is not None else None, "+.2f"),
                    _f(a.get("flips_right_to_wrong"), "d"), _f(a.get("flips_wrong_to_right"), "d")]
        row += [_f(a.get("top1_agreement_pct")), _f(a.get("mean_kl"), ".2e"), _f(a.get("max_abs_logit_diff"), ".3g"),
                str(a.get("n_images", ""))]
        rows.append(row)
    return head, rows


def _aligned(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    left = {0, 1}  # text columns; numbers align right

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    align = ["---" if i < 2 else "---:" for i in range(len(head))]
    return "\n".join(["| " + " | ".join(map(esc, head)) + " |", "| " + " | ".join(align) + " |",
                      *("| " + " | ".join(map(esc, r)) + " |" for r in rows)])


def _machine_line(m: Mapping[str, Any]) -> str:
    v = m.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("onnxruntime", "tensorrt", "torch") if k in v)
    return (f"{m.get('cpu')} ({m.get('usable_cores')} usable cores, {m.get('ram_gib')} GiB), {m.get('os')}, "
            f"Python {m.get('python')}; {libs}; load {m.get('loadavg')}")


def _ceiling_line(c: Mapping[str, Any] | None) -> str | None:
    if not c:
        return None
    parts = []
    for k, v in c.items():
        part = f"{k} {_f(v.get('per_s'), '.0f')} {v.get('unit', '')} ({'×'.join(map(str, v.get('shape', [])))}, " \
               f"{v.get('threads')} threads"
        if len(v.get("kernels") or []) > 1:
            part += f"; best of {len(v['kernels'])} kernels: {v.get('method')}"
        part += ")"
        if (peak := v.get("isa_peak")):
            part += (f" [ISA bound ≈ {_f(peak.get('per_s'), '.0f')} GFLOP/s: {peak.get('isa')}, "
                     f"{_f(peak.get('mhz'), '.0f')} MHz]")
        parts.append(part)
    return "CPU ceiling (GEMM probe): " + "; ".join(parts)


def ceiling_exceeded(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each engine × batch whose achieved rate is above its CPU ceiling, as the table rounds it (a 100.3 % shown as
    "100%" is not above): {engine, batch, ceiling, pct, achieved, ceiling_per_s}. Non-empty means the ceiling is
    unreliable for this run; the fractions themselves are reported as measured (nothing is clamped)."""
    ceilings = results.get("ceilings") or {}
    out = []
    for r in csv_rows(results):
        frac = r.get("fraction_of_ceiling")
        if frac is not None and round(frac * 100) > 100:
            out.append({"engine": r["engine"], "batch": r["batch"], "ceiling": r["ceiling"], "pct": frac * 100,
                        "achieved": r["gflops_achieved"],
                        "ceiling_per_s": (ceilings.get(r["ceiling"]) or {}).get("per_s")})
    return out


def _notes(results: Mapping[str, Any]) -> list[str]:
    notes = []
    if not results["complete"]:
        notes.append(f"INCOMPLETE RESULTS: {results.get('interrupted') or 'the run stopped early'}; "
                     "figures cover only what was measured.")
    timers = sorted({e["timer"] for e in results["engines"] if e.get("timer")})
    notes += [f"Timer: {t}" for t in timers]
    for e in results["engines"]:
        a = e.get("accuracy") or {}
        if a.get("nonfinite"):
            images = a.get("nonfinite_images")
            notes.append(f"WARNING: {e['name']} produced {a['nonfinite']} non-finite output value(s) (NaN/Inf)"
                         + (f" on {images} of {a.get('n_images')} images" if images is not None else "")
                         + ": a broken engine. Those images count as wrong and as disagreeing; KL and |Δlogit| "
                           "cover the finite images only (– when there are none).")
    weights = (results.get("config") or {}).get("weights")
    if weights:
        notes.append(f"Weights: {weights}" + (" — speed figures are meaningful, accuracy figures are not (no "
                                                "trained checkpoint)" if str(weights).startswith("random") else ""))
    rows = csv_rows(results)
    if (over := ceiling_exceeded(results)):
        items = ", ".join(f"{r['engine']} batch {r['batch']} {r['pct']:.0f} % of {r['ceiling']}" for r in over)
        notes.append(f"CEILING UNRELIABLE: above 100 % of the CPU ceiling: {items}. A ceiling is what the best probed "
                     "GEMM reached, so above 100 % it understates what this CPU can do (a probe slowed by other "
                     "load, or kernels that do fewer operations than the FLOP count, e.g. Winograd convolutions): "
                     "the % ceiling figures of this run are not fractions of the machine's peak (shown as measured, "
                     "not clamped). Compare engines by × ref.")
    if results.get("reference"):
        notes.append(f"Reference (× ref, agreement, KL): {results['reference']}. × ref is the median over rounds of "
                     "reference time / engine time (> 1: faster); 95 % CI is that median's sign-test interval, "
                     "rounded outwards, so a lead whose interval includes 1.00 is not shown by this run.")
        short = sorted({str(r["batch"]) for r in rows if r["engine"] != results["reference"]
                        and r.get("speedup_vs_reference") is not None and r.get("speedup_ci95_low") is None})
        if short:
            notes.append(f"No 95 % CI at batch {', '.join(short)}: fewer than 6 paired rounds were timed (--repeats, "
                         "or --max-seconds cut the run short); pass --repeats 20 or more for an interval.")
    if results.get("labels"):
        lab = results["labels"]
        notes.append(f"Labels: {lab.get('source')} — {lab.get('rule')}")
    return notes


def format_table(results: Mapping[str, Any]) -> str:
    """The terminal report: machine, ceilings, timing table, accuracy table, notes (plain aligned text)."""
    parts = [f"Machine: {_machine_line(results['machine'])}"]
    if (line := _ceiling_line(results.get("ceilings"))):
        parts.append(line)
    head, rows = _timing_table(results)
    parts += ["", _aligned(head, rows) if rows else "(no timings measured)"]
    head, rows = _accuracy_table(results)
    if rows:
        parts += ["", _aligned(head, rows)]
    parts += ["", *_notes(results)]
    return "\n".join(parts).rstrip() + "\n"


def to_markdown(results: Mapping[str, Any]) -> str:
    """results.md: the same tables as markdown, with the machine and configuration."""
    out = ["# sedeploy benchmark", ""]
    if not results["complete"]:
        out += [f"> **Incomplete:** {results.get('interrupted') or 'the run stopped early'}.", ""]
    head, rows = _timing_table(results)
    out += ["## Speed", "", _markdown(head, rows) if rows else "(no timings measured)", ""]
    head, rows = _accuracy_table(results)
    if rows:
        out += ["## Accuracy drift", "", _markdown(head, rows), ""]
    out += ["## Machine", "", f"- {_machine_line(results['machine'])}"]
    if (line := _ceiling_line(results.get("ceilings"))):
        out.append(f"- {line}")
    cfg = results.get("config") or {}
    out.append("- Config: " + "; ".join(f"{k} = {v}" for k, v in cfg.items()))
    out += [f"- {n}" for n in _notes(results) if not n.startswith("INCOMPLETE")]
    out.append(f"- Created {results.get('created')}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------- plots
def require_matplotlib() -> None:
    """Raise :class:`MissingDependencyError` now, before a long run, if plots cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError("matplotlib", "bench", "Plotting benchmark results") from err


def _figure(width: float, height: float):
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


_PRECISION_STYLE = {"fp32": ("tab:blue", "o"), "fp16": ("tab:green", "s"), "int8": ("tab:red", "^")}
#: engines whose FLOP counts are within this factor are drawn as bars (one x on a log FLOP axis says nothing)
BAR_FLOPS_RATIO = 1.5
_ENGINE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                  "tab:olive", "tab:cyan", "tab:gray")


def engine_colors(results: Mapping[str, Any]) -> dict[str, str]:
    """One colour per engine, in the order of ``results["engines"]``: the same engine has the same colour in every
    plot of a report."""
    names = [e["name"] for e in results["engines"]]
    return {n: _ENGINE_COLORS[i % len(_ENGINE_COLORS)] for i, n in enumerate(names)}


def _marker(e: Mapping[str, Any]) -> str:
    return _PRECISION_STYLE.get(e.get("precision"), ("", "D"))[1]


def _incomplete(fig, results: Mapping[str, Any]) -> None:
    if not results["complete"]:
        fig.suptitle("INCOMPLETE RUN", color="tab:red")


def throughput_figure(results: Mapping[str, Any]):
    """The throughput_vs_gflops.png figure (a matplotlib Figure), or None without data.

    Engines of one model (one FLOP count): a bar per engine and batch size, the CPU ceiling as a bound line.
    Several models: throughput against GFLOP/image on log axes, one legend entry per engine, ceiling curves."""
    engines = [e for e in results["engines"] if e.get("batch") and e.get("gflops_total")]
    batches = sorted({int(b) for e in engines for b in e["batch"]})
    if not batches:
        return None
    require_matplotlib()
    colors = engine_colors(results)
    ceilings = results.get("ceilings") or {}
    xs_all = sorted({round(e["gflops_total"], 6) for e in engines})
    # FLOP counts within a factor 1.5 (one model, with or without SE) sit at one x on a log axis: bars show them
    one_model = xs_all[-1] / xs_all[0] < BAR_FLOPS_RATIO
    if one_model:
        fig = _figure(max(6.0, 3.6 * len(batches)), 1.2 + 0.42 * len(engines))
    else:
        fig = _figure(4.6 * len(batches), 4.2)
    axes = fig.subplots(1, len(batches), squeeze=False)[0]
    for ax, b in zip(axes, batches):
        rows = [e for e in engines if str(b) in e["batch"]]
        if one_model:
            names = [e["name"] for e in rows][::-1]  # the reference on top
            values = [e["batch"][str(b)]["throughput"] for e in rows][::-1]
            bars = ax.barh(names, values, color=[colors[n] for n in names])
            if len(xs_all) > 1:  # say which bars do less work
                ax.set_yticks(range(len(names)))
                ax.set_yticklabels([f"{e['name']} ({e['gflops_total']:.2f} GFLOP)" for e in rows][::-1])
            for rect, v in zip(bars, values):
                ax.annotate(f"{v:.0f}", (rect.get_width(), rect.get_y() + rect.get_height() / 2),
                            xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
            for kind, c in ceilings.items():
                if c and c.get("per_s") and any(e.get("precision") == kind or (kind == "fp32" and
                                                e.get("precision") == "fp16") for e in rows):
                    bound = c["per_s"] / xs_all[-1]
                    if bound < 3 * max(values):  # a bound far off the bars says nothing and squashes them
                        ax.axvline(bound, linestyle="--", linewidth=0.8, color=_PRECISION_STYLE.get(kind, ("gray",))[0],
                                   label=f"{kind} GEMM ceiling")
            ax.set_xlabel("images / s (at p50 latency)")
            ax.set_title(f"batch {b}")
            ax.tick_params(axis="y", labelsize=7)
            if b != batches[0]:
                ax.set_yticklabels([])
            ax.grid(True, axis="x", linewidth=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="lower right")
            continue
        for e in rows:
            ax.scatter([e["gflops_total"]], [e["batch"][str(b)]["throughput"]], color=colors[e["name"]],
                       marker=_marker(e), label=e["name"], zorder=3)
        lo, hi = xs_all[0] / 1.6, xs_all[-1] * 1.6
        grid = np.geomspace(lo, hi, 50)
        for kind, c in ceilings.items():
            if c and c.get("per_s"):
                ax.plot(grid, c["per_s"] / grid, linestyle="--", linewidth=0.8,
                        color=_PRECISION_STYLE.get(kind, ("gray",))[0], label=f"{kind} GEMM ceiling")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_xlabel("GFLOP per image (total)")
        ax.set_ylabel("images / s (at p50 latency)")
        ax.set_title(f"batch {b}")
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(fontsize=7)
    if one_model:
        model = engines[0].get("model") or ""
        work = f"{xs_all[0]:.2f}" + (f"–{xs_all[-1]:.2f}" if len(xs_all) > 1 else "")
        fig.suptitle(f"Throughput of {model} ({work} GFLOP/image) per engine"
                     + ("  — INCOMPLETE RUN" if not results["complete"] else ""), fontsize=9,
                     color="black" if results["complete"] else "tab:red")
    else:
        _incomplete(fig, results)
    fig.tight_layout()
    return fig


def latency_figure(results: Mapping[str, Any]):
    """The latency_vs_batch.png figure (p50 per engine, p10–p90 band), or None without data."""
    engines = [e for e in results["engines"] if e.get("batch")]
    if not engines:
        return None
    require_matplotlib()
    colors = engine_colors(results)
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    for e in engines:
        bs = sorted(int(b) for b in e["batch"])
        lat = [e["batch"][str(b)]["latency_ms"] for b in bs]
        p50 = np.array([x["p50"] for x in lat])
        ax.plot(bs, p50, marker=_marker(e), color=colors[e["name"]], label=e["name"])
        ax.fill_between(bs, [x["p10"] for x in lat], [x["p90"] for x in lat], color=colors[e["name"]], alpha=0.15,
                        linewidth=0)
    all_b = sorted({int(b) for e in engines for b in e["batch"]})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(all_b)
    ax.set_xticklabels([str(b) for b in all_b])
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency per call, ms (p50; band p10–p90)")
    ax.set_title("Latency vs batch size" + ("  (INCOMPLETE RUN)" if not results["complete"] else ""))
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_plots(results: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """throughput_vs_gflops.png (per batch size: img/s per engine — bars for one model, img/s vs GFLOP/image for
    several — with the CPU ceiling) and latency_vs_batch.png (p50 per engine, p10–p90 band); each engine keeps its
    colour (:func:`engine_colors`) in both. Plots with no data are not written."""
    require_matplotlib()
    out = ensure_writable_dir(out_dir, "results folder", fix="choose another results folder or fix its permissions")
    written = {}
    for key, make in (("throughput_plot", throughput_figure), ("latency_plot", latency_figure)):
        fig = make(results)
        if fig is not None:
            written[key] = _save(fig, out / FILES[key])
    return written


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
    writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
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
