"""The benchmark plots: throughput against FLOPs per batch size, and latency against batch size.

Drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot, no global backend switch in the caller's
process); matplotlib is imported only when a plot is drawn, and :func:`require_matplotlib` says up front, before a
long run, that it is missing. Each file is written atomically (:mod:`sedeploy.fsutil`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sedeploy.errors import MissingDependencyError
from sedeploy.fsutil import atomic_path, ensure_writable_dir

__all__ = ["PLOT_FILES", "BAR_FLOPS_RATIO", "require_matplotlib", "engine_colors", "throughput_figure",
           "latency_figure", "write_plots"]

#: the plot files :func:`write_plots` writes, by key
PLOT_FILES = {"throughput_plot": "throughput_vs_gflops.png", "latency_plot": "latency_vs_batch.png"}


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
            written[key] = _save(fig, out / PLOT_FILES[key])
    return written
