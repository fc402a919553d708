"""What `build-engine` did (:class:`BuildResult`, written as manifest.json) and the summary it prints
(:func:`format_result`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sedeploy.artifacts import Artifact
from sedeploy.backends import BACKENDS
from sedeploy.int8_check import RUNTIMES
from sedeploy.metrics import REPORT_CONFIDENCE


@dataclass
class BuildResult:
    """Everything a build did, file paths in the output folder; :meth:`as_dict` is manifest.json's content."""

    source: str
    out_dir: str
    weights: str | None = None  # from the model's metadata: "random (seed 0)", "mmcls checkpoint x.pth (…)"
    label_offset: int | None = None  # --label-offset (also in every artifact's metadata); None: not given
    se_blocks_found: int | None = None
    se_blocks_fused: int | None = None
    fusion: dict[str, Any] | None = None
    artifacts: list[Artifact] = field(default_factory=list)
    engines: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    int8_budget: dict[str, Any] | None = None  # per flavour: sedeploy.int8_budget.BudgetReport
    shapes: dict[str, Any] | None = None  # input shape, batch handling, output kind
    canonical: dict[str, Any] | None = None  # sedeploy.passes.canonical.CanonicalReport of the input graph
    int8_check: dict[str, Any] | None = None  # INT8 agreement with FP32 on held-out images (sedeploy.int8_check)
    int8_pending: Any = field(default=None, repr=False, compare=False)  # the check's images, until it runs (not
    # in the manifest)

    def published(self, path: str | Path) -> Path:
        """Where a file this build writes (into its staging folder) is published: its name in the output folder.
        Every path the result records is made with it, so nothing is rewritten when the set is published."""
        return Path(self.out_dir) / Path(path).name

    def as_dict(self) -> dict[str, Any]:
        """The manifest's content."""
        d = {k: v for k, v in self.__dict__.items() if k != "int8_pending"}
        d["artifacts"] = [a.as_dict() for a in self.artifacts]
        return d


def format_int8_check(check: dict[str, Any] | None) -> list[str]:
    """The summary lines of the INT8 agreement check."""
    if not check:
        return []
    if not check.get("measured"):
        return [f"INT8 check  not measured: {check['reason']} (pass --val DIR)"]
    lines = [f"INT8 check  top-1 agreement with FP32 on {check['heldout']['what']}; warns below "
             f"{check['warn_below_pct']:g} %:"]
    for kind, m in check["artifacts"].items():
        lines.append(f"  {kind:<9} {m['agreement_pct']:6.2f} % ({REPORT_CONFIDENCE:.0%} lower bound "
                     f"{m['agreement_lcb_pct']:.2f} %, n = {m['n']}) on {RUNTIMES[m['runtime']]}"
                     + (f"  BELOW {check['warn_below_pct']:g} %" if m["below_warn"] else "")
                     + (f"  ({m['note']})" if m.get("note") else "")
                     + (f"  ({m['from']})" if m.get("from") else ""))
    return lines


def format_result(res: BuildResult) -> str:
    """The human-readable summary `build-engine` prints."""
    lines = [f"source      {res.source}"]
    if res.weights:
        lines.append(f"weights     {res.weights}" + ("  (timing is meaningful, accuracy is not)"
                                                     if res.weights.startswith("random") else ""))
    if res.shapes:
        sh = res.shapes
        lines.append(f"input       {'×'.join(map(str, sh['input']))} {sh.get('layout', 'NCHW')} "
                     + (f"(model: {'×'.join(map(str, sh['source_input']))}) " if sh.get("source_input") else "")
                     + f"({sh['batch_handling']}); output: {sh['output']}")
        if sh.get("preprocess"):
            lines.append(f"preprocess  {sh['preprocess']}")
    if res.se_blocks_found is not None:
        f = res.fusion or {}
        reorders = f.get("ort_reorders")
        lines.append(f"SE fusion   {res.se_blocks_fused}/{res.se_blocks_found} blocks fused, nodes "
                     f"{f.get('nodes_before')} → {f.get('nodes_after')}, max "
                     f"|Δ{'prob' if (res.shapes or {}).get('output') == 'probabilities' else 'logit'}| vs unfused "
                     f"{f.get('max_abs_diff_vs_unfused', float('nan')):.1e}"
                     + (f"; ORT layout reorders {reorders}" if reorders is not None else ""))
    if res.calibration:
        c = res.calibration
        lines.append(f"calibration {c['method']} on {c['images']} images from {c['folder']}"
                     + (f" (cache hit, {c['seconds']:.1f} s; computed in {c['computed_seconds']:.1f} s earlier)"
                        if c['cache_hit'] and c.get('computed_seconds') is not None
                        else f" ({'cache hit' if c['cache_hit'] else 'computed'}, {c['seconds']:.1f} s)"))
    if res.validation is not None:
        lines.append(f"TensorRT Q/DQ rules: {'pass' if res.validation.get('ok') else 'FAIL'}")
    if res.int8_budget:
        b = res.int8_budget
        lines.append(f"INT8 budget {', '.join(f'{k} {v}' for k, v in b['budget'].items() if v is not None)} on "
                     f"{b['heldout']}")
        for flavour, r in b["flavours"].items():
            a, f = r["all_int8"], r["result"]
            fell = r["fell_back"]
            speed = r.get("speed") or {}
            cost = ""
            if speed:
                cost = (f"; speed vs FP32 {speed['speedup_vs_fp32']['int8_budget']:.2f}× (all-INT8 "
                        f"{speed['speedup_vs_fp32']['int8_all']:.2f}×) at batch {speed['batch']} on "
                        f"{speed['backend']}")
            lines.append(f"  int8-{flavour}: agreement {a['agreement_pct']:.2f} % with every layer quantized → "
                         f"{f['agreement_pct']:.2f} % ({REPORT_CONFIDENCE:.0%} lower bound "
                         f"{f['agreement_lcb_pct']:.2f} %) with "
                         f"{len(fell)}/{r['layers']} layer(s) in float"
                         + (f" ({', '.join(fell[:6])}{' …' if len(fell) > 6 else ''})" if fell else "")
                         + (f"; top-1 drop {f['top1_drop_pts']:.2f} pt (upper bound {f['top1_drop_ucb_pts']:.2f})"
                            if r["labelled"] else "") + cost)
    lines.extend(format_int8_check(res.int8_check))
    lines.append("artifacts (portable ONNX):")
    for a in res.artifacts:
        lines.append(f"  {a.kind:<22} {a.path}")
    if res.engines:
        lines.append("engines:")
        for e in res.engines:
            moved = (e.get("graph_rewrites") or {}).get("squeeze_first")
            fb = e.get("fallback")
            lines.append(f"  {e['backend']:<11} {e['precision']:<10} {e['path']}"
                         + (f"  (squeeze-first: {moved} SE squeezes pool before the expanding conv)" if moved else "")
                         + (f"  (fallback: {BACKENDS[fb['backend']].label} cannot compile {fb['artifact']}: "
                            f"{fb['reason']}; report it at {fb['report']})" if fb else ""))
    for n in res.notes:
        warned = n.removeprefix("WARNING: ")  # a warning prints once, as a warning
        lines.append(f"warning: {warned}" if warned != n else f"note: {n}")
    lines.append(f"time        {res.timings.get('total_s', 0):.1f} s "
                 + " ".join(f"{k[:-2]}={v:.1f}s" for k, v in res.timings.items() if k != "total_s"))
    return "\n".join(lines)
