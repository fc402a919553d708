"""The `sedeploy` command line: parse options, call one library function, print the result.

Human-readable output goes to stdout, progress bars and warnings to stderr. With ``--json`` stdout carries exactly
one JSON object, so scripts can parse it. Errors print one message (what was given, what is expected, how to fix)
and exit non-zero: 1 a bench budget exceeded (--max-top1-drop, --min-agreement) or an engine's outputs were not
finite, 2 bad input, 3 failed verification, 4 missing optional dependency, 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM: `timeout`, CI cancels, `docker stop`), 129 hung up (SIGHUP: the terminal or SSH session closed). Either
way nothing half-written is left behind.

One module per command family (model_cmds, build_cmd, bench_cmd, serve_cmds); options shared by several commands
live once in options.py, help sections and deprecated spellings in sections.py.
"""
from __future__ import annotations

import click

from sedeploy.cli.bench_cmd import DEFAULT_BATCH_TEXT, bench, default_engines
from sedeploy.cli.build_cmd import DEFAULT_ENGINES, build_engine, build_options
from sedeploy.cli.core import TERMINATED, Terminated, emit, handle_errors, progress, setup_logging
from sedeploy.cli.model_cmds import export, info, inspect
from sedeploy.cli.options import DEPTHS
from sedeploy.cli.parsing import MAX_BATCH, parse_batch_list, parse_trt_profile, parse_triple
from sedeploy.cli.serve_cmds import infer, package, serve

__all__ = ["cli", "main", "handle_errors", "Terminated", "TERMINATED", "parse_triple", "parse_batch_list",
           "parse_trt_profile", "build_options", "default_engines", "emit", "progress", "setup_logging", "DEPTHS",
           "DEFAULT_ENGINES", "DEFAULT_BATCH_TEXT", "MAX_BATCH"]


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
      sedeploy package engines/                      a Triton model repository (model_repository/)

    Without --checkpoint the network has random (but non-degenerate) weights and every output says so.
    Every command has --help with examples, --json (one JSON object on stdout) and -v (explain on stderr).
    """


for command in (info, export, build_engine, inspect, bench, package, serve, infer):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="sedeploy")
