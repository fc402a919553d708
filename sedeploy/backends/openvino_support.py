"""OpenVINO's side of the backend that needs no model: importing ``openvino`` (exit 4 with the install hint),
reading its version, the CPU compile properties sedeploy sets (threads, inference precision, performance hint;
measured, see :mod:`sedeploy.backends.openvino`), the checks a saved engine's files and sidecar must pass before
anything is compiled, and per-layer times. ``openvino`` is imported only inside functions."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sedeploy.backends import sidecar_path
from sedeploy.errors import IncompatibleDependencyError, MissingDependencyError, SedeployError
from sedeploy.onnxcore import sha256_file

__all__ = ["DEFAULT_PERFORMANCE_HINT", "DEVICE", "PERFORMANCE_HINTS", "PRECISION_HINTS", "VERSION_FIELDS",
           "check_files", "check_version", "compile_config", "first_error_line", "layer_times", "ov_version",
           "parse_ov_version", "precision_hint_for", "require_openvino"]

DEVICE = "CPU"
#: LATENCY: one stream with all threads serves one synchronous request best (measured, see the module docstring)
DEFAULT_PERFORMANCE_HINT = "LATENCY"
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
#: graph precision → OpenVINO inference precision for its non-quantized parts (never OpenVINO's bf16 default)
PRECISION_HINTS = {"fp32": "f32", "int8": "f32", "fp16": "f16"}
#: how many leading version numbers must agree between the sidecar and the installed OpenVINO (year.release)
VERSION_FIELDS = 2


def require_openvino(purpose: str):
    """``import openvino`` or exit 4: the install hint when it is missing, the cause when an installed one fails to
    import (a missing shared library, a broken install raises anything)."""
    import importlib.util

    try:
        import openvino as ov
    except Exception as err:
        if importlib.util.find_spec("openvino") is None:
            raise MissingDependencyError("openvino", "openvino", purpose) from err
        raise IncompatibleDependencyError(
            f"{purpose} needs OpenVINO, but the installed 'openvino' package fails to import "
            f"({type(err).__name__}: {first_error_line(err)}).",
            fix="reinstall it (pip install --force-reinstall 'sedeploy[openvino]'), or build for ONNX Runtime "
                "(--backend ort)") from err
    return ov


def parse_ov_version(text: str) -> tuple[int, int, int]:
    """``"2026.4.1-22982-e213a147257-releases/2026/4"`` → ``(2026, 4, 1)``; ``"2025.0"`` → ``(2025, 0, 0)``.
    Numbers, never text ("2025.10" > "2025.9")."""
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not match:
        raise SedeployError(f"Cannot read an OpenVINO version from {text!r}.",
                            expected="a version such as '2026.4.1-22982-…' or '2025.0'")
    return tuple(int(g or 0) for g in match.groups())  # type: ignore[return-value]


def ov_version() -> tuple[int, int, int]:
    """The installed OpenVINO release (exit 4 when the package is missing)."""
    return parse_ov_version(require_openvino("Reading the OpenVINO version").get_version())


def precision_hint_for(precision: str) -> str:
    """The ``INFERENCE_PRECISION_HINT`` a graph of ``precision`` runs with."""
    try:
        return PRECISION_HINTS[precision]
    except KeyError:
        raise SedeployError(f"Unknown precision {precision!r}.", expected="fp32, fp16 or int8") from None


def compile_config(*, threads: int, precision_hint: str, performance_hint: str = DEFAULT_PERFORMANCE_HINT,
                   perf_counters: bool = False) -> dict[str, Any]:
    """The CPU compile properties sedeploy uses (explicit threads, precision and performance hint)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise SedeployError(f"threads = {threads!r} is not valid.", expected="a positive integer",
                            fix="omit --threads to use one per core this process may use")
    if performance_hint not in PERFORMANCE_HINTS:
        raise SedeployError(f"OpenVINO performance hint {performance_hint!r}.",
                            expected=f"one of {', '.join(PERFORMANCE_HINTS)}")
    return {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision_hint,
            "PERFORMANCE_HINT": performance_hint, "PERF_COUNT": bool(perf_counters)}

def check_files(sidecar: dict[str, Any], xml: Path, weights: Path) -> None:
    """Refuse an IR or weights file that is not the one the sidecar describes (sha256 recorded at build time): a
    .ov.bin copied from another build of the same name would otherwise run, with another model's weights."""

    for key, f in (("engine_sha256", xml), ("weights_sha256", weights)):
        recorded = sidecar.get(key)
        if recorded is None:
            continue  # (recorded by every sedeploy build; an engine from before that is trusted as it is)
        if sha256_file(f) != recorded:
            raise SedeployError(f"'{f}' is not the file its sidecar '{sidecar_path(xml).name}' describes "
                                f"(sha256 differs from the {key} recorded when the engine was built).",
                                expected="the .ov.xml, .ov.bin and .ov.json of one build, side by side",
                                fix="copy the three files of one build together, or rebuild into a new folder "
                                    "with `sedeploy build-engine MODEL --backend openvino -o NEW_FOLDER`")


def check_version(sidecar: dict[str, Any], installed: str, *, engine: str | Path) -> None:
    """Refuse an engine whose sidecar names another OpenVINO release than the installed one (year.release)."""
    built = sidecar.get("openvino_version")
    if not built:
        raise SedeployError(f"The sidecar of '{engine}' does not say which OpenVINO saved it.",
                            fix="rebuild the engine into a new folder with `sedeploy build-engine MODEL --backend "
                                "openvino -o NEW_FOLDER`")
    try:
        a = parse_ov_version(built)[:VERSION_FIELDS]
    except SedeployError as err:
        raise SedeployError(f"The sidecar of '{engine}' names no readable OpenVINO version "
                            f"(openvino_version = {built!r}).", expected=err.expected,
                            fix="rebuild the engine into a new folder with `sedeploy build-engine MODEL --backend "
                                "openvino -o NEW_FOLDER`") from err
    b = parse_ov_version(installed)[:VERSION_FIELDS]
    if a != b:
        raise SedeployError(f"The OpenVINO engine '{engine}' was saved by OpenVINO {built}; OpenVINO {installed} "
                            "is installed.", expected=f"the same OpenVINO release ({'.'.join(map(str, a))})",
                            fix=f"rebuild it here into a new folder, `sedeploy build-engine "
                                f"{sidecar.get('source_model') or 'MODEL'} --backend openvino -o NEW_FOLDER` (a "
                                f"build into the engine's own folder or ./engines replaces the whole build there), "
                                f"or install openvino=={'.'.join(map(str, a))}.*")


def layer_times(request) -> list[dict[str, Any]]:
    """The executed layers of an infer request's last inference, with their real time in µs (compiled with
    ``PERF_COUNT``): node name, type, kernel (exec_type, e.g. ``brgconv_avx512_amx_I8``), status."""
    out = []
    for p in request.get_profiling_info():
        status = str(p.status).rsplit(".", 1)[-1]
        if status != "EXECUTED":
            continue
        out.append({"name": p.node_name, "type": p.node_type, "exec_type": p.exec_type,
                    "real_us": p.real_time.total_seconds() * 1e6, "cpu_us": p.cpu_time.total_seconds() * 1e6})
    return out


def first_error_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith("Exception from")]
    return lines[0] if lines else type(err).__name__
