"""The `sedeploy bench` job: engines in, one results dict (and its files) out.

Order of work, chosen so that every mistake surfaces before the long part and an interruption loses nothing:

1. **Checks** (seconds): output folder writable, engines described from their metadata, one model
   (:func:`~sedeploy.bench.engines.check_same_model`), batch sizes within every engine's limits, labels resolved
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
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sedeploy.bench import engines as E
from sedeploy.bench.accuracy import Drift, check_budget, nonfinite_violations
from sedeploy.bench.report import EngineInfo, FILES, assemble_results, format_table, require_matplotlib, \
    write_reports
from sedeploy.backends.timing import check_timing_config, paired_speedup, time_runners
from sedeploy.errors import SedeployError, VerificationError
from sedeploy.fsutil import ensure_writable_dir, folder_lock, missing_dirs, remove_empty_dirs
from sedeploy.onnxcore import META, check_threads, pad_to_batch
from sedeploy.preprocess import layout_batch

log = logging.getLogger("sedeploy")

__all__ = ["run_bench", "BenchInterrupted", "bench_command_summary", "DEFAULT_BATCHES"]

DEFAULT_BATCHES = (1, 8, 32)
TORCH_NAME = "pytorch-eager-fp32"
#: images used to check that the PyTorch baseline is the engines' network
_CHECK_IMAGES = 4


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a benchmark: ``results`` (``complete`` False) were written to ``files`` (when out_dir)."""

    def __init__(self, results: dict[str, Any], files: dict[str, Path]):
        super().__init__(results.get("interrupted") or "interrupted")
        self.results, self.files = results, files


class _Interrupted(Exception):
    def __init__(self, stage: str, signal_name: str = "Ctrl-C"):
        super().__init__(stage)
        self.stage, self.signal_name = stage, signal_name


def _check_args(batches, warmup, repeats, max_top1_drop, min_agreement, image_limit, images, labels) -> list[int]:
    sizes = check_timing_config(batches, warmup, repeats, min(3, repeats) if repeats >= 1 else 1, None)
    if max_top1_drop is not None and not (isinstance(max_top1_drop, (int, float)) and max_top1_drop >= 0):
        raise SedeployError(f"--max-top1-drop {max_top1_drop}.", expected="percentage points ≥ 0, e.g. 0.5")
    if min_agreement is not None and not (isinstance(min_agreement, (int, float)) and 0 <= min_agreement <= 100):
        raise SedeployError(f"--min-agreement {min_agreement}.", expected="a percentage from 0 to 100, e.g. 99")
    if image_limit is not None and image_limit < 1:
        raise SedeployError(f"--image-limit {image_limit}.", expected="a number of images ≥ 1, or no limit")
    if labels is not None and images is None:
        raise SedeployError("A labels file was given without an image folder.",
                            fix="pass --images DIR (the folder the labels file names files in)")
    if images is None and (max_top1_drop is not None or min_agreement is not None):
        raise SedeployError("An accuracy budget (--max-top1-drop / --min-agreement) needs images to measure on.",
                            fix="pass --images DIR, or drop the budget")
    return sizes


def _engine_info(spec: E.EngineSpec, flops: dict[str, Any], runner, device: str) -> EngineInfo:
    meta = spec.meta
    info = {"path": str(spec.path), "flops_source": flops["flops_source"],
            "input_shape": list(spec.input_shape), "metadata": {k: v for k, v in meta.items()
                                                               if k != META.PREPROCESS}}
    describe = getattr(runner, "describe", None)
    if callable(describe):
        info["runner"] = describe()
    return EngineInfo(name=spec.name, model=str(meta.get(META.MODEL) or spec.path.name.split(".")[0]),
                      precision=spec.precision, gflops_total=_nan(flops["gflops_total"]),
                      depth=meta.get(META.DEPTH), flavour=spec.flavour, backend=spec.backend, device=device,
                      gflops_seed=flops["gflops_seed"], info=info)


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def _pad_run(runner, x: np.ndarray, static: int | None) -> np.ndarray:
    """Run a chunk; an engine with a static batch gets the chunk padded with its last image (rows dropped)."""
    if static is None or len(x) == static:
        return runner.infer(x)
    return runner.infer(pad_to_batch(x, static))[: len(x)]


def _prepare(runner, x: np.ndarray) -> np.ndarray:
    """An N×3×H×W batch as ``runner`` takes it: its layout (``input_layout``, set from the engine's description)
    and dtype."""
    x = layout_batch(x, getattr(runner, "input_layout", None))
    want = getattr(runner, "input_dtype", None)
    return x if want is None or np.dtype(want) == x.dtype else x.astype(want)


def _load_head(paths: list[Path], pp, count: int, what: str) -> np.ndarray:
    """The first ``count`` images of ``paths`` that decode (fewer when the folder has fewer): what the timing
    pool and the PyTorch check use. Raises the loader's error when no image of the folder decodes."""
    from sedeploy.preprocess import load_batch

    got: list[np.ndarray] = []
    have = 0
    for i in range(0, len(paths), count):
        try:
            x, _ = load_batch(paths[i:i + count], pp, what=what)
        except SedeployError:  # none of this block decodes (each file was named in a warning): try the next
            continue
        got.append(x[:count - have])
        have += len(got[-1])
        if have >= count:
            break
    if not got:
        raise SedeployError(f"None of the {len(paths)} image file(s) in the {what} could be decoded.",
                            fix="check the files are valid JPEG/PNG images, or pass another folder")
    return np.concatenate(got)


def _accuracy_pass(specs, runners, paths: list[Path], pp, chunk: int, progress: bool, *, probabilities: bool,
                   what: str) -> tuple[dict[str, Drift], list[Path], set[Path], bool]:
    """Score every engine against the reference (``specs[0]``) on ``paths``, streamed: images are decoded
    ``chunk`` files at a time and scored in batches of ``chunk`` decoded images (the same batches as if the
    whole folder had been decoded first), so memory holds two chunks, not the folder. Returns (drift per engine,
    the paths scored, the paths that did not decode, complete). An interruption keeps the whole batches scored by
    every engine."""
    from tqdm import tqdm

    from sedeploy.fsutil import signals_held
    from sedeploy.preprocess import load_batch

    ref = specs[0]
    drifts = {s.name: Drift() for s in specs}
    scored: list[Path] = []
    buf_x: list[np.ndarray] = []
    buf_p: list[Path] = []
    bad: set[Path] = set()
    complete = True

    def score(xb: np.ndarray) -> None:
        outs = {}
        for s in specs:
            size = s.static_batch or min(chunk, s.max_batch or chunk)
            got = [_pad_run(runners[s.name], _prepare(runners[s.name], xb[j:j + size]), s.static_batch)
                   for j in range(0, len(xb), size)]
            out = np.asarray(np.concatenate(got), np.float32)
            if probabilities:  # softmax(log p) = p: agreement and KL keep their meaning (said in the notes)
                out = np.log(np.maximum(out.astype(np.float64), 1e-30))
            outs[s.name] = out
        with signals_held():  # every engine's figures take this batch, or none does
            for name, out in outs.items():
                drifts[name].add(outs[ref.name], out)

    with tqdm(total=len(paths), desc="Accuracy", unit="img", disable=not progress, leave=False) as bar:
        try:
            for i in range(0, len(paths), chunk):
                block = paths[i:i + chunk]
                try:
                    x, loaded = load_batch(block, pp, what=what)
                except SedeployError:  # none of this block decodes (each file was named in a warning)
                    x, loaded = None, []
                bad.update(set(block) - set(loaded))
                if x is not None:
                    buf_x += list(x)
                    buf_p += loaded
                while len(buf_x) >= chunk or (i + chunk >= len(paths) and buf_x):
                    take = min(chunk, len(buf_x))
                    score(np.stack(buf_x[:take]))
                    scored += buf_p[:take]
                    del buf_x[:take], buf_p[:take]
                bar.update(len(block))
        except KeyboardInterrupt:
            complete = False
    return drifts, scored, bad, complete


def _outputs_probabilities(spec: E.EngineSpec) -> bool:
    """Whether the reference engine (an ONNX file) ends in Softmax; other engine files cannot be read as graphs."""
    from sedeploy.onnxcore import load_onnx, output_kind

    if spec.path.suffix != ".onnx":
        return False
    return output_kind(load_onnx(spec.path, check=False)) == "probabilities"


def _plain_engine(ref: E.EngineSpec, tmp: Path, threads: int) -> tuple[Any, EngineInfo] | str:
    """The same depth and width without SE, exported FP32 into ``tmp``; or the reason it cannot be made."""
    from sedeploy.onnxcore import default_opset
    from sedeploy.backends.ort import OrtRunner
    from sedeploy.export import export_onnx
    from sedeploy.flops import count_complexity
    from sedeploy.model import build_model

    depth = ref.meta.get(META.DEPTH)
    if depth is None:
        return f"the reference {ref.name} carries no depth metadata (not exported by sedeploy)"
    width = E.stem_width(ref)
    if width is None:
        return f"the stem width of {ref.name} cannot be read from its ONNX graph (not found beside the engine)"
    proto = E.load_light(E.source_onnx(ref.path, ref.sidecar))
    # the reference's opset, so both graphs come from the same exporter (dynamo ≥ 18, TorchScript below)
    opset = default_opset(proto) or 18
    net = build_model(int(depth), se=False, num_classes=int(ref.num_classes or 1000), base_channels=width, seed=0)
    size = ref.input_size or 224
    path = export_onnx(net, tmp / f"{net.spec.name}.onnx", input_size=size, opset=max(13, min(opset, 18)))
    cx = count_complexity(net, size)
    runner = OrtRunner(path, threads=threads).activate()
    name = f"{net.spec.name}-plain-fp32"
    info = EngineInfo(name=name, model=net.spec.name, precision="fp32", gflops_total=cx.total_gflops,
                      depth=int(depth), flavour="no-SE", backend="ort", device="cpu",
                      gflops_seed=cx.seed_macs / 1e9,
                      info={"path": "(temporary)", "flops_source": "sedeploy.flops", "runner": runner.describe(),
                            "opset": max(13, min(opset, 18)), "note": "random weights: timed only, no accuracy"})
    return runner, info


def _check_classifiers(specs) -> None:
    """Every ONNX engine must be an image classifier (one N×classes output): refuse anything else up front."""
    from sedeploy.onnxcore import classifier_output, load_onnx

    for s in specs:
        if s.backend == "ort":
            classifier_output(load_onnx(s.path, weights=False, check=False), path=str(s.path))


@contextlib.contextmanager
def _timing_bar(sizes: Sequence[int], repeats: int, n_engines: int, progress: bool):
    """A tqdm bar over the timed rounds (all batch sizes) on stderr, or nothing when ``progress`` is off."""
    if not progress:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=len(sizes) * repeats, desc="Timing", unit="round", leave=False,
              postfix=f"{n_engines} engines interleaved") as bar:
        done: dict[int, int] = {}

        def on_round(b: int, rounds: int) -> None:
            bar.set_description(f"Timing batch {b}")
            bar.update(rounds - done.get(b, 0))
            done[b] = rounds

        yield on_round


@contextlib.contextmanager
def _torch_threads(threads: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_bench(engines: Sequence[str | Path], *, images: str | Path | None = None, labels: str | Path | None = None,
              batches: Sequence[int] = DEFAULT_BATCHES, threads: int | None = None, warmup: int = 3,
              repeats: int = 20, max_seconds: float | None = None, reference: str | None = None,
              torch_baseline: bool = True, checkpoint: str | None = None, compare_plain: bool = False,
              probe: bool = True, probe_seconds: float = 2.0, out_dir: str | Path | None = None, plots: bool = True,
              progress: bool = True, max_top1_drop: float | None = None, min_agreement: float | None = None,
              image_limit: int | None = None, eval_batch: int = 32, synsets: str | Path | None = None,
              providers=None, optimization: str = "all", settle: int = 1, label_offset: int = 0,
              peers: bool = False, peer_calib: str | Path | None = None) -> dict[str, Any]:
    """Benchmark ``engines`` (files, or ``build-engine`` output folders) and return the results dict
    (:mod:`sedeploy.bench.report` schema, plus ``notes``, ``gate``, ``flops`` and ``se_cost``).

    ``images``: a folder (flat or class subfolders; ``labels``: a ``file<TAB>index`` file for it), first
    ``image_limit`` files in sorted order; without it only speed is measured. ``reference``: engine name or path
    (default: the one FP32 engine). ``torch_baseline``: time PyTorch eager FP32 of the same network (rebuilt from
    the ONNX metadata or ``checkpoint``; skipped with the reason in ``notes`` when it cannot be).
    ``compare_plain``: also time the same depth without SE. ``probe``: measure the GEMM ceilings.
    ``label_offset``: model output k + offset is dataset class k (1001-class models with a background class: 1).
    A reference whose graph ends in Softmax is compared on log-probabilities (softmax(log p) = p, so agreement
    and KL keep their meaning; said in ``notes``). ``peers``: also time and score OpenVINO FP32 and OpenVINO + NNCF
    INT8 of the reference's FP32 ONNX (:mod:`sedeploy.bench.peers`; NNCF calibrates on the build's images, or on
    ``peer_calib``).
    ``out_dir``: write results.json/csv/md and the plots. Budgets fill ``results["gate"]["violations"]`` (the
    caller decides the exit code). Raises :class:`SedeployError` for bad input, :class:`BenchInterrupted` on
    Ctrl-C after writing the partial results.
    """
    from sedeploy.machine import check_omp_num_threads

    check_omp_num_threads()  # OMP_NUM_THREADS=0 would slow the PyTorch baseline 13× and be reported as its speed
    sizes = _check_args(batches, warmup, repeats, max_top1_drop, min_agreement, image_limit, images, labels)
    if eval_batch < 1:
        raise SedeployError(f"Accuracy batch {eval_batch}.", expected="a positive integer, e.g. 32")
    check_threads(threads)
    out = None
    if out_dir is not None and images is not None:
        o, i = Path(out_dir).resolve(), Path(images).resolve()
        if o == i or i in o.parents:  # the next run would score the plots as images
            raise SedeployError(f"The results folder (--out) '{out_dir}' is inside the image folder (--images) "
                                f"'{images}'.", expected="a results folder outside the images",
                                fix="pass another --out folder, e.g. --out bench-results")
    made = missing_dirs(out_dir) if out_dir is not None else []
    try:
        if out_dir is not None:
            out = ensure_writable_dir(out_dir, "results folder (--out)",
                                      fix="choose another --out folder, or fix its permissions")
        # one bench at a time per results folder; the files are published as one set (report.write_reports)
        with (folder_lock(out, what="results folder", command="bench", option="--out DIR") if out is not None
              else contextlib.nullcontext()):
            return _run(engines, out, images=images, labels=labels, sizes=sizes, threads=threads, warmup=warmup,
                        repeats=repeats, max_seconds=max_seconds, reference=reference, torch_baseline=torch_baseline,
                        checkpoint=checkpoint, compare_plain=compare_plain, probe=probe, probe_seconds=probe_seconds,
                        plots=plots, progress=progress, max_top1_drop=max_top1_drop, min_agreement=min_agreement,
                        image_limit=image_limit, eval_batch=eval_batch, synsets=synsets, providers=providers,
                        optimization=optimization, settle=settle, label_offset=label_offset, peers=peers,
                        peer_calib=peer_calib)
    except BaseException:
        remove_empty_dirs(made)  # a results folder this run made and wrote nothing into is not left behind
        raise


def _run(engines, out: Path | None, *, images, labels, sizes, threads, warmup, repeats, max_seconds, reference,
         torch_baseline, checkpoint, compare_plain, probe, probe_seconds, plots, progress, max_top1_drop,
         min_agreement, image_limit, eval_batch, synsets, providers, optimization, settle, label_offset, peers,
         peer_calib) -> dict[str, Any]:
    """:func:`run_bench` after its arguments were checked and the results folder made."""
    from sedeploy.backends.ort import default_threads
    from sedeploy.labels import resolve_labels_offset
    from sedeploy.preprocess import find_images, smooth_noise

    if out is not None and plots:
        require_matplotlib()
    threads = default_threads() if threads is None else threads
    specs = [E.describe_engine(p) for p in E.expand_engine_paths(engines)]
    _check_classifiers(specs)
    E.unique_names(specs)
    ref = E.pick_reference(specs, reference)
    specs.sort(key=lambda s: s is not ref)  # the reference first: tables read from it
    E.check_same_model(specs, ref)
    E.check_batches(specs, sizes)
    pp = E.preprocess_for(ref)
    notes: list[str] = ["Timings were taken interleaved (round-robin, rotated order): compare engines by their "
                        "ratios; absolute figures depend on the machine's load (see machine.loadavg)."]

    found = None
    if labels is not None:  # a bad labels file is reported before any engine is opened
        from sedeploy.labels import read_labels_file

        read_labels_file(labels)
    if synsets is not None:
        from sedeploy.classes import read_synset_table

        read_synset_table(synsets)
    if images is not None:
        found = find_images(images, what="benchmark image folder (--images)")
        if image_limit:
            found.paths = found.paths[:image_limit]

    runners: dict[str, Any] = {}
    infos: list[EngineInfo] = []
    flops = E.model_flops(ref)
    try:
        for s in specs:
            runners[s.name] = E.start_runner(s, threads=threads, providers=providers, optimization=optimization)
            runners[s.name].input_layout = s.layout  # NHWC engines are fed channels-last
        peer_rows: dict[str, str] = {}
        if peers:
            from sedeploy.bench.peers import make_peers

            for peer in make_peers(ref, pp, threads=threads, calib=peer_calib):
                if peer.spec.name in runners:
                    raise SedeployError(f"An engine is named like the peer '{peer.spec.name}'.",
                                        fix="rename that engine file")
                runners[peer.spec.name] = peer.runner.activate()
                runners[peer.spec.name].input_layout = peer.spec.layout
                specs.append(peer.spec)
                peer_rows[peer.spec.name] = peer.about
                notes.append(f"Peer {peer.spec.name}: {peer.about}.")
        probe_x = smooth_noise(ref.static_batch or 1, pp.shape, seed=0)
        ref_out = np.asarray(runners[ref.name].infer(_prepare(runners[ref.name], probe_x)))
        if not np.isfinite(ref_out).all():  # every drift figure is measured against it: refuse before any timing
            raise VerificationError(f"The reference engine '{ref.name}' ({ref.path}) returned non-finite outputs "
                                    f"(NaN/Inf in {int((~np.isfinite(ref_out)).sum())} of {ref_out.size} values) "
                                    "on a smooth test image.",
                                    expected="finite outputs from the FP32 reference (agreement, KL and top-1 "
                                             "drop are measured against it)",
                                    fix="check the model's weights (rebuild it with build-engine, which verifies "
                                        "its outputs), or pick another --reference")
        num_classes = int(ref_out.shape[1])
        if ref.num_classes is None:
            ref.num_classes = num_classes
        lab = None
        if found is not None:
            lab = resolve_labels_offset(found.paths, found.root, num_classes=num_classes, labels_file=labels,
                                        synsets=synsets, label_offset=label_offset)
            if lab is None and max_top1_drop is not None:
                raise SedeployError(f"--max-top1-drop needs labels, but '{found.root}' is a flat folder without a "
                                    "labels file.", fix="pass --labels FILE (file<TAB>class index), or gate on "
                                                        "--min-agreement instead")
        if len(specs) < 2 and (max_top1_drop is not None or min_agreement is not None):
            raise SedeployError("An accuracy budget was given but there is only the reference engine to compare.",
                                fix="benchmark at least one engine besides the FP32 reference")
        for s in specs:
            infos.append(_engine_info(s, flops, runners[s.name], runners[s.name].runs_on()))
            if (note := runners[s.name].precision_note()) is not None:
                notes.append(f"Precision: {note}.")
        head = None  # the first images that decode: the timing pool and the PyTorch check (the folder streams later)
        if found is not None:
            head = _load_head(found.paths, pp, max(max(sizes), _CHECK_IMAGES), f"image folder '{found.root}'")
    except BaseException:
        for r in runners.values():
            r.deactivate()
        raise

    config = {"engines_given": [str(p) for p in engines], "threads": threads, "images": str(images) if images else
              None, "labels_file": str(labels) if labels else None, "image_limit": image_limit,
              "n_images": 0, "eval_batch": eval_batch,
              "preprocess": pp.as_dict(), "max_top1_drop_pts": max_top1_drop, "min_agreement_pct": min_agreement,
              "optimization": optimization, "torch_baseline": torch_baseline, "compare_plain": compare_plain,
              "weights": str(ref.meta.get(META.WEIGHTS) or "unknown (not recorded in the model)"),
              "peers": peer_rows or None}
    state: dict[str, Any] = {"ceilings": None, "timing": None, "accuracy": None, "stage": "setup"}
    extra_runners: dict[str, Any] = {}
    tmp = tempfile.TemporaryDirectory(prefix="sedeploy-bench-")
    try:
        try:
            if probe and any(i.device == "cpu" for i in infos):
                from sedeploy.bench.probe import machine_ceilings

                state["stage"] = "the GEMM ceiling probe"
                state["ceilings"] = machine_ceilings(threads=threads, seconds=probe_seconds)
            elif not probe:
                notes.append("No ceiling probe (--no-probe): achieved GFLOP/s are not related to a ceiling.")
            if torch_baseline:
                state["stage"] = "building the PyTorch baseline"
                check = head[:_CHECK_IMAGES] if head is not None else smooth_noise(_CHECK_IMAGES, pp.shape, seed=2)
                ref_logits = np.concatenate([_pad_run(runners[ref.name], _prepare(runners[ref.name], c[None]),
                                                      ref.static_batch) for c in check])
                with _torch_threads(threads):
                    runner, why = E.torch_baseline(ref, check, ref_logits, checkpoint=checkpoint)
                if runner is None:
                    notes.append(f"PyTorch baseline skipped: {why}.")
                    config["torch_baseline"] = f"skipped: {why}"
                else:
                    extra_runners[TORCH_NAME] = runner
                    infos.append(EngineInfo(name=TORCH_NAME, model=infos[0].model, precision="fp32",
                                            gflops_total=infos[0].gflops_total, depth=infos[0].depth,
                                            flavour="eager channels_last", backend="pytorch", device="cpu",
                                            gflops_seed=infos[0].gflops_seed,
                                            info={"source": why, "threads": threads}))
                    config["torch_baseline"] = why
            if compare_plain:
                state["stage"] = "exporting the plain (no SE) model"
                made = _plain_engine(ref, Path(tmp.name), threads)
                if isinstance(made, str):
                    notes.append(f"--compare-plain skipped: {made}.")
                    config["compare_plain"] = f"skipped: {made}"
                else:
                    extra_runners[made[1].name] = made[0]
                    infos.append(made[1])
            state["stage"] = "timing"
            pool = head if head is not None else smooth_noise(max(sizes), pp.shape, seed=0)
            with _torch_threads(threads), _timing_bar(sizes, repeats, len(runners) + len(extra_runners),
                                                      progress) as on_round:
                timing = time_runners({**runners, **extra_runners}, pool, batch_sizes=sizes, warmup=warmup,
                                      repeats=repeats, max_seconds=max_seconds, settle=settle, on_round=on_round)
            state["timing"] = timing
            if not timing.complete:
                raise _Interrupted(timing.interrupted or "timing")
            if found is not None:
                state["stage"] = "the accuracy pass"
                probabilities = _outputs_probabilities(ref)
                if probabilities:
                    notes.append("The models end in Softmax: agreement, KL and drift are computed on "
                                 "log-probabilities (max |Δlogit| is then a difference of log-probabilities).")
                drifts, scored, bad, complete = _accuracy_pass(specs, runners, found.paths, pp, eval_batch, progress,
                                                          probabilities=probabilities,
                                                          what=f"image folder '{found.root}'")
                config["n_images"] = len(scored)
                if lab is not None and scored and len(scored) != len(found.paths):
                    # labels of the images that decode (as if the folder had been decoded whole), then of those scored
                    lab = resolve_labels_offset([p for p in found.paths if p not in bad], found.root,
                                                num_classes=num_classes, labels_file=labels, synsets=synsets,
                                                label_offset=label_offset)
                    lab = dataclasses.replace(lab, indices=lab.indices[:len(scored)])
                if scored:
                    state["accuracy"] = {n: {**d.result(lab.indices if lab is not None else None),
                                             "reference": ref.name} for n, d in drifts.items()}
                if not complete:
                    raise _Interrupted(f"the accuracy pass after {len(scored)} of {len(found.paths)} image files "
                                       "(figures cover those)")
            else:
                notes.append("No image folder: speed only (pass --images for accuracy and drift).")
        except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM raised as a KeyboardInterrupt subclass by the CLI
            raise _Interrupted(state["stage"], getattr(err, "signal_name", "Ctrl-C")) from None
    except _Interrupted as stop:
        text = stop.stage if stop.stage.startswith("interrupted") else \
            f"interrupted ({stop.signal_name}) during {stop.stage}"
        results = _assemble(infos, state, ref, config, lab, notes, flops,
                            complete=False, interrupted=text)
        files = write_reports(results, out, plots=plots, locked=True) if out is not None else {}
        raise BenchInterrupted(results, files) from None
    finally:
        for r in (*runners.values(), *extra_runners.values()):
            r.deactivate()
        tmp.cleanup()

    results = _assemble(infos, state, ref, config, lab, notes, flops, complete=True, interrupted=None)
    budget = max_top1_drop is not None or min_agreement is not None
    violations = check_budget(results, max_top1_drop, min_agreement) if budget else []
    # non-finite outputs fail the gate with or without a budget: a NaN engine is broken, whatever its figures say
    violations += [v for v in nonfinite_violations(results) if v not in violations]
    if budget or violations:
        results["gate"] = {"max_top1_drop_pts": max_top1_drop, "min_agreement_pct": min_agreement,
                           "violations": violations, "passed": not violations}
    if out is not None:
        write_reports(results, out, plots=plots, locked=True)
        results["files"] = {k: str(out / v) for k, v in FILES.items() if (out / v).exists()}
    return results


def _assemble(infos, state, ref, config, lab, notes, flops, *, complete: bool, interrupted: str | None):
    timing = state["timing"]
    if timing is not None:
        known = set(timing.engines)
        infos = [i for i in infos if i.name in known]
    results = assemble_results(infos, timing, accuracy=state["accuracy"], ceilings=state["ceilings"],
                               reference=ref.name, config=config, labels=lab.as_dict() if lab is not None else None,
                               complete=complete, interrupted=interrupted)
    results["notes"] = list(notes)
    results["flops"] = {"gflops_seed": flops["gflops_seed"], "gflops_total": flops["gflops_total"],
                        "source": flops["flops_source"]}
    results["se_cost"] = _se_cost(results, timing)
    results["gate"] = None
    return results


def _se_cost(results: dict[str, Any], timing) -> list[dict[str, Any]] | None:
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
