"""`build-engine`'s options record: each part refuses its own bad values (one clear error, exit 2, nothing done),
the record checks what spans parts, the flat keywords land in their parts, and MODEL is read once per build."""
from __future__ import annotations

import dataclasses
import os
from collections import Counter

import pytest
from click.testing import CliRunner

from sedeploy.backends import EngineOptions
from sedeploy.build import BuildOptions, build_engines
from sedeploy.build.options import (PARTS, BudgetOptions, CalibrationOptions, PrecisionOptions, SourceOptions)
from sedeploy.cli import cli
from sedeploy.errors import SedeployError
from sedeploy.preprocess import Preprocess


def refused(check, *words):
    """``check()`` raises one SedeployError (exit 2) whose text names every word."""
    with pytest.raises(SedeployError) as info:
        check()
    text = str(info.value)
    assert info.value.exit_code == 2, text
    for word in words:
        assert word in text, text
    return info.value


@pytest.mark.parametrize("part, model, words", [
    (SourceOptions(depth=50), "m.onnx", ("--depth/--checkpoint", "m.onnx", "drop")),
    (SourceOptions(checkpoint="w.pth"), "m.onnx", ("--depth/--checkpoint",)),
    (SourceOptions(mean=(123.0, 116.0, 103.0)), None, ("foreign MODEL", "none was given")),
    (SourceOptions(input_shape=(48, 192)), None, ("--input-shape", "none was given")),
    (SourceOptions(preprocess=Preprocess(), std=(58.0, 57.0, 57.0)), "m.onnx", ("std", "both given")),
    (SourceOptions(mean=(0.485, 0.456, 0.406)), "m.onnx", ("--mean", "123.675")),
    (SourceOptions(label_offset=-1), None, ("--label-offset -1", "≥ 0")),
])
def test_the_source_part_refuses_what_cannot_describe_the_source(part, model, words):
    err = refused(lambda: part.check(model), *words)
    assert err.fix or err.expected  # says how to put it right


def test_the_source_part_accepts_what_fits():
    SourceOptions().check(None)
    SourceOptions(depth=50, checkpoint="w.pth").check(None)
    SourceOptions(mean=(123.675, 116.28, 103.53), input_shape=(48, 192), label_offset=1).check("m.onnx")


@pytest.mark.parametrize("kwargs, words", [
    ({"calib_batch": 0}, ("--calib-batch 0", "positive integer")),
    ({"calib_count": -3}, ("--calib-count -3", "positive integer")),
    ({"calib_count": True}, ("--calib-count True",)),
    ({"calib_method": "median"}, ("'median'", "minmax")),
    ({"calib_method": "entropy", "calib_count": 4}, ("--calib-count 4", "entropy")),
])
def test_the_calibration_part_refuses_bad_values(kwargs, words):
    refused(CalibrationOptions(**kwargs).check, *words)


def test_the_calibration_part_checks_the_folder_and_the_image_count(tmp_path, calib_dir):
    refused(CalibrationOptions(calib=tmp_path / "nowhere").check, "nowhere")
    few = CalibrationOptions(calib=calib_dir, calib_method="entropy", calib_count=4)
    refused(few.check, "needs at least", "--calib-count 4")
    few.check(calibrating=False)  # without --int8 the count does not matter (the folder is still checked)
    CalibrationOptions(calib=calib_dir, calib_method="minmax", calib_cache=tmp_path / "c.json").check()


def test_the_calibration_part_refuses_a_cache_that_cannot_be_written(tmp_path):
    refused(CalibrationOptions(calib_cache=tmp_path).check, "is a folder", "--calib-cache")


@pytest.mark.parametrize("kwargs, words", [
    ({"max_fallback": 3}, ("without a budget",)),
    ({"budget_confidence": 0.95}, ("without a budget", "--min-agreement")),
    ({"min_agreement": 150.0}, ("--min-agreement 150.0",)),
    ({"max_top1_drop": -1.0}, ("--max-top1-drop -1.0",)),
    ({"min_agreement": 99.0, "max_fallback": -1}, ("--max-fallback -1",)),
    ({"min_agreement": 99.0, "fallback_order": "random"}, ("'random'", "sensitivity")),
    ({"min_agreement": 99.0, "budget_confidence": 1.5}, ("--budget-confidence 1.5",)),
])
def test_the_budget_part_refuses_bad_values(kwargs, words):
    refused(BudgetOptions(**kwargs).check, *words)


def test_the_budget_part_is_on_with_either_bound():
    assert not BudgetOptions().enabled and not BudgetOptions().given()
    assert BudgetOptions(max_top1_drop=0.5).enabled and BudgetOptions(val="v").given()
    assert BudgetOptions(min_agreement=99.0, budget_confidence=0.9).budget().confidence == 0.9


@pytest.mark.parametrize("kwargs, words", [
    ({"se_int8": "int4"}, ("--se-int8 int4",)),
    ({"keep_fp32": "se"}, ("--keep-fp32 se", "neither --fp16 nor --int8")),
    ({"fp16": True, "keep_fp32": "nonsense"}, ("nonsense",)),
    ({"int8": True, "warn_agreement": 120.0}, ("--warn-agreement 120.0", "0 to 100")),
])
def test_the_precision_part_refuses_bad_values(kwargs, words):
    refused(PrecisionOptions(**kwargs).check, *words)


@pytest.mark.parametrize("flat, words", [
    ({"min_agreement": 99.0}, ("--int8 was not given",)),
    ({"val": "held-out"}, ("--int8 was not given",)),
    ({"warn_agreement": 90.0}, ("--int8 was not given",)),
    ({"backend": "tpu"}, ("Unknown backend 'tpu'",)),
    ({"workspace_gib": 0.0}, ("--workspace 0.0",)),
    ({"threads": 0}, ("threads",)),
    ({"min_batch": 8, "opt_batch": 4}, ("8",)),
])
def test_the_record_checks_what_spans_parts(flat, words):
    refused(BuildOptions.from_flat(**flat).check, *words)


def test_from_flat_puts_every_name_in_its_part():
    values = {}
    for name, part in PARTS.items():
        for f in dataclasses.fields(part):
            values[f.name] = (name, f"<{f.name}>")
    assert len(values) == sum(len(dataclasses.fields(p)) for p in PARTS.values())  # no name in two parts
    opts = BuildOptions.from_flat(**{k: v for k, (_, v) in values.items()}, backend="ort", progress=False)
    for field_name, (part, value) in values.items():
        assert getattr(getattr(opts, part), field_name) == value
    assert (opts.backend, opts.progress) == ("ort", False)
    assert BuildOptions.from_flat() == BuildOptions()
    assert isinstance(BuildOptions().engine, EngineOptions)
    with pytest.raises(TypeError):
        BuildOptions.from_flat(calibration_count=3)


@pytest.mark.parametrize("flat", [{"calib_batch": 0, "int8": True}, {"keep_fp32": "se"},
                                  {"max_fallback": 2, "int8": True}, {"label_offset": 10}])
def test_a_refused_option_does_no_work(tiny_onnx, tmp_path, flat):
    """Refused before anything is written: the output folder is not even made."""
    out = tmp_path / "new" / "out"
    with pytest.raises(SedeployError):
        build_engines(tiny_onnx, out, BuildOptions.from_flat(backend="none", progress=False, **flat))
    assert not (tmp_path / "new").exists()


@pytest.fixture
def model_reads(monkeypatch):
    """onnx.load calls per file (real path) made by the build itself; a backend building an engine from a file
    reads it on its own and is not counted."""
    import onnx

    import sedeploy.build.engines as stage

    reads: Counter = Counter()
    paused = []
    load, build = onnx.load, stage.build_engine

    def counting(f, *args, **kwargs):
        if not paused:
            reads[os.path.realpath(os.fspath(f))] += 1
        return load(f, *args, **kwargs)

    def backend_build(*args, **kwargs):
        paused.append(True)
        try:
            return build(*args, **kwargs)
        finally:
            paused.pop()

    monkeypatch.setattr(onnx, "load", counting)
    monkeypatch.setattr(stage, "build_engine", backend_build)
    return reads


@pytest.mark.parametrize("extra", [[], ["--mean", "120,110,100", "--std", "60,60,60", "--resize", "36"]])
def test_build_engine_reads_the_model_file_once(tiny_onnx, tmp_path, model_reads, extra):
    """MODEL is read once per build, also when --mean/--std/… make its preprocessing (which needs its input
    size); the read is completed and passed along, not repeated."""
    res = CliRunner().invoke(cli, ["build-engine", str(tiny_onnx), "--backend", "ort", "--threads", "1", "--json",
                                   "-o", str(tmp_path / "o"), *extra])
    assert res.exit_code == 0, res.output
    assert model_reads[os.path.realpath(tiny_onnx)] == 1, dict(model_reads)


def test_an_artifact_given_as_model_is_read_once(tiny_artifacts, tmp_path, model_reads):
    """An artifact built as it is (here the TensorRT INT8 form on ONNX Runtime, whose FP16 parts are looked at) is
    read once by the build; only the backend reads the file again to build its engine."""
    given = tiny_artifacts["int8-trt"]
    res = CliRunner().invoke(cli, ["build-engine", str(given), "--backend", "ort", "--threads", "1", "--json",
                                   "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert model_reads[os.path.realpath(given)] == 1, dict(model_reads)
