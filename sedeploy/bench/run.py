"""The `sedeploy bench` job: engines in, one results dict (and its files) out.

Order of work, chosen so that every mistake surfaces before the long part and an interruption loses nothing:

1. **Checks** (seconds): output folder writable, engines described from their metadata, one model
   (:func:`~sedeploy.bench.selection.check_same_model`), batch sizes within every engine's limits, labels resolved
   against the model's classes *before* any image is decoded, budgets usable (a top-1 budget needs labels).
2. **Runners** opened (a TensorRT plan without TensorRT / GPU is an error naming it), the FP32 reference run once.
3. **Ceiling probe** (GEMM fp32 / int8, ~2 s) when an engine runs on the CPU.
4. **Extra rows**: the PyTorch eager FP32 baseline of the same network, and with ``compare_plain`` the same depth
   without SE, exported to a temporary folder — both timed with the engines, not scored for accuracy.
5. **Timing**, interleaved (:func:`~sedeploy.backends.timing.time_runners`), per batch size.
6. **Accuracy** over the image folder: image chunks in the outer loop, engines inside, so that at any moment
   every engine has seen the same images — an interrupted pass still yields figures on a common subset.
7. **Results** assembled, the CI gate applied (``gate.violations``), files written.

Ctrl-C anywhere in 3–6 stops the run; what was measured is assembled with ``"complete": false``, written to
``out_dir``, and :class:`BenchInterrupted` (a ``KeyboardInterrupt`` carrying the results) is raised, so a CLI can
print the partial table and exit 130.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sedeploy.backends.ort import default_threads
from sedeploy.backends.timing import time_runners
from sedeploy.bench import engines as E
from sedeploy.bench import selection as S
from sedeploy.bench.accuracy import check_budget, nonfinite_violations
from sedeploy.bench.baselines import TORCH_NAME, plain_engine, torch_baseline, torch_threads
from sedeploy.bench.measure import CHECK_IMAGES, accuracy_pass, load_head, outputs_probabilities, pad_run, \
    prepare_batch, timing_bar
from sedeploy.bench.options import DEFAULT_BATCHES, BenchOptions
from sedeploy.bench.peers import make_peers
from sedeploy.bench.plots import require_matplotlib
from sedeploy.bench.probe import machine_ceilings
from sedeploy.bench.report import EngineInfo, FILES, assemble_results, se_cost, write_reports
from sedeploy.bench.tables import format_table
from sedeploy.classes import read_synset_table
from sedeploy.errors import SedeployError, VerificationError
from sedeploy.fsutil import ensure_writable_dir, folder_lock, missing_dirs, remove_empty_dirs
from sedeploy.labels import read_labels_file, resolve_labels_offset
from sedeploy.machine import check_omp_num_threads
from sedeploy.onnxcore import META
from sedeploy.preprocess import find_images, smooth_noise

log = logging.getLogger("sedeploy")

__all__ = ["run_bench", "run_bench_with", "BenchOptions", "BenchInterrupted", "bench_command_summary",
           "DEFAULT_BATCHES"]


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a benchmark: ``results`` (``complete`` False) were written to ``files`` (when out_dir)."""

    def __init__(self, results: dict[str, Any], files: dict[str, Path]):
        super().__init__(results.get("interrupted") or "interrupted")
        self.results, self.files = results, files


class _Interrupted(Exception):
    def __init__(self, stage: str, signal_name: str = "Ctrl-C"):
        super().__init__(stage)
        self.stage, self.signal_name = stage, signal_name


@dataclass
class _Job:
    """What one run carries from step to step: its options, the engines and runners, what was measured."""

    opts: BenchOptions
    out: Path | None
    sizes: list[int]
    threads: int
    specs: list[E.EngineSpec]
    ref: E.EngineSpec
    pp: Any
    notes: list[str]
    found: Any = None  # the image folder (preprocess.find_images), or None
    flops: dict[str, Any] = field(default_factory=dict)
    runners: dict[str, Any] = field(default_factory=dict)
    extra_runners: dict[str, Any] = field(default_factory=dict)  # timed only: PyTorch, the plain model
    infos: list[EngineInfo] = field(default_factory=list)
    peer_rows: dict[str, str] = field(default_factory=dict)
    num_classes: int = 0
    label_offset: int = 0  # model output k + offset is dataset class k (given, else recorded by build-engine)
    lab: Any = None  # labels.Labels, or None
    head: np.ndarray | None = None  # the first images that decode: the timing pool and the PyTorch check
    config: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=lambda: {"ceilings": None, "timing": None, "accuracy": None,
                                                            "stage": "setup"})


def run_bench(engines: Sequence[str | Path], *, images: str | Path | None = None, labels: str | Path | None = None,
              batches: Sequence[int] | None = None, threads: int | None = None, warmup: int = 3,
              repeats: int = 20, max_seconds: float | None = None, reference: str | None = None,
              torch_baseline: bool = True, checkpoint: str | None = None, compare_plain: bool = False,
              probe: bool = True, probe_seconds: float = 2.0, out_dir: str | Path | None = None, plots: bool = True,
              progress: bool = True, max_top1_drop: float | None = None, min_agreement: float | None = None,
              image_limit: int | None = None, eval_batch: int = 32, synsets: str | Path | None = None,
              providers=None, optimization: str = "all", settle: int = 1, label_offset: int | None = None,
              peers: bool = False, peer_calib: str | Path | None = None) -> dict[str, Any]:
    """Benchmark ``engines`` (files, or ``build-engine`` output folders) and return the results dict
    (:mod:`sedeploy.bench.report` schema, plus ``notes``, ``gate``, ``flops`` and ``se_cost``).

    ``images``: a folder (flat or class subfolders; ``labels``: a ``file<TAB>index`` file for it), first
    ``image_limit`` files in sorted order; without it only speed is measured. ``reference``: engine name or path
    (default: the one FP32 engine). ``torch_baseline``: time PyTorch eager FP32 of the same network (rebuilt from
    the ONNX metadata or ``checkpoint``; skipped with the reason in ``notes`` when it cannot be).
    ``compare_plain``: also time the same depth without SE. ``probe``: measure the GEMM ceilings.
    ``batches``: None is :data:`DEFAULT_BATCHES`, or the engines' fixed batch when they have one.
    ``label_offset``: model output k + offset is dataset class k (1001-class models with a background class: 1);
    None: the offset the engines record (``build-engine --label-offset``), else 0.
    A reference whose graph ends in Softmax is compared on log-probabilities (softmax(log p) = p, so agreement
    and KL keep their meaning; said in ``notes``). ``peers``: also time and score OpenVINO FP32 and OpenVINO + NNCF
    INT8 of the reference's FP32 ONNX (:mod:`sedeploy.bench.peers`; NNCF calibrates on the build's images, or on
    ``peer_calib``).
    ``out_dir``: write results.json/csv/md and the plots. Budgets fill ``results["gate"]["violations"]`` (the
    caller decides the exit code). Raises :class:`SedeployError` for bad input, :class:`BenchInterrupted` on
    Ctrl-C after writing the partial results.
    """
    return run_bench_with(BenchOptions(
        engines=engines, images=images, labels=labels, batches=batches, threads=threads, warmup=warmup,
        repeats=repeats, max_seconds=max_seconds, reference=reference, torch_baseline=torch_baseline,
        checkpoint=checkpoint, compare_plain=compare_plain, probe=probe, probe_seconds=probe_seconds, out_dir=out_dir,
        plots=plots, progress=progress, max_top1_drop=max_top1_drop, min_agreement=min_agreement,
        image_limit=image_limit, eval_batch=eval_batch, synsets=synsets, providers=providers,
        optimization=optimization, settle=settle, label_offset=label_offset, peers=peers, peer_calib=peer_calib))


def run_bench_with(opts: BenchOptions) -> dict[str, Any]:
    """:func:`run_bench` with its options as one :class:`BenchOptions` record."""
    check_omp_num_threads()  # OMP_NUM_THREADS=0 would slow the PyTorch baseline 13× and be reported as its speed
    sizes = opts.check()
    out = None
    made = missing_dirs(opts.out_dir) if opts.out_dir is not None else []
    try:
        if opts.out_dir is not None:
            out = ensure_writable_dir(opts.out_dir, "results folder (--out)",
                                      fix="choose another --out folder, or fix its permissions")
        # one bench at a time per results folder; the files are published as one set (report.write_reports)
        with (folder_lock(out, what="results folder", command="bench", option="--out DIR") if out is not None
              else contextlib.nullcontext()):
            return _run(opts, out, sizes)
    except BaseException:
        remove_empty_dirs(made)  # a results folder this run made and wrote nothing into is not left behind
        raise


def _run(opts: BenchOptions, out: Path | None, sizes: list[int]) -> dict[str, Any]:
    """:func:`run_bench` after its options were checked and the results folder made."""
    job = _describe(opts, out, sizes)
    _open(job)
    job.config = _config(job)
    tmp = tempfile.TemporaryDirectory(prefix="sedeploy-bench-")
    try:
        try:
            _measure(job, Path(tmp.name))
        except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM raised as a KeyboardInterrupt subclass by the CLI
            raise _Interrupted(job.state["stage"], getattr(err, "signal_name", "Ctrl-C")) from None
    except _Interrupted as stop:
        text = stop.stage if stop.stage.startswith("interrupted") else \
            f"interrupted ({stop.signal_name}) during {stop.stage}"
        results = _assemble(job, complete=False, interrupted=text)
        files = write_reports(results, out, plots=opts.plots, locked=True) if out is not None else {}
        raise BenchInterrupted(results, files) from None
    finally:
        for r in (*job.runners.values(), *job.extra_runners.values()):
            r.deactivate()
        tmp.cleanup()
    return _finish(job)


def _describe(opts: BenchOptions, out: Path | None, sizes: list[int]) -> _Job:
    """Step 1: the engines described and checked, a bad labels or synsets file refused, the images listed."""
    if out is not None and opts.plots:
        require_matplotlib()
    threads = default_threads() if opts.threads is None else opts.threads
    specs = [E.describe_engine(p) for p in E.expand_engine_paths(opts.engines)]
    S.check_classifiers(specs)
    S.unique_names(specs)
    ref = S.pick_reference(specs, opts.reference)
    specs.sort(key=lambda s: s is not ref)  # the reference first: tables read from it
    S.check_same_model(specs, ref)
    notes = ["Timings were taken interleaved (round-robin, rotated order): compare engines by their ratios; "
             "absolute figures depend on the machine's load (see machine.loadavg)."]
    sizes, why = S.choose_batches(specs, None if opts.batches is None else sizes, DEFAULT_BATCHES)
    if why:
        notes.append(why)
    offset, clash = S.label_offset_for(specs, opts.label_offset)
    if clash:  # printed once, with the notes
        notes.append(f"WARNING: {clash}")
    job = _Job(opts, out, sizes, threads, specs, ref, E.preprocess_for(ref), notes, label_offset=offset)
    if opts.labels is not None:  # a bad labels file is reported before any engine is opened
        read_labels_file(opts.labels)
    if opts.synsets is not None:
        read_synset_table(opts.synsets)
    if opts.images is not None:
        job.found = find_images(opts.images, what="benchmark image folder (--images)")
        if opts.image_limit:
            job.found.paths = job.found.paths[:opts.image_limit]
    return job


def _open(job: _Job) -> None:
    """Step 2: the runners opened (and the peers made), the reference checked, labels resolved, the head loaded.
    Every runner opened is closed again when a step fails."""
    opts = job.opts
    job.flops = E.model_flops(job.ref)
    try:
        for s in job.specs:
            job.runners[s.name] = E.start_runner(s, threads=job.threads, providers=opts.providers,
                                                 optimization=opts.optimization)
            job.runners[s.name].input_layout = s.layout  # NHWC engines are fed channels-last
        if opts.peers:
            _add_peers(job)
        _check_reference(job)
        _resolve_labels(job)
        for s in job.specs:
            job.infos.append(E.engine_info(s, job.flops, job.runners[s.name], job.runners[s.name].runs_on()))
            if (note := job.runners[s.name].precision_note()) is not None:
                job.notes.append(f"Precision: {note}.")
        if job.found is not None:
            job.head = load_head(job.found.paths, job.pp, max(max(job.sizes), CHECK_IMAGES),
                                 f"image folder '{job.found.root}'")
    except BaseException:
        for r in job.runners.values():
            r.deactivate()
        raise


def _add_peers(job: _Job) -> None:
    for peer in make_peers(job.ref, job.pp, threads=job.threads, calib=job.opts.peer_calib):
        if peer.spec.name in job.runners:
            raise SedeployError(f"An engine is named like the peer '{peer.spec.name}'.",
                                fix="rename that engine file")
        job.runners[peer.spec.name] = peer.runner.activate()
        job.runners[peer.spec.name].input_layout = peer.spec.layout
        job.specs.append(peer.spec)
        job.peer_rows[peer.spec.name] = peer.about
        job.notes.append(f"Peer {peer.spec.name}: {peer.about}.")


def _check_reference(job: _Job) -> None:
    """The reference's outputs on a smooth image must be finite: every drift figure is measured against them."""
    ref, runner = job.ref, job.runners[job.ref.name]
    probe_x = smooth_noise(ref.static_batch or 1, job.pp.shape, seed=0)
    ref_out = np.asarray(runner.infer(prepare_batch(runner, probe_x)))
    if not np.isfinite(ref_out).all():  # refused before any timing
        raise VerificationError(f"The reference engine '{ref.name}' ({ref.path}) returned non-finite outputs "
                                f"(NaN/Inf in {int((~np.isfinite(ref_out)).sum())} of {ref_out.size} values) "
                                "on a smooth test image.",
                                expected="finite outputs from the FP32 reference (agreement, KL and top-1 "
                                         "drop are measured against it)",
                                fix="check the model's weights (rebuild it with build-engine, which verifies "
                                    "its outputs), or pick another --reference")
    job.num_classes = int(ref_out.shape[1])
    if ref.num_classes is None:
        ref.num_classes = job.num_classes


def _resolve_labels(job: _Job) -> None:
    opts, found = job.opts, job.found
    if found is not None:
        job.lab = resolve_labels_offset(found.paths, found.root, num_classes=job.num_classes,
                                        labels_file=opts.labels, synsets=opts.synsets,
                                        label_offset=job.label_offset)
        if job.lab is not None and job.num_classes == 1001 and not job.label_offset:
            hint = ("The model has 1001 outputs and no label offset was given or recorded: if output 0 is a "
                    "background class, top-1 is scored against the wrong classes; pass --label-offset 1.")
            job.notes.append(f"WARNING: {hint}")
        if job.lab is None and opts.max_top1_drop is not None:
            raise SedeployError(f"--max-top1-drop needs labels, but '{found.root}' is a flat folder without a "
                                "labels file.", fix="pass --labels FILE (file<TAB>class index), or gate on "
                                                    "--min-agreement instead")
    if len(job.specs) < 2 and opts.budget:
        raise SedeployError("An accuracy budget was given but there is only the reference engine to compare.",
                            fix="benchmark at least one engine besides the FP32 reference")


def _config(job: _Job) -> dict[str, Any]:
    o = job.opts
    return {"engines_given": [str(p) for p in o.engines], "threads": job.threads,
            "images": str(o.images) if o.images else None, "labels_file": str(o.labels) if o.labels else None,
            "image_limit": o.image_limit, "n_images": 0, "eval_batch": o.eval_batch,
            "preprocess": job.pp.as_dict(), "max_top1_drop_pts": o.max_top1_drop, "min_agreement_pct": o.min_agreement,
            "optimization": o.optimization, "torch_baseline": o.torch_baseline, "compare_plain": o.compare_plain,
            "weights": str(job.ref.meta.get(META.WEIGHTS) or "unknown (not recorded in the model)"),
            "label_offset": job.label_offset,
            "peers": job.peer_rows or None}


def _measure(job: _Job, tmp: Path) -> None:
    """Steps 3–6: the ceiling probe, the extra rows, the timing, the accuracy pass."""
    opts, state = job.opts, job.state
    if opts.probe and any(i.device == "cpu" for i in job.infos):
        state["stage"] = "the GEMM ceiling probe"
        state["ceilings"] = machine_ceilings(threads=job.threads, seconds=opts.probe_seconds)
    elif not opts.probe:
        job.notes.append("No ceiling probe (--no-probe): achieved GFLOP/s are not related to a ceiling.")
    if opts.torch_baseline:
        _add_torch_baseline(job)
    if opts.compare_plain:
        state["stage"] = "exporting the plain (no SE) model"
        made = plain_engine(job.ref, tmp, job.threads)
        if isinstance(made, str):
            job.notes.append(f"--compare-plain skipped: {made}.")
            job.config["compare_plain"] = f"skipped: {made}"
        else:
            job.extra_runners[made[1].name] = made[0]
            job.infos.append(made[1])
    _time(job)
    if job.found is not None:
        _score(job)
    else:
        job.notes.append("No image folder: speed only (pass --images for accuracy and drift).")


def _add_torch_baseline(job: _Job) -> None:
    job.state["stage"] = "building the PyTorch baseline"
    ref, runner = job.ref, job.runners[job.ref.name]
    check = job.head[:CHECK_IMAGES] if job.head is not None else smooth_noise(CHECK_IMAGES, job.pp.shape, seed=2)
    ref_logits = np.concatenate([pad_run(runner, prepare_batch(runner, c[None]), ref.static_batch) for c in check])
    with torch_threads(job.threads):
        torch_runner, why = torch_baseline(ref, check, ref_logits, checkpoint=job.opts.checkpoint)
    if torch_runner is None:
        job.notes.append(f"PyTorch baseline skipped: {why}.")
        job.config["torch_baseline"] = f"skipped: {why}"
        return
    job.extra_runners[TORCH_NAME] = torch_runner
    first = job.infos[0]
    job.infos.append(EngineInfo(name=TORCH_NAME, model=first.model, precision="fp32",
                                gflops_total=first.gflops_total, depth=first.depth, flavour="eager channels_last",
                                backend="pytorch", device="cpu", gflops_seed=first.gflops_seed,
                                info={"source": why, "threads": job.threads}))
    job.config["torch_baseline"] = why


def _time(job: _Job) -> None:
    opts = job.opts
    job.state["stage"] = "timing"
    pool = job.head if job.head is not None else smooth_noise(max(job.sizes), job.pp.shape, seed=0)
    runners = {**job.runners, **job.extra_runners}
    with torch_threads(job.threads), timing_bar(job.sizes, opts.repeats, len(job.runners) + len(job.extra_runners),
                                                  opts.progress) as on_round:
        timing = time_runners(runners, pool, batch_sizes=job.sizes, warmup=opts.warmup, repeats=opts.repeats,
                              max_seconds=opts.max_seconds, settle=opts.settle, on_round=on_round)
    job.state["timing"] = timing
    if not timing.complete:
        raise _Interrupted(timing.interrupted or "timing")


def _score(job: _Job) -> None:
    opts, found, ref = job.opts, job.found, job.ref
    job.state["stage"] = "the accuracy pass"
    probabilities = outputs_probabilities(ref)
    if probabilities:
        job.notes.append("The models end in Softmax: agreement, KL and drift are computed on "
                         "log-probabilities (max |Δlogit| is then a difference of log-probabilities).")
    drifts, scored, bad, complete = accuracy_pass(job.specs, job.runners, found.paths, job.pp, opts.eval_batch,
                                                  opts.progress, probabilities=probabilities,
                                                  what=f"image folder '{found.root}'")
    job.config["n_images"] = len(scored)
    lab = job.lab
    if lab is not None and scored and len(scored) != len(found.paths):
        # labels of the images that decode (as if the folder had been decoded whole), then of those scored
        lab = resolve_labels_offset([p for p in found.paths if p not in bad], found.root,
                                    num_classes=job.num_classes, labels_file=opts.labels, synsets=opts.synsets,
                                    label_offset=job.label_offset)
        job.lab = lab = dataclasses.replace(lab, indices=lab.indices[:len(scored)])
    if scored:
        job.state["accuracy"] = {n: {**d.result(lab.indices if lab is not None else None), "reference": ref.name}
                                 for n, d in drifts.items()}
    if not complete:
        raise _Interrupted(f"the accuracy pass after {len(scored)} of {len(found.paths)} image files "
                           "(figures cover those)")


def _finish(job: _Job) -> dict[str, Any]:
    """Step 7: the results assembled, the CI gate applied, the files written."""
    opts, out = job.opts, job.out
    results = _assemble(job, complete=True, interrupted=None)
    violations = check_budget(results, opts.max_top1_drop, opts.min_agreement) if opts.budget else []
    # non-finite outputs fail the gate with or without a budget: a NaN engine is broken, whatever its figures say
    violations += [v for v in nonfinite_violations(results) if v not in violations]
    if opts.budget or violations:
        results["gate"] = {"max_top1_drop_pts": opts.max_top1_drop, "min_agreement_pct": opts.min_agreement,
                           "violations": violations, "passed": not violations}
    if out is not None:
        write_reports(results, out, plots=opts.plots, locked=True)
        results["files"] = {k: str(out / v) for k, v in FILES.items() if (out / v).exists()}
    return results


def _assemble(job: _Job, *, complete: bool, interrupted: str | None) -> dict[str, Any]:
    state, infos, lab, flops = job.state, job.infos, job.lab, job.flops
    timing = state["timing"]
    if timing is not None:
        known = set(timing.engines)
        infos = [i for i in infos if i.name in known]
    results = assemble_results(infos, timing, accuracy=state["accuracy"], ceilings=state["ceilings"],
                               reference=job.ref.name, config=job.config,
                               labels=lab.as_dict() if lab is not None else None, complete=complete,
                               interrupted=interrupted)
    results["notes"] = list(job.notes)
    results["flops"] = {"gflops_seed": flops["gflops_seed"], "gflops_total": flops["gflops_total"],
                        "source": flops["flops_source"]}
    results["se_cost"] = se_cost(results, timing)
    results["gate"] = None
    return results


def bench_command_summary(results: dict[str, Any]) -> str:
    """What `sedeploy bench` prints: the report table, then FLOPs, SE cost, notes, gate verdict and files."""
    parts = [format_table(results).rstrip()]
    fl = results.get("flops") or {}
    if fl.get("gflops_total") is not None:
        seed = fl.get("gflops_seed")
        parts.append(f"FLOPs per image: {fl['gflops_total']:.3g} GFLOP total"
                     + (f" ({seed:.3g} G multiply-adds, model-zoo convention)" if seed is not None else "")
                     + f" — {fl.get('source')}")
    for row in results.get("se_cost") or []:
        t, f = row["se_time_over_plain"], row["se_flops_over_plain"]
        if t is not None:
            parts.append(f"SE cost at batch {row['batch']}: {row['engine']} takes {t:.2f}× the time of "
                         f"{row['plain']}" + (f" for {f:.3f}× the FLOPs" if f else ""))
    parts += [n for n in results.get("notes") or [] if not n.startswith("Timings were taken interleaved")]
    gate = results.get("gate")
    if gate:
        if gate["passed"]:
            parts.append("Accuracy budget: PASS")
        else:
            parts.append("Accuracy budget: FAIL")
            parts += [f"  {v}" for v in gate["violations"]]
    if not results.get("complete", True):
        parts.append(f"INCOMPLETE: {results.get('interrupted')}")
    files = results.get("files")
    if files:
        parts.append("Wrote " + ", ".join(files.values()))
    return "\n".join(parts) + "\n"
