"""The `sedeploy` command line: parse options, call one library function, print the result.

Human-readable output goes to stdout, progress bars and warnings to stderr. With ``--json`` stdout carries exactly
one JSON object, so scripts can parse it. Errors print one message (what was given, what is expected, how to fix)
and exit non-zero: 1 a bench budget exceeded (--max-top1-drop, --min-agreement) or an engine's outputs were not
finite, 2 bad input, 3 failed verification, 4 missing optional dependency, 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM: `timeout`, CI cancels, `docker stop`), 129 hung up (SIGHUP: the terminal or SSH session closed). Either
way nothing half-written is left behind.
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import math
import signal
import sys
from pathlib import Path

import click

from sedeploy.layout import MANIFEST
from sedeploy.backends import BACKENDS, BUILD_CHOICES
from sedeploy.errors import SedeployError

DEPTHS = ["18", "34", "50", "101", "152"]
#: where `build-engine` writes by default, and so what a bare `sedeploy bench` benchmarks
DEFAULT_ENGINES = Path("engines")
#: `bench --batch` when not given (the library's own default, sedeploy.bench.run.DEFAULT_BATCHES, written out)
DEFAULT_BATCH_TEXT = "1,8,32"


def _setup_logging(verbose: bool) -> None:
    """sedeploy's own messages on stderr (warnings always, explanations with -v); other libraries stay quiet."""
    logging.basicConfig(format="%(levelname)s: %(message)s", stream=sys.stderr, level=logging.WARNING)
    logging.getLogger("sedeploy").setLevel(logging.DEBUG if verbose else logging.INFO)


def _progress(as_json: bool) -> bool:
    """Progress bars only for a person watching: a terminal on stderr, and not --json."""
    return not as_json and sys.stderr.isatty()


def _emit(result: dict, as_json: bool, human: str) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(human)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that every cleanup (``finally``, ``atomic_path``) runs as
    for Ctrl-C. A KeyboardInterrupt subclass: code that cleans up on Ctrl-C cleans up on these too, and can name
    the signal by ``signal_name``; the CLI exits 128 + ``signum`` (143 SIGTERM, 129 SIGHUP)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__()
        self.signum = int(signum)
        self.signal_name = signal.Signals(signum).name


#: the signals that stop a command like Ctrl-C: SIGTERM (`timeout`, CI cancels, `docker stop`) and SIGHUP (the
#: terminal or SSH session closed). A SIGHUP ignored when the command started (`nohup`) stays ignored.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_TERMINATED: list[int] = []  # the signals that arrived (code that catches KeyboardInterrupt can tell)


def _on_stop_signal(signum, frame):
    _TERMINATED.append(signum)
    raise Terminated(signum)


def handle_errors(fn):
    """Turn library errors into one clear message and an exit code; never a traceback for user mistakes.

    SIGTERM and SIGHUP are handled like Ctrl-C (cleanup runs, one line is printed) and exit 128 + the signal's
    number: 143 (SIGTERM), 129 (SIGHUP)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = {}
        try:
            for sig in _STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's ignored SIGHUP stays ignored
                    previous[sig] = signal.signal(sig, _on_stop_signal)
        except ValueError:  # not the main thread (the CLI called from a library's thread): leave signals alone
            pass
        try:
            return fn(*args, **kwargs)
        except SedeployError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except Terminated as stop:
            click.echo(f"terminated ({stop.signal_name}): stopped; temporary files were removed and no output was "
                       "left half-written", err=True)
            sys.exit(128 + stop.signum)
        except KeyboardInterrupt:
            click.echo("interrupted: stopped; temporary files were removed and no output was left half-written",
                       err=True)
            sys.exit(130)
        except OSError as err:
            from sedeploy.fsutil import disk_full_error, is_disk_full

            if is_disk_full(err):
                click.echo(f"error: {disk_full_error(err.filename or '.', err)}", err=True)
                sys.exit(2)
            if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                where = f"'{err.filename}'" if err.filename else "a file"
                click.echo(f"error: cannot access {where} ({err.strerror or err}).\n  Fix: check the "
                           "permissions, or choose another path", err=True)
                sys.exit(2)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return wrapper


def common(fn):
    fn = click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results on stdout.")(fn)
    fn = click.option("-v", "--verbose", is_flag=True, help="Explain each decision on stderr.")(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="sedeploy")
def cli():
    """sedeploy: SE-ResNet (mmcls SE-ResNet-50/101) from PyTorch to verified, fast deployment engines.

    \b
    Typical flow (everything runs on a CPU; TensorRT is optional):
      sedeploy info --depth 50                       model card: params, FLOPs, SE blocks
      sedeploy export --depth 50                     exact network → ./se-resnet50.onnx, verified against PyTorch
      sedeploy build-engine --int8 --calib calib/    reuses that export: fuse SE blocks, calibrated INT8
                                                     artifacts, engines in engines/ (OpenVINO when
                                                     installed, else ONNX Runtime; --fp16: + FP16)
      sedeploy inspect engines/*.int8-trt.onnx       TensorRT Q/DQ rules check + precision summary
      sedeploy bench                                 throughput and latency of engines/ (the default folder)
      sedeploy bench engines/ --images DIR           + top-1 drift vs FP32 on your images

    Without --checkpoint the network has random (but non-degenerate) weights and every output says so.
    """


@cli.command()
@click.option("--depth", type=click.Choice(DEPTHS), default="50", show_default=True, help="Network depth.")
@click.option("--no-se", is_flag=True, help="Plain ResNet (no SE layers), to measure what SE costs.")
@click.option("--input-size", type=int, default=224, show_default=True, help="Square input resolution.")
@click.option("--num-classes", type=int, default=1000, show_default=True,
              help="Classifier size (the head's outputs); changes the parameter count and FLOPs.")
@common
@handle_errors
def info(depth, no_se, input_size, num_classes, as_json, verbose):
    """Model card: parameters, FLOPs (model-zoo convention and total), SE blocks, input, preprocessing."""
    from sedeploy.info import model_card

    _setup_logging(verbose)
    card = model_card(int(depth), se=not no_se, input_size=input_size, num_classes=num_classes)
    _emit(card.as_dict(), as_json, card.format())


@cli.command()
@click.option("--depth", type=click.Choice(DEPTHS), default=None,
              help="Network depth (SE-ResNet-50/101/152 as in mmcls; 18/34 are BasicBlock + SE, as in timm) "
                   "[default: the checkpoint's depth, else 50].")
@click.option("--checkpoint", metavar="PATH_OR_URL",
              help="mmcls/mmpretrain .pth (both key schemas), timm seresnet*, or Cadene se_resnet* state dict. "
                   "URLs download into ~/.cache/sedeploy (needs internet). Default: random weights.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output .onnx path [default: ./<model>.onnx].")
@click.option("--opset", type=int, default=18, show_default=True,
              help="ONNX opset. ≥18 uses torch's dynamo exporter; 13–17 the legacy TorchScript exporter.")
@click.option("--batch-size", type=int, default=None,
              help="Fix the batch dimension to this size. Default: dynamic batch.")
@click.option("--input-size", type=int, default=224, show_default=True, help="Square input resolution.")
@click.option("--num-classes", type=int, default=None,
              help="Classifier size. Default 1000, or what the checkpoint's head has.")
@click.option("--no-se", is_flag=True, help="Export plain ResNet (no SE layers).")
@click.option("--verify-images", type=click.Path(), default=None,
              help="Folder of images for verification [default: the shipped calib/].")
@click.option("--atol", type=float, default=1e-4, show_default=True,
              help="Verification: allowed max |Δlogit| ORT vs PyTorch is atol + rtol × max|logit|.")
@click.option("--rtol", type=float, default=4e-6, show_default=True,
              help="Verification: the part of the bound that scales with the logits (FP32 rounding does).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random weights.")
@common
@handle_errors
def export(depth, checkpoint, output, opset, batch_size, input_size, num_classes, no_se, verify_images, atol, rtol, seed,
           as_json, verbose):
    """Export the exact mmcls SE-ResNet to one ONNX file, verified against PyTorch.

    The file is written only after ONNX Runtime reproduces PyTorch's logits on real images (the shipped calib/
    photos) and on random input within --atol + --rtol × max|logit|; otherwise the command fails and leaves no
    file behind.
    """
    from sedeploy.export import export_model

    _setup_logging(verbose)
    if batch_size is not None and batch_size < 1:
        raise SedeployError(f"--batch-size {batch_size} is not valid.", expected="a positive integer",
                            fix="omit --batch-size for a dynamic batch")
    res = export_model(depth=int(depth) if depth else None, checkpoint=checkpoint, output=output, opset=opset,
                       dynamic_batch=batch_size is None, batch_size=batch_size or 1, input_size=input_size,
                       num_classes=num_classes, se=not no_se, verify_images=verify_images, atol=atol, rtol=rtol,
                       seed=seed, progress=_progress(as_json))
    v = res.verification
    human = (f"exported {res.model} → {res.path}\n"
             f"  weights      {res.weights}\n"
             f"  params       {res.params:,}\n"
             f"  FLOPs        {res.flops / 1e9:.3f} G (model-zoo convention), {res.total_macs / 1e9:.3f} G MACs total\n"
             f"  ONNX         opset {res.opset} ({res.exporter} exporter), "
             f"batch {'dynamic' if res.dynamic_batch else res.batch_size}, input 3×{res.input_size}×{res.input_size}\n"
             f"  verified     max |Δlogit| {v.max_abs_diff:.2e} on {v.images} images, "
             f"{v.max_abs_diff_random:.2e} on {v.random_inputs} random inputs (tolerances {v.tolerance:.2g}, "
             f"{v.tolerance_random:.2g}: {v.atol:g} + {v.rtol:g} × max|logit|); "
             f"top-1 agreement {v.top1_agreement:.1%}\n"
             f"  time         {res.seconds:.1f} s")
    _emit(res.as_dict(), as_json, human)


def parse_triple(text: str | None, option: str, *, positive: bool = False) -> tuple[float, float, float] | None:
    """``--mean``/``--std`` text → three finite numbers (R, G, B); ``positive``: each must be > 0 (a std)."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values) or (positive and min(values) <= 0):
        raise SedeployError(f"{option} '{text}' is not valid.",
                            expected="three comma-separated finite numbers (R,G,B)"
                                     + (", each > 0" if positive else ""),
                            fix=f"e.g. {option} " + ("58.395,57.12,57.375" if positive else "123.675,116.28,103.53")
                                + " (pixel scale 0–255)")
    return values  # type: ignore[return-value]


@cli.command("build-engine")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--out-dir", type=click.Path(file_okay=False), default=str(DEFAULT_ENGINES), show_default=True,
              help="Folder for the artifacts, engines and manifest.json.")
@click.option("--depth", type=click.Choice(DEPTHS), default=None,
              help="With no MODEL: the SE-ResNet depth to export (or reuse) [default: the checkpoint's, else 50].")
@click.option("--checkpoint", metavar="PATH_OR_URL", help="With no MODEL: weights for the export (see `export`).")
@click.option("--fp16", is_flag=True, help="Also write the FP16 artifact (FP16 graph, FP32 inputs/outputs).")
@click.option("--int8", is_flag=True, help="Also calibrate and write the INT8 artifacts: TensorRT Q/DQ, ONNX Runtime "
                                          "CPU, and OpenVINO when the backend is openvino.")
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration images (flat or class-subfolder layout). Default with --int8: the shipped calib/.")
@click.option("--calib-method", type=click.Choice(["entropy", "minmax", "percentile", "mse"]), default=None,
              help="Range estimator [default: mse, per tensor the clipping with the least quantization error; "
                   "entropy is TensorRT's calibrator].")
@click.option("--calib-count", type=int, default=None, help="Most calibration images used [default: 256].")
@click.option("--calib-seed", type=int, default=0, show_default=True, help="Seed for picking the image subset.")
@click.option("--calib-batch", type=int, default=None, help="Calibration batch size (speed/memory only).")
@click.option("--calib-cache", type=click.Path(dir_okay=False), default=None,
              help="Pin the calibration cache file (recomputed when its inputs changed).")
@click.option("--se-int8", type=click.Choice(["fp32", "int8"]), default=None,
              help="INT8 policy for the SE path (squeeze, FCs, gate, scale): keep in float or quantize "
                   "[default: the measured choice, see benchmarks/results/int8_cpu_forms/results.md].")
@click.option("--keep-fp32", default=None, metavar="GROUPS",
              help="FP16 policy: comma list of se_gate, se, head kept in FP32, or 'none' [default: measured].")
@click.option("--backend", type=click.Choice(BUILD_CHOICES), default="auto", show_default=True,
              help="Engine backend: auto = the fastest CPU backend installed (openvino when it imports on x86-64, "
                   "else ort; a precision OpenVINO cannot compile is built on ort, said in the summary); ort = ONNX "
                   "Runtime (CPU, runs everywhere); trt = TensorRT (NVIDIA GPU, "
                   "`pip install sedeploy[tensorrt]`); openvino = OpenVINO (CPU, `pip install sedeploy[openvino]`); "
                   "none = artifacts only.")
@click.option("--no-fuse-se", is_flag=True, help="Skip the SE fusion pass.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [default: physical cores].")
@click.option("--min-batch", type=int, default=1, show_default=True, help="TensorRT profile: smallest batch.")
@click.option("--opt-batch", type=int, default=8, show_default=True, help="TensorRT profile: tuned batch.")
@click.option("--max-batch", type=int, default=32, show_default=True, help="TensorRT profile: largest batch.")
@click.option("--workspace", type=float, default=4.0, show_default=True, help="TensorRT workspace limit, GiB.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="TensorRT timing cache file (reused and updated; speeds up rebuilds).")
@click.option("--mean", default=None, help="Foreign models: normalisation mean R,G,B (0–255 scale).")
@click.option("--std", default=None, help="Foreign models: normalisation std R,G,B (0–255 scale).")
@click.option("--resize", type=int, default=None, help="Foreign models: resize short side before the centre crop.")
@click.option("--input-shape", default=None, metavar="HxW",
              help="Pin a MODEL's dynamic height and width, e.g. 48x192 (shapes are inferred again from it).")
@click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), default=None,
              help="Foreign models: the channel order the model was trained on [default: rgb]; --mean/--std are "
                   "then per channel in that order.")
@click.option("--resize-mode", type=click.Choice(["crop", "pad"]), default=None,
              help="Foreign models: crop = resize short side + centre crop [default]; pad = resize to the input "
                   "height keeping the aspect ratio, width ≤ the input's, zero-padded (text classifiers, PP-OCR).")
@click.option("--min-agreement", type=float, default=None, metavar="PCT",
              help="INT8 budget: top-1 agreement with FP32 on held-out images ≥ PCT; the most sensitive layers "
                   "fall back to float until it holds (exit 3, nothing written, when it cannot).")
@click.option("--max-top1-drop", type=float, default=None, metavar="PTS",
              help="INT8 budget: top-1 points lost vs FP32 on held-out images (needs labelled class folders).")
@click.option("--budget-confidence", type=float, default=None, metavar="C",
              help="INT8 budget: meet it with the one-sided statistical bound at confidence C (e.g. 0.95) instead "
                   "of the point figure on the held-out images, so it holds on unseen images too (needs more "
                   "held-out images: ≥ 268 for 99 % at 0.95; refused up front when too few).")
@click.option("--fallback-order", type=click.Choice(["sensitivity", "gain-per-cost"]), default=None,
              help="INT8 budget: which layers go back to float first — the most sensitive (fewest layers), or the "
                   "most accuracy per multiply-add kept in float (least speed lost) [default: sensitivity].")
@click.option("--val", type=click.Path(), default=None,
              help="Held-out images for the INT8 check and budget [default: --calib images calibration does not "
                   "pick, or a seeded quarter of a --calib folder of ≤ --calib-count images, then not calibrated "
                   "on].")
@click.option("--warn-agreement", type=float, default=None, metavar="PCT",
              help="INT8 check: warn when an INT8 artifact's top-1 agreement with FP32 on held-out images (at most "
                   "256, on the runtime that runs it) is below PCT [default: 97; 0 never warns].")
@click.option("--label-offset", type=int, default=0, show_default=True,
              help="Model output k+OFFSET is dataset class k (1 for 1001-class models with a background class).")
@click.option("--max-fallback", type=int, default=None, help="INT8 budget: most layers allowed back in float.")
@click.option("--dynamic-batch", is_flag=True,
              help="A fixed-batch MODEL: make the batch dynamic when provably safe (refused with the reason "
                   "otherwise) [default: keep the fixed batch; larger batches are chunked].")
@common
@handle_errors
def build_engine(model, out_dir, depth, checkpoint, fp16, int8, calib, calib_method, calib_count, calib_seed,
                 calib_batch, calib_cache, se_int8, keep_fp32, backend, no_fuse_se, threads, min_batch, opt_batch,
                 max_batch, workspace, timing_cache, mean, std, resize, input_shape, channel_order, resize_mode,
                 min_agreement, max_top1_drop,
                 budget_confidence, fallback_order, val, warn_agreement,
                 label_offset, max_fallback, dynamic_batch, as_json, verbose):
    """Fuse SE blocks, write FP32/FP16/INT8 ONNX artifacts, and build engines from them.

    \b
    MODEL is an FP32 ONNX image classifier with one N×3×H×W or N×H×W×3 input (ours or any other; NHWC models get
    NCHW artifacts, dynamic H/W are pinned with --input-shape). Without MODEL the
    SE-ResNet of --depth (random weights, or --checkpoint) is used: a matching export by `sedeploy export`
    (./se-resnet50.onnx, or one in OUT_DIR) is reused, otherwise it is exported first (said on stderr).
    An FP16/INT8 artifact as MODEL builds only its engine, e.g. on a
    GPU machine:  sedeploy build-engine engines/se-resnet50.int8-trt.onnx --backend trt -o plans/
    \b
    Every requested precision is written as a portable ONNX file in OUT_DIR, whichever backend runs:
      <model>.fp32.onnx      SE-fused FP32 graph (numerically checked against the input, |Δ| ≤ 1e-5)
      <model>.fp16.onnx      FP16 graph, FP32 inputs/outputs (TensorRT 11 builds it as FP16)
      <model>.int8-trt.onnx  symmetric Q/DQ that obeys TensorRT's rules (checked by `sedeploy inspect`)
      <model>.int8-cpu.onnx  the form that runs fastest on ONNX Runtime CPU
      <model>.int8-ov.onnx   Q/DQ with uint8 after ReLU, int8 elsewhere: fastest and most faithful on OpenVINO
    \b
    OUT_DIR always holds one complete build: the set is written into a staging folder inside it and published
    with manifest.json only when everything succeeded (files of the previous build that this one does not
    write are removed). A failed, interrupted (Ctrl-C, SIGTERM, SIGHUP) or killed build leaves the previous set as
    it was, and a second build-engine into the same OUT_DIR is refused while one runs.
    """
    from sedeploy.onnxcore import parse_input_shape
    from sedeploy.pipeline import BuildOptions, build_engines, foreign_preprocess, format_result

    _setup_logging(verbose)
    if model and (depth or checkpoint):
        raise SedeployError(f"--depth/--checkpoint choose the network to export when no MODEL is given; MODEL "
                            f"'{model}' was given too.",
                            fix="drop --depth/--checkpoint to build from MODEL, or drop MODEL to export")
    pp = None
    hw = parse_input_shape(input_shape)
    if any(v is not None for v in (mean, std, resize, channel_order, resize_mode, hw)):
        if not model:
            raise SedeployError("--mean/--std/--resize/--channel-order/--resize-mode/--input-shape describe a "
                                "foreign MODEL; none was given.",
                                fix="pass the ONNX file, or drop these options for the SE-ResNet export")
        pp = foreign_preprocess(model, mean=parse_triple(mean, "--mean"), resize=resize,
                                std=parse_triple(std, "--std", positive=True), input_shape=hw,
                                channel_order=channel_order, resize_mode=resize_mode)
    opts = BuildOptions(fp16=fp16, int8=int8, fuse_se=not no_fuse_se, backend=backend, calib=calib,
                        calib_method=calib_method, calib_count=calib_count, calib_seed=calib_seed,
                        calib_batch=calib_batch, calib_cache=calib_cache, se_int8=se_int8, keep_fp32=keep_fp32,
                        threads=threads, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                        workspace_gib=workspace, timing_cache=timing_cache, preprocess=pp,
                        progress=_progress(as_json), min_agreement=min_agreement, max_top1_drop=max_top1_drop,
                        budget_confidence=budget_confidence, fallback_order=fallback_order,
                        val=val, label_offset=label_offset, max_fallback=max_fallback, dynamic_batch=dynamic_batch,
                        input_shape=hw, warn_agreement=warn_agreement)
    res = build_engines(model, out_dir, opts, depth=int(depth) if depth else None, checkpoint=checkpoint)
    _emit(res.as_dict(), as_json, format_result(res))


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@common
@handle_errors
def inspect(model, as_json, verbose):
    """Precision per op type, and (for Q/DQ models) proof that TensorRT's INT8 rules hold.

    Exits 3 when a Q/DQ model breaks a TensorRT rule, so it can gate CI before any GPU is involved.
    """
    from sedeploy.errors import VerificationError
    from sedeploy.checks import format_inspection, inspect_model

    _setup_logging(verbose)
    d = inspect_model(model)
    _emit(d, as_json, format_inspection(d))
    if not d["ok"]:
        flavour = d.get("int8_flavour")
        if flavour in ("cpu", "ov"):  # sedeploy's INT8 forms for ONNX Runtime / OpenVINO: right for their backend
            raise VerificationError(f"'{model}' is sedeploy's int8-{flavour} artifact, the form for "
                                    f"{'ONNX Runtime' if flavour == 'cpu' else 'OpenVINO'}; it breaks TensorRT's Q/DQ "
                                    "rules (listed above), so TensorRT cannot build it.",
                                    fix="for TensorRT use the .int8-trt.onnx artifact the same build wrote beside it; "
                                        "this file is fine for the backend it was made for")
        raise VerificationError(f"'{model}' breaks TensorRT's Q/DQ rules (listed above).",
                                fix="rebuild it with `sedeploy build-engine --int8` (the int8-trt artifact)")


#: largest batch size `bench --batch` accepts (a batch of 4096 SE-ResNet-50 images is ~2.4 GiB of input alone)
MAX_BATCH = 4096


def _default_engines() -> Path:
    if not (DEFAULT_ENGINES / MANIFEST).is_file():
        state = "has no manifest.json" if DEFAULT_ENGINES.is_dir() else "does not exist"
        raise SedeployError(f"No ENGINES given, and the default folder '{DEFAULT_ENGINES}/' (where build-engine "
                            f"writes) {state}.",
                            expected="engine files (.onnx, .plan) or a folder written by `sedeploy build-engine`",
                            fix="run `sedeploy build-engine` first (it writes engines/), or pass the engines, "
                                "e.g. sedeploy bench my-engines/")
    logging.getLogger("sedeploy").info("No ENGINES given: benchmarking %s/ (build-engine's default output folder).",
                                       DEFAULT_ENGINES)
    return DEFAULT_ENGINES


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


@cli.command()
@click.argument("engines", nargs=-1, type=click.Path(path_type=Path))
@click.option("--images", type=click.Path(path_type=Path),
              help="Image folder: flat (agreement only) or class subfolders named by synset or class index.")
@click.option("--labels", type=click.Path(path_type=Path),
              help="Labels file: 'file<TAB>class index (or synset)' per line, paths relative to --images.")
@click.option("--synsets", type=click.Path(path_type=Path),
              help="Class-order table when the model's classes are not the sorted ImageNet-1k synsets.")
@click.option("--batch", "batches", default=DEFAULT_BATCH_TEXT, show_default=True, help="Comma-separated batch sizes.")
@click.option("--threads", type=int, help="Intra-op threads for every engine [default: physical cores].")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed runs per engine and batch.")
@click.option("--repeats", type=int, default=20, show_default=True, help="Timed runs per engine and batch.")
@click.option("--settle", type=click.IntRange(min=0), default=1, show_default=True,
              help="Untimed calls of the same engine right before each timed one, so the timed call is warm as in "
                   "steady serving (0: cold calls right after other engines, about 2× slower at batch 1 here).")
@click.option("--max-seconds", type=float, help="Time budget per batch size for the timed rounds.")
@click.option("--reference", help="Engine (name or path) that drift is measured against [default: the FP32 one].")
@click.option("--torch-baseline/--no-torch-baseline", default=True, show_default=True,
              help="Time PyTorch eager FP32 (channels_last) of the same model in the same run.")
@click.option("--checkpoint", help="Checkpoint the engines were exported from (for the PyTorch baseline).")
@click.option("--compare-plain", is_flag=True, help="Also time the same depth without SE: what SE costs.")
@click.option("--peers", is_flag=True,
              help="Also time and score OpenVINO FP32 and OpenVINO + NNCF INT8 (NNCF's default preset, on the "
                   "images sedeploy calibrated on) of the same FP32 ONNX, interleaved with the engines "
                   "(`pip install 'sedeploy[peers]'`).")
@click.option("--peer-calib", type=click.Path(path_type=Path),
              help="Calibration images for the NNCF peer [default: those recorded in the build's manifest.json].")
@click.option("--probe/--no-probe", default=True, show_default=True,
              help="Measure this machine's fp32/int8 GEMM ceiling first (for achieved-GFLOP/s fractions).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Write results.json, results.csv, results.md and PNG plots here.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--image-limit", type=int, help="Use only the first N images (sorted).")
@click.option("--max-top1-drop", type=float, help="CI gate: exit 1 if any engine loses more top-1 points.")
@click.option("--min-agreement", type=float, help="CI gate: exit 1 if any engine's top-1 agreement (%) is lower.")
@click.option("--label-offset", type=int, default=0, show_default=True,
              help="Model output k+OFFSET is dataset class k (1 for 1001-class models with a background class).")
@common
@handle_errors
def bench(engines, images, labels, synsets, batches, threads, warmup, repeats, settle, max_seconds, reference,
          torch_baseline, checkpoint, compare_plain, peers, peer_calib, probe, out_dir, no_plots, image_limit,
          max_top1_drop, min_agreement, label_offset, as_json, verbose):
    """Throughput, latency and top-1 drift of engines, timed interleaved in one run, against FLOPs.

    \b
    ENGINES are ONNX artifacts/engines, TensorRT .plan files (with their .trt.json), OpenVINO .ov.xml files
    (with their .ov.bin and .ov.json), or a build-engine output folder (its manifest.json lists them)
    [default: engines/, where build-engine writes]. One must be FP32: drift is measured against it.
    \b
    Examples:
      sedeploy bench                                            engines/ at batch 1, 8, 32
      sedeploy bench engines/ --images val/ --labels val.tsv    + top-1/top-5, flips, KL vs FP32
      sedeploy bench engines/ --images val/ --max-top1-drop 0.5 --min-agreement 99 --batch 8
                                                                CI gate: exit 1 when a budget is exceeded
    The timer covers one engine call on a host batch (on GPU: host↔device copies included), right after
    --settle untimed calls of the same engine.
    """
    from sedeploy.bench.run import BenchInterrupted, bench_command_summary, run_bench

    _setup_logging(verbose)
    sizes = parse_batch_list(batches)
    if not engines:
        engines = (_default_engines(),)
    try:
        res = run_bench(list(engines), images=images, labels=labels, synsets=synsets, batches=sizes,
                        threads=threads, warmup=warmup, repeats=repeats, settle=settle, max_seconds=max_seconds,
                        reference=reference, torch_baseline=torch_baseline, checkpoint=checkpoint,
                        compare_plain=compare_plain, peers=peers, peer_calib=peer_calib, probe=probe,
                        out_dir=out_dir, plots=not no_plots, progress=_progress(as_json), max_top1_drop=max_top1_drop,
                        min_agreement=min_agreement, image_limit=image_limit, label_offset=label_offset)
    except BenchInterrupted as stop:  # partial results were written, marked complete: false
        click.echo(bench_command_summary(stop.results), err=True)
        word, code = ("interrupted", 130)
        if _TERMINATED:
            word, code = f"terminated ({signal.Signals(_TERMINATED[0]).name})", 128 + _TERMINATED[0]
        click.echo(f"{word}: partial results (complete: false) written to "
                   + (", ".join(map(str, stop.files.values())) or "nowhere (no --out)"), err=True)
        sys.exit(code)
    summary = {k: v for k, v in res.items() if k != "engines"}
    summary["engines"] = [{**e, "batch": {b: {k: v for k, v in st.items() if k != "samples_s"}
                                          for b, st in e["batch"].items()}} for e in res["engines"]]
    _emit(summary, as_json, bench_command_summary(res))
    if res.get("gate") and not res["gate"]["passed"]:
        sys.exit(1)


@cli.command()
@click.argument("engines_dir", type=click.Path(path_type=Path))
@click.option("--triton", is_flag=True, required=True, help="Write a Triton Inference Server model repository.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default="model_repository",
              show_default=True, help="The model repository folder (written atomically).")
@click.option("--results", type=click.Path(path_type=Path),
              help="A bench results.json: its timings choose preferred batch sizes and the queue delay.")
@click.option("--max-batch", type=int, default=32, show_default=True,
              help="max_batch_size for dynamic-batch ONNX/OpenVINO models (plans use their profile's max).")
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances per device.")
@click.option("--force", is_flag=True, help="Replace an existing non-empty output folder.")
@click.option("--artifacts", is_flag=True,
              help="Package the portable ONNX artifacts instead of the engines (ORT engines are tuned for this CPU).")
@click.option("--labels-file", type=click.Path(path_type=Path),
              help="Class names (synset_words.txt): labels.txt for Triton's classification (top-k) extension.")
@common
@handle_errors
def package(engines_dir, triton, out_dir, results, max_batch, instances, force, artifacts, labels_file, as_json,
            verbose):
    """Package a build-engine folder for serving: one Triton model per engine.

    \b
    TensorRT plans → tensorrt_plan (KIND_GPU); ONNX artifacts and ONNX Runtime engines → onnxruntime_onnx
    (KIND_CPU); OpenVINO IR → openvino (KIND_CPU). Every config.pbtxt is parsed with Triton's ModelConfig
    protobuf before the repository is published. Needs `pip install 'sedeploy[serve]'`.
    \b
    Example:  sedeploy package engines/ --triton -o model_repository/
              docker run --gpus all -p8000:8000 -p8001:8001 -p8002:8002 -v $PWD/model_repository:/models \\
                nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models
    """
    from sedeploy.serving.triton_repo import format_package, package_triton

    _setup_logging(verbose)
    res = package_triton(engines_dir, out_dir, results=results, max_batch=max_batch, instances=instances, force=force,
                         artifacts=artifacts, labels_file=labels_file)
    _emit(res, as_json, format_package(res))


@cli.command()
@click.argument("engines_dir", type=click.Path(path_type=Path))
@click.option("--engine", help="Model name or engine file to serve [default: the first FP32 engine].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", type=int, default=8000, show_default=True, help="HTTP port (KServe v2 REST).")
@click.option("--grpc-port", type=int, default=8001, show_default=True, help="gRPC port.")
@click.option("--metrics-port", type=int, default=8002, show_default=True, help="Prometheus metrics port.")
@click.option("--no-batching", is_flag=True, help="Turn Triton's dynamic batcher off (every request runs alone).")
@click.option("--max-batch", type=int, help="Largest batch the dynamic batcher forms [default: 32 / profile max].")
@click.option("--queue-delay-us", type=int, help="Dynamic batcher's max queue delay, microseconds.")
@click.option("--results", type=click.Path(path_type=Path), help="Bench results.json choosing the batching.")
@click.option("--threads", type=int, help="Engine intra-op threads [default: physical cores].")
@click.option("--log-file", type=click.Path(path_type=Path),
              help="File that collects tritonserver's output [default: a temporary file, removed at the end].")
@click.option("--exit-timeout", type=int, default=10, show_default=True,
              help="Seconds requests in flight may take to finish once Ctrl-C/SIGTERM came (Triton's exit timeout).")
@common
@handle_errors
def serve(engines_dir, engine, host, port, grpc_port, metrics_port, no_batching, max_batch, queue_delay_us, results,
          threads, log_file, exit_timeout, as_json, verbose):
    """Serve one engine with a real Triton Inference Server (PyTriton) until SIGTERM/SIGINT.

    HTTP and gRPC (KServe v2), /v2/health/live and /v2/health/ready, Prometheus /metrics, Triton's dynamic
    batcher. ENGINES_DIR is a build-engine folder. Needs `pip install 'sedeploy[serve]'`.
    With --json, stdout carries JSON Lines: one {"status": "ready", …} object, then {"status": "stopped"}.
    Ctrl-C / SIGTERM stop the server (requests in flight finish) and exit 130 / 143.
    """
    from sedeploy.serving.server import ServeOptions, serve as serve_engine

    _setup_logging(verbose)
    opts = ServeOptions(host=host, http_port=port, grpc_port=grpc_port, metrics_port=metrics_port,
                        batching=not no_batching, max_batch=max_batch, queue_delay_us=queue_delay_us,
                        results=results, threads=threads, log_file=log_file, exit_timeout_s=exit_timeout)

    def ready(served):
        d = served.as_dict()
        human = (f"serving {served.name} ({served.engine.name}, {served.backend}) — max batch "
                 f"{served.max_batch_size}, preferred {served.preferred}, queue delay {served.queue_delay_us} us\n"
                 f"  HTTP {served.http_url}   gRPC {served.grpc_url}   metrics {served.metrics_url}\n"
                 f"  ready: GET {served.http_url}/v2/health/ready   stop: Ctrl-C or SIGTERM")
        click.echo(json.dumps({"status": "ready", **d}, default=str) if as_json else human)
        sys.stdout.flush()

    served = serve_engine(engines_dir, engine, options=opts, on_ready=ready)
    by = signal.Signals(served.stopped_by).name if served.stopped_by else None
    click.echo(json.dumps({"status": "stopped", "model": served.name, "signal": by}) if as_json else
               f"stopped {served.name}" + (f" ({by})" if by else ""))
    if served.stopped_by:
        sys.exit(128 + served.stopped_by)  # 130 after Ctrl-C, 143 after SIGTERM, as for every command


@cli.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--url", default="127.0.0.1:8000", show_default=True, help="The Triton server's HTTP address.")
@click.option("--model", help="Model name [default: the server's only ready model].")
@click.option("--top-k", type=int, default=5, show_default=True)
@click.option("--labels-file", type=click.Path(path_type=Path),
              help="Class names (synset_words.txt) [default: $SEDEPLOY_LABELS, else indices].")
@common
@handle_errors
def infer(images, url, model, top_k, labels_file, as_json, verbose):
    """Classify IMAGES on a Triton server: sedeploy's preprocessing, then the top-k classes."""
    from sedeploy.serving.client import format_infer, infer_images

    _setup_logging(verbose)
    res = infer_images(list(images), url, model, top_k=top_k, labels_file=labels_file)
    if not as_json:
        res.pop("logits")
    _emit(res, as_json, format_infer(res))


def main() -> None:
    cli(prog_name="sedeploy")


if __name__ == "__main__":
    main()
