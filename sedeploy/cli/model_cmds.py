"""`info`, `export` and `inspect`: the model card, the verified ONNX export, and the precision/Q-DQ check."""
from __future__ import annotations

import click

from sedeploy.checks import format_inspection, inspect_model
from sedeploy.cli.core import emit, handle_errors, progress, setup_logging
from sedeploy.cli.options import DEPTHS, MODEL, OUTPUT, depth, json_and_verbose, out
from sedeploy.cli.sections import Command, option, stack
from sedeploy.errors import SedeployError, VerificationError
from sedeploy.export import export_model

VERIFY = "Verification"
ONNX = "ONNX"

input_size = option("--input-size", type=int, default=224, show_default=True, section=MODEL,
                    help="Square input resolution.")


@click.command(cls=Command)
@option("--depth", type=click.Choice(DEPTHS), default="50", show_default=True, section=MODEL, help="Network depth.")
@option("--no-se", is_flag=True, section=MODEL, help="Plain ResNet (no SE layers), to measure what SE costs.")
@input_size
@option("--num-classes", type=int, default=1000, show_default=True, section=MODEL,
        help="Classifier size (the head's outputs); changes the parameter count and FLOPs.")
@json_and_verbose
@handle_errors
def info(depth, no_se, input_size, num_classes, as_json, verbose):
    """Model card: parameters, FLOPs (model-zoo convention and total), SE blocks, input, preprocessing.

    \b
    Examples:
      sedeploy info --depth 50                  SE-ResNet-50: params, FLOPs, SE blocks, preprocessing
      sedeploy info --depth 50 --no-se --json   plain ResNet-50, as one JSON object
    """
    from sedeploy.info import model_card  # imports torch (~10 s): only when the command runs, not for --help

    setup_logging(verbose)
    card = model_card(int(depth), se=not no_se, input_size=input_size, num_classes=num_classes)
    emit(card.as_dict(), as_json, card.format())


export_options = stack(
    depth("Network depth (SE-ResNet-50/101/152 as in mmcls; 18/34 are BasicBlock + SE, as in timm) "
          "[default: the checkpoint's depth, else 50]."),
    option("--checkpoint", metavar="PATH_OR_URL", section=MODEL,
           help="mmcls/mmpretrain .pth (both key schemas), timm seresnet*, or Cadene se_resnet* state dict. "
                "URLs download into ~/.cache/sedeploy (needs internet). Default: random weights."),
    input_size,
    option("--num-classes", type=int, default=None, section=MODEL,
           help="Classifier size. Default 1000, or what the checkpoint's head has."),
    option("--no-se", is_flag=True, section=MODEL, help="Export plain ResNet (no SE layers)."),
    option("--seed", type=int, default=0, show_default=True, section=MODEL, help="Seed for random weights."),
    option("--opset", type=int, default=18, show_default=True, section=ONNX,
           help="ONNX opset. ≥18 uses torch's dynamo exporter; 13–17 the legacy TorchScript exporter."),
    option("--batch-size", type=int, default=None, section=ONNX,
           help="Fix the batch dimension to this size. Default: dynamic batch."),
    option("--verify-images", type=click.Path(), default=None, section=VERIFY,
           help="Folder of images for verification [default: the shipped calib/]."),
    option("--atol", type=float, default=1e-4, show_default=True, section=VERIFY,
           help="Verification: allowed max |Δlogit| ORT vs PyTorch is atol + rtol × max|logit|."),
    option("--rtol", type=float, default=4e-6, show_default=True, section=VERIFY,
           help="Verification: the part of the bound that scales with the logits (FP32 rounding does)."),
    out("Output .onnx path [default: ./<model>.onnx].", old="--output", type=click.Path(dir_okay=False)),
    json_and_verbose,
)


def _export_summary(res) -> str:
    v = res.verification
    return (f"exported {res.model} → {res.path}\n"
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


@click.command(cls=Command)
@export_options
@handle_errors
def export(depth, checkpoint, input_size, num_classes, no_se, seed, opset, batch_size, verify_images, atol, rtol, out,
           as_json, verbose):
    """Export the exact mmcls SE-ResNet to one ONNX file, verified against PyTorch.

    The file is written only after ONNX Runtime reproduces PyTorch's logits on real images (the shipped calib/
    photos) and on random input within --atol + --rtol × max|logit|; otherwise the command fails and leaves no
    file behind.

    \b
    Examples:
      sedeploy export --depth 50                                  random weights → ./se-resnet50.onnx
      sedeploy export --checkpoint se-resnet50.pth -o model.onnx  your weights, your path
      sedeploy export --depth 50 --batch-size 1 --opset 17        fixed batch, TorchScript exporter
    """
    setup_logging(verbose)
    if batch_size is not None and batch_size < 1:
        raise SedeployError(f"--batch-size {batch_size} is not valid.", expected="a positive integer",
                            fix="omit --batch-size for a dynamic batch")
    res = export_model(depth=int(depth) if depth else None, checkpoint=checkpoint, output=out, opset=opset,
                       dynamic_batch=batch_size is None, batch_size=batch_size or 1, input_size=input_size,
                       num_classes=num_classes, se=not no_se, verify_images=verify_images, atol=atol, rtol=rtol,
                       seed=seed, progress=progress(as_json))
    emit(res.as_dict(), as_json, _export_summary(res))


@click.command(cls=Command)
@click.argument("model", type=click.Path(dir_okay=False))
@json_and_verbose
@handle_errors
def inspect(model, as_json, verbose):
    """Precision per op type, and (for Q/DQ models) proof that TensorRT's INT8 rules hold.

    Exits 3 when a Q/DQ model breaks a TensorRT rule, so it can gate CI before any GPU is involved.

    \b
    Examples:
      sedeploy inspect engines/se-resnet50.int8-trt.onnx          TensorRT Q/DQ rules + precision summary
      sedeploy inspect engines/se-resnet50.fp16.onnx --json       precision per op type as JSON
    """
    setup_logging(verbose)
    d = inspect_model(model)
    emit(d, as_json, format_inspection(d))
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
