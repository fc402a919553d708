"""The `sedeploy` command line: parse options, call one library function, print the result.

Human-readable output goes to stdout, progress bars and warnings to stderr. With ``--json`` stdout carries exactly
one JSON object, so scripts can parse it. Errors print one message (what was given, what is expected, how to fix)
and exit non-zero: 2 bad input, 3 failed verification, 4 missing optional dependency, 130 interrupted.
"""
from __future__ import annotations

import functools
import json
import logging
import sys

import click

from sedeploy.errors import SedeployError

DEPTHS = ["18", "34", "50", "101", "152"]


def _setup_logging(verbose: bool) -> None:
    """sedeploy's own messages on stderr (warnings always, explanations with -v); other libraries stay quiet."""
    logging.basicConfig(format="%(levelname)s: %(message)s", stream=sys.stderr, level=logging.WARNING)
    logging.getLogger("sedeploy").setLevel(logging.DEBUG if verbose else logging.INFO)


def _emit(result: dict, as_json: bool, human: str) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(human)


def handle_errors(fn):
    """Turn library errors into one clear message and an exit code; never a traceback for user mistakes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SedeployError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing partial was left behind", err=True)
            sys.exit(130)

    return wrapper


def common(fn):
    fn = click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results on stdout.")(fn)
    fn = click.option("-v", "--verbose", is_flag=True, help="Explain decisions (e.g. why a candidate SE block "
                                                            "was not fused) on stderr.")(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="sedeploy")
def cli():
    """sedeploy: SE-ResNet (mmcls SE-ResNet-50/101) from PyTorch to verified, fast deployment engines.

    \b
    Typical flow (everything runs on a CPU; TensorRT is optional):
      sedeploy info --depth 50                       model card: params, FLOPs, SE blocks
      sedeploy export --depth 50 -o se50.onnx        exact network → ONNX, verified against PyTorch
      sedeploy build-engine se50.onnx --fp16 --int8 -o engines/
                                                     fuse SE blocks, FP16 + calibrated INT8 artifacts, ORT engines
      sedeploy inspect engines/*.int8-trt.onnx       TensorRT Q/DQ rules check + precision summary
      sedeploy bench engines/ --data DIR             throughput, latency, top-1 drift vs FP32

    Without --checkpoint the network has random (but non-degenerate) weights and every output says so.
    """


@cli.command()
@click.option("--depth", type=click.Choice(DEPTHS), default="50", show_default=True, help="Network depth.")
@click.option("--no-se", is_flag=True, help="Plain ResNet (no SE layers), to measure what SE costs.")
@click.option("--input-size", type=int, default=224, show_default=True, help="Square input resolution.")
@click.option("--num-classes", type=int, default=1000, show_default=True)
@common
@handle_errors
def info(depth, no_se, input_size, num_classes, as_json, verbose):
    """Model card: parameters, FLOPs (model-zoo convention and total), SE blocks, input, preprocessing."""
    from sedeploy.info import model_card

    _setup_logging(verbose)
    card = model_card(int(depth), se=not no_se, input_size=input_size, num_classes=num_classes)
    _emit(card.as_dict(), as_json, card.format())


@cli.command()
@click.option("--depth", type=click.Choice(DEPTHS), default="50", show_default=True,
              help="Network depth (SE-ResNet-50/101/152 as in mmcls; 18/34 are BasicBlock + SE, as in timm).")
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
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Max allowed |Δlogit| ORT vs PyTorch.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random weights.")
@common
@handle_errors
def export(depth, checkpoint, output, opset, batch_size, input_size, num_classes, no_se, verify_images, atol, seed,
           as_json, verbose):
    """Export the exact mmcls SE-ResNet to one ONNX file, verified against PyTorch.

    The file is written only after ONNX Runtime reproduces PyTorch's logits on real images (the shipped calib/
    photos) and on random input within --atol; otherwise the command fails and leaves no file behind.
    """
    from sedeploy.export import export_model

    _setup_logging(verbose)
    if batch_size is not None and batch_size < 1:
        raise SedeployError(f"--batch-size {batch_size} is not valid.", expected="a positive integer",
                            fix="omit --batch-size for a dynamic batch")
    res = export_model(depth=int(depth), checkpoint=checkpoint, output=output, opset=opset,
                       dynamic_batch=batch_size is None, batch_size=batch_size or 1, input_size=input_size,
                       num_classes=num_classes, se=not no_se, verify_images=verify_images, atol=atol, seed=seed)
    v = res.verification
    human = (f"exported {res.model} → {res.path}\n"
             f"  weights      {res.weights}\n"
             f"  params       {res.params:,}\n"
             f"  FLOPs        {res.flops / 1e9:.3f} G (model-zoo convention), {res.total_macs / 1e9:.3f} G MACs total\n"
             f"  ONNX         opset {res.opset} ({res.exporter} exporter), "
             f"batch {'dynamic' if res.dynamic_batch else res.batch_size}, input 3×{res.input_size}×{res.input_size}\n"
             f"  verified     max |Δlogit| {v.max_abs_diff:.2e} on {v.images} images, "
             f"{v.max_abs_diff_random:.2e} on {v.random_inputs} random inputs (tolerance {v.atol:g}); "
             f"top-1 agreement {v.top1_agreement:.1%}\n"
             f"  time         {res.seconds:.1f} s")
    _emit(res.as_dict(), as_json, human)


def main() -> None:
    cli(prog_name="sedeploy")


if __name__ == "__main__":
    main()
