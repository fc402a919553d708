"""Options that several commands share, each defined once with one name and one help text, grouped by section."""
from __future__ import annotations

import click

from sedeploy.cli.sections import deprecated, option, stack

DEPTHS = ["18", "34", "50", "101", "152"]

MODEL = "Model"
INPUT = "Input and preprocessing"
CALIBRATION = "Calibration"
BUDGET = "INT8 budget"
ENGINES = "Engines"
TRT = "TensorRT profile"
OUTPUT = "Output"

#: --json and -v, on every command
json_and_verbose = stack(
    option("--json", "as_json", is_flag=True, section=OUTPUT, help="Print one JSON object with the results on stdout."),
    option("-v", "--verbose", is_flag=True, section=OUTPUT, help="Explain each decision on stderr."),
)

threads = option("--threads", type=int, default=None, section=ENGINES,
                 help="Intra-op threads of each engine (ONNX Runtime, OpenVINO) [default: physical cores].")

label_offset = option("--label-offset", type=int, default=None, section=INPUT,
                      help="Model output k+OFFSET is dataset class k (1 for 1001-class models with a background "
                           "class); build-engine records it in the engines [default: bench: the engines' recorded "
                           "offset, else 0].")


def out(help: str, *, old: str | None = None, **kwargs):
    """-o/--out: where a command writes; ``old`` is the command's previous spelling, kept hidden for one release."""
    decorators = [option("-o", "--out", "out", section=OUTPUT, help=help, **kwargs)]
    if old:
        decorators.append(deprecated(old, "-o/--out", rename_to="out", type=kwargs.get("type")))
    return stack(*decorators)


def depth(help: str):
    return option("--depth", type=click.Choice(DEPTHS), default=None, section=MODEL, help=help)
