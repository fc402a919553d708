"""The benchmark results as text: the terminal table, results.md and the flat CSV rows.

Every table is read from the results dict (:mod:`sedeploy.bench.report` schema), so a results.json written by an
earlier run prints the same tables. Figures that could not be measured show as "–"; speed-up intervals are rounded
outwards (a low end of 0.996 shows as 0.99, never as 1.00).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["CSV_FIELDS", "csv_rows", "ceiling_exceeded", "format_table", "to_markdown"]

CSV_FIELDS = ["engine", "model", "depth", "precision", "flavour", "backend", "device", "batch", "n",
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
