"""`bench`: throughput, latency and top-1 drift of engines, timed interleaved in one run."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from sedeploy.bench.run import BenchInterrupted, bench_command_summary, run_bench
from sedeploy.cli.build_cmd import DEFAULT_ENGINES
from sedeploy.cli.core import emit, handle_errors, progress, setup_logging, stop_word_and_code
from sedeploy.cli.options import INPUT, OUTPUT, json_and_verbose, label_offset, out, threads
from sedeploy.cli.parsing import parse_batch_list
from sedeploy.cli.sections import Command, option, stack
from sedeploy.errors import SedeployError
from sedeploy.layout import MANIFEST

#: `bench --batch` when not given (the library's own default, sedeploy.bench.run.DEFAULT_BATCHES, written out)
DEFAULT_BATCH_TEXT = "1,8,32"

TIMING = "Timing"
BASELINES = "Baselines and peers"
GATES = "CI gates"


def default_engines() -> Path:
    """A bare `sedeploy bench` benchmarks engines/, where build-engine writes."""
    if not (DEFAULT_ENGINES / MANIFEST).is_file():
        state = f"has no {MANIFEST}" if DEFAULT_ENGINES.is_dir() else "does not exist"
        raise SedeployError(f"No ENGINES given, and the default folder '{DEFAULT_ENGINES}/' (where build-engine "
                            f"writes) {state}.",
                            expected="engine files (.onnx, .plan) or a folder written by `sedeploy build-engine`",
                            fix="run `sedeploy build-engine` first (it writes engines/), or pass the engines, "
                                "e.g. sedeploy bench my-engines/")
    logging.getLogger("sedeploy").info("No ENGINES given: benchmarking %s/ (build-engine's default output folder).",
                                       DEFAULT_ENGINES)
    return DEFAULT_ENGINES


bench_options = stack(
    option("--images", type=click.Path(path_type=Path), section=INPUT,
           help="Image folder: flat (agreement only) or class subfolders named by synset or class index."),
    option("--labels", type=click.Path(path_type=Path), section=INPUT,
           help="Labels file: 'file<TAB>class index (or synset)' per line, paths relative to --images."),
    option("--synsets", type=click.Path(path_type=Path), section=INPUT,
           help="Class-order table when the model's classes are not the sorted ImageNet-1k synsets."),
    option("--image-limit", type=int, section=INPUT, help="Use only the first N images (sorted)."),
    label_offset,
    option("--reference", section=INPUT,
           help="Engine (name or path) that drift is measured against [default: the FP32 one]."),
    option("--batch", "batches", default=None, section=TIMING,
           help=f"Comma-separated batch sizes [default: {DEFAULT_BATCH_TEXT}; the engines' batch when they have a "
                "fixed one]."),
    threads,
    option("--warmup", type=int, default=3, show_default=True, section=TIMING,
           help="Untimed runs per engine and batch."),
    option("--repeats", type=int, default=20, show_default=True, section=TIMING,
           help="Timed runs per engine and batch."),
    option("--settle", type=click.IntRange(min=0), default=1, show_default=True, section=TIMING,
           help="Untimed calls of the same engine right before each timed one, so the timed call is warm as in "
                "steady serving (0: cold calls right after other engines, about 2× slower at batch 1 here)."),
    option("--max-seconds", type=float, section=TIMING, help="Time budget per batch size for the timed rounds."),
    option("--probe/--no-probe", default=True, show_default=True, section=TIMING,
           help="Measure this machine's fp32/int8 GEMM ceiling first (for achieved-GFLOP/s fractions)."),
    option("--torch-baseline/--no-torch-baseline", default=True, show_default=True, section=BASELINES,
           help="Time PyTorch eager FP32 (channels_last) of the same model in the same run."),
    option("--checkpoint", section=BASELINES,
           help="Checkpoint the engines were exported from (for the PyTorch baseline)."),
    option("--compare-plain", is_flag=True, section=BASELINES,
           help="Also time the same depth without SE: what SE costs."),
    option("--peers", is_flag=True, section=BASELINES,
           help="Also time and score OpenVINO FP32 and OpenVINO + NNCF INT8 (NNCF's default preset, on the "
                "images sedeploy calibrated on) of the same FP32 ONNX, interleaved with the engines "
                "(`pip install 'sedeploy[peers]'`)."),
    option("--peer-calib", type=click.Path(path_type=Path), section=BASELINES,
           help="Calibration images for the NNCF peer [default: those recorded in the build's manifest.json]."),
    option("--max-top1-drop", type=float, section=GATES, help="Exit 1 if any engine loses more top-1 points."),
    option("--min-agreement", type=float, section=GATES,
           help="Exit 1 if any engine's top-1 agreement (%) is lower."),
    out("Write results.json, results.csv, results.md and PNG plots here.", type=click.Path(path_type=Path)),
    option("--no-plots", is_flag=True, section=OUTPUT, help="Skip the PNG plots."),
    json_and_verbose,
)


@click.command(cls=Command)
@click.argument("engines", nargs=-1, type=click.Path(path_type=Path))
@bench_options
@handle_errors
def bench(engines, batches, out, no_plots, as_json, verbose, **library_options):
    """Throughput, latency and top-1 drift of engines, timed interleaved in one run, against FLOPs.

    \b
    ENGINES are ONNX artifacts/engines, TensorRT .plan files (with their .trt.json), OpenVINO .ov.xml files
    (with their .ov.bin and .ov.json), or a build-engine output folder (its manifest.json lists them)
    [default: engines/, where build-engine writes]. One must be FP32: drift is measured against it.
    \b
    Examples:
      sedeploy bench                                            engines/ at batch 1, 8, 32
      sedeploy bench engines/ --images val/ --labels val.tsv    + top-1/top-5, flips, KL vs FP32
      sedeploy bench engines/ --images val/ -o results/         + results.json/.csv/.md and plots
      sedeploy bench engines/ --images val/ --max-top1-drop 0.5 --min-agreement 99 --batch 8
                                                                CI gate: exit 1 when a budget is exceeded
    The timer covers one engine call on a host batch (on GPU: host↔device copies included), right after
    --settle untimed calls of the same engine.
    """
    setup_logging(verbose)
    sizes = parse_batch_list(batches) if batches is not None else None
    if not engines:
        engines = (default_engines(),)
    try:
        res = run_bench(list(engines), batches=sizes, out_dir=out, plots=not no_plots, progress=progress(as_json),
                        **library_options)
    except BenchInterrupted as stop:  # partial results were written, marked complete: false
        click.echo(bench_command_summary(stop.results), err=True)
        word, code = stop_word_and_code()
        click.echo(f"{word}: partial results (complete: false) written to "
                   + (", ".join(map(str, stop.files.values())) or "nowhere (no --out)"), err=True)
        sys.exit(code)
    summary = {k: v for k, v in res.items() if k != "engines"}
    summary["engines"] = [{**e, "batch": {b: {k: v for k, v in st.items() if k != "samples_s"}
                                          for b, st in e["batch"].items()}} for e in res["engines"]]
    emit(summary, as_json, bench_command_summary(res))
    if res.get("gate") and not res["gate"]["passed"]:
        sys.exit(1)
