"""Which engines run together in one benchmark: names made unique, the FP32 reference, the check that every engine
is the same model as the reference (each differing field named), classifiers only, the batch sizes every engine
accepts and the label offset they record — all decided from metadata before anything runs."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from sedeploy.bench.engines import FIXED_BATCH_BACKENDS, IDENTITY_FIELDS, EngineSpec
from sedeploy.errors import SedeployError
from sedeploy.onnxcore import META, classifier_output, load_onnx

__all__ = ["unique_names", "pick_reference", "check_same_model", "check_classifiers", "check_batches",
           "label_offset_for", "choose_batches"]


def unique_names(specs: list[EngineSpec]) -> None:
    """Engine names are file names; files of the same name in different folders get the folder prepended."""
    seen: dict[str, int] = {}
    for s in specs:
        seen[s.name] = seen.get(s.name, 0) + 1
    for s in specs:
        if seen[s.name] > 1:
            s.name = f"{s.path.parent.name}/{s.name}"
    names = [s.name for s in specs]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise SedeployError(f"The same engine is listed twice: {', '.join(dups)}.", fix="list each engine once")


def pick_reference(specs: list[EngineSpec], reference: str | None) -> EngineSpec:
    """The engine drift is measured against: ``reference`` (a name or path), else the one FP32 engine."""
    if reference is not None:
        for s in specs:
            if reference in (s.name, str(s.path), s.path.name) or Path(reference).resolve() == s.path.resolve():
                return s
        raise SedeployError(f"The reference '{reference}' is not among the engines.",
                            expected=f"one of {', '.join(s.name for s in specs)}")
    fp32 = [s for s in specs if s.precision == "fp32"]
    if len(fp32) == 1:
        return fp32[0]
    listing = ", ".join(f"{s.name} ({s.precision})" for s in specs)
    if not fp32:
        raise SedeployError(f"No FP32 engine among {listing}: drift needs an FP32 reference.",
                            fix="add the FP32 artifact (model.fp32.onnx), or name the reference with --reference")
    raise SedeployError(f"Several FP32 engines ({', '.join(s.name for s in fp32)}): which one is the reference?",
                        fix=f"pass --reference {fp32[0].name}")


def check_same_model(specs: list[EngineSpec], reference: EngineSpec) -> None:
    """Refuse engines of another model than the reference, naming each engine and field that differs."""
    problems = []
    for s in specs:
        if s is reference:
            continue
        diffs = []
        if s.input_shape[1:] != reference.input_shape[1:]:
            diffs.append(f"input {'×'.join(map(str, s.input_shape[1:]))} vs "
                         f"{'×'.join(map(str, reference.input_shape[1:]))}")
        if s.num_classes and reference.num_classes and s.num_classes != reference.num_classes:
            diffs.append(f"{s.num_classes} classes vs {reference.num_classes}")
        for key in IDENTITY_FIELDS:
            if key == META.NUM_CLASSES:
                continue
            a, b = s.meta.get(key), reference.meta.get(key)
            if a is not None and b is not None and a != b:
                diffs.append(f"{key.removeprefix('sedeploy.')} {a!r} vs {b!r}")
        if diffs:
            problems.append(f"{s.name}: " + "; ".join(diffs))
    if problems:
        raise SedeployError(f"These engines are not the same model as the reference {reference.name}:\n    "
                            + "\n    ".join(problems),
                            fix="benchmark the engines of one model per run (the artifacts of one `sedeploy "
                                "build-engine` call)")


def check_classifiers(specs: list[EngineSpec]) -> None:
    """Every ONNX engine must be an image classifier (one N×classes output): refuse anything else up front."""
    for s in specs:
        if s.backend == "ort":
            classifier_output(load_onnx(s.path, weights=False, check=False), path=str(s.path))


def check_batches(specs: list[EngineSpec], batch_sizes: Sequence[int]) -> None:
    """Every batch size must fit every engine (a static batch, a TensorRT profile's max) — checked before timing."""
    for s in specs:
        if s.max_batch is None:
            continue
        static = s.backend in FIXED_BATCH_BACKENDS
        bad = [b for b in batch_sizes if (b != s.max_batch if static else b > s.max_batch)]
        if bad:
            what = (f"has a static batch of {s.max_batch}" if static
                    else f"has a TensorRT optimization profile up to batch {s.max_batch}")
            raise SedeployError(f"Batch size {', '.join(map(str, bad))} does not fit '{s.name}', which {what}.",
                                expected=f"batch sizes {'=' if static else '≤'} {s.max_batch} for this engine",
                                fix=f"pass --batch {s.max_batch}, or rebuild the engine with `sedeploy build-engine "
                                    + ("--dynamic-batch`" if static
                                       else f"--trt-profile MIN,OPT,MAX` covering {max(bad)}"))


def label_offset_for(specs: list[EngineSpec], given: int | None) -> tuple[int, str | None]:
    """The label offset to score with, and a warning when ``given`` (--label-offset) contradicts what the engines
    record (``build-engine --label-offset``, metadata :data:`META.LABEL_OFFSET`): the given one wins. Engines that
    record different offsets are refused, naming each."""
    recorded = {s.name: int(s.meta[META.LABEL_OFFSET]) for s in specs if s.meta.get(META.LABEL_OFFSET) is not None}
    if len(set(recorded.values())) > 1:
        raise SedeployError("These engines record different label offsets: "
                            + ", ".join(f"{n} (--label-offset {o})" for n, o in recorded.items()) + ".",
                            expected="the engines of one build (one label offset)",
                            fix="benchmark the engines of one `sedeploy build-engine` call, or rebuild them with "
                                "the same --label-offset")
    stored = next(iter(recorded.values()), None)
    if given is None:
        return (stored or 0), None
    if stored is not None and stored != given:
        return given, (f"--label-offset {given} overrides the label offset {stored} the engines were built with "
                       f"({', '.join(recorded)}); top-1 is scored with {given}.")
    return given, None


def choose_batches(specs: list[EngineSpec], given: Sequence[int] | None,
                   default: Sequence[int]) -> tuple[list[int], str | None]:
    """The batch sizes to time, and a note saying why when they are not the ones asked for. ``given`` (--batch)
    must fit every engine (:func:`check_batches`). Without it: ``default``, or the fixed batch the engines share
    (engines with different fixed batches are refused, naming each); sizes beyond a TensorRT profile are dropped."""
    if given is not None:
        check_batches(specs, given)
        return list(given), None
    fixed = {s.name: s.static_batch for s in specs if s.static_batch is not None}
    if len(set(fixed.values())) > 1:
        raise SedeployError("These engines have different fixed batches: "
                            + ", ".join(f"{n} (batch {b})" for n, b in fixed.items()) + ".",
                            expected="engines with one fixed batch (or a dynamic one) to time at the same batch sizes",
                            fix="benchmark them in separate runs, or rebuild them with `sedeploy build-engine "
                                "--dynamic-batch`")
    if fixed:
        batch = next(iter(fixed.values()))
        check_batches(specs, [batch])
        return [batch], (f"Batch {batch} only: the engines' fixed batch ({', '.join(fixed)}); --batch was not given "
                         "(`sedeploy build-engine --dynamic-batch` makes the batch dynamic).")
    top = min((s.max_batch for s in specs if s.max_batch is not None), default=None)
    if top is None or max(default) <= top:
        return list(default), None
    sizes = [b for b in default if b <= top] or [top]
    return sizes, (f"Batch {', '.join(map(str, sizes))}: the engines' TensorRT profile ends at batch {top}; "
                   "--batch was not given.")
