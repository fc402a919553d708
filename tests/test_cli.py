"""The command line: --json is parseable, errors are one clear message with a non-zero exit code."""
import json

import pytest
from click.testing import CliRunner

from sedeploy.cli import cli


@pytest.fixture()
def run():
    runner = CliRunner()

    def _run(*args):
        return runner.invoke(cli, list(map(str, args)), catch_exceptions=False)

    return _run


def test_help_flow_names_only_real_commands_and_options(run):
    """Every `sedeploy CMD … --opt` line of the top-level help must name a real command and real options of it
    (a renamed option would otherwise leave the help teaching a command that fails)."""
    import re

    from sedeploy.cli import cli

    res = run("--help")
    assert res.exit_code == 0
    flow = [line.split("sedeploy ", 1)[1] for line in res.output.splitlines() if line.strip().startswith("sedeploy ")]
    assert len(flow) >= 4, res.output
    for line in flow:
        cmd, *_ = line.split()
        assert cmd in cli.commands, f"help names a command that does not exist: {line!r}"
        sub = run(cmd, "--help")
        assert sub.exit_code == 0
        for opt in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", line):
            assert opt in sub.output, f"help line {line!r} uses {opt}, which `sedeploy {cmd}` does not have"


def test_info_json(run):
    res = run("info", "--depth", 101, "--json")
    card = json.loads(res.output)
    assert card["params"] == 49_326_872 and card["flops"] == 7_861_162_208 and card["se_blocks"] == 33


def test_info_plain_resnet(run):
    card = json.loads(run("info", "--depth", 50, "--no-se", "--json").output)
    assert card["se_blocks"] == 0 and card["params"] == 25_557_032


@pytest.mark.slow
def test_export_json_and_human(run, tmp_path):
    res = run("export", "--depth", 18, "--input-size", 64, "-o", tmp_path / "a.onnx", "--json")
    assert res.exit_code == 0
    out = json.loads(res.output)  # nothing but one JSON object on stdout
    assert out["weights"].startswith("random") and out["max_abs_diff"] <= 1e-4
    assert (tmp_path / "a.onnx").exists()
    res = run("export", "--depth", 18, "--input-size", 64, "-o", tmp_path / "b.onnx")
    assert "weights      random" in res.output and "top-1 agreement" in res.output


@pytest.mark.parametrize("args, message", [
    (["export", "--depth", "7"], "is not one of"),
    (["export", "--depth", "18", "--opset", "11"], "Opset 11 is not supported"),
    (["export", "--depth", "18", "--batch-size", "0"], "--batch-size 0 is not valid"),
    (["export", "--depth", "18", "--verify-images", "/nonexistent/dir"], "does not exist"),
])
def test_bad_input_exits_non_zero_with_one_message(run, tmp_path, args, message):
    res = run(*args, "-o", tmp_path / "x.onnx")
    assert res.exit_code == 2  # bad input (the exit codes of docs/commands.md)
    assert message in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "x.onnx").exists()


def test_export_tolerance_defaults_match_the_library():
    """The CLI spells its defaults out (importing sedeploy.export would load torch for every --help)."""
    from sedeploy import export as E

    params = {p.name: p.default for p in cli.commands["export"].params}
    assert (params["atol"], params["rtol"]) == (E.DEFAULT_ATOL, E.DEFAULT_RTOL)
    assert params["opset"] == E.DEFAULT_OPSET


def test_cli_defaults_written_out_match_the_library():
    """The CLI writes out two library defaults so that `--help` loads neither torch nor bench: they must agree."""
    from sedeploy import cli as C
    from sedeploy.bench.run import DEFAULT_BATCHES
    from sedeploy.model import SUPPORTED_DEPTHS

    assert C.parse_batch_list(C.DEFAULT_BATCH_TEXT) == list(DEFAULT_BATCHES)
    assert [int(d) for d in C.DEPTHS] == list(SUPPORTED_DEPTHS)


def test_help_lists_options_in_sections_and_hides_old_spellings(run):
    out = run("build-engine", "--help").output
    for title in ("Input and preprocessing:", "Calibration:", "INT8 budget:", "Engines:", "TensorRT profile:",
                  "Output:"):
        assert title in out, title
    assert "--trt-profile" in out and "-o, --out" in out
    for old in ("--out-dir", "--min-batch", "--opt-batch", "--max-batch"):
        assert old not in out, old
    assert out.index("\nCalibration:\n") < out.index("--calib-method") < out.index("\nINT8 budget:\n")
    for cmd in ("info", "export", "build-engine", "inspect", "bench", "package", "serve", "infer"):
        sub = run(cmd, "--help").output
        assert "--json" in sub and "--verbose" in sub and "Example" in sub, cmd


@pytest.mark.parametrize("args, message", [
    (["--trt-profile", "1,8"], "--trt-profile '1,8' is not valid"),
    (["--trt-profile", "0,8,32"], "--trt-profile '0,8,32' is not valid"),
    (["--trt-profile", "a,b,c"], "three comma-separated positive integers"),
    (["--trt-profile", "8,1,32"], "MIN ≤ OPT ≤ MAX"),
])
def test_trt_profile_is_validated(tmp_path, args, message):
    res = CliRunner().invoke(cli, ["build-engine", "--backend", "none", "-o", str(tmp_path / "e"), *args])
    assert res.exit_code == 2 and message in res.output and not (tmp_path / "e").exists()


def test_parse_trt_profile_merges_the_old_options():
    from sedeploy.cli import parse_trt_profile

    assert parse_trt_profile(None) == (1, 8, 32)
    assert parse_trt_profile("2,4,64") == (2, 4, 64)
    assert parse_trt_profile(None, max_batch=64) == (1, 8, 64)
    assert parse_trt_profile("2,4,64", opt_batch=2) == (2, 2, 64)


@pytest.mark.parametrize("command, old, new, given, profile", [
    ("export", "--output", "-o/--out", None, None),
    ("build-engine", "--out-dir", "-o/--out", None, (1, 8, 32)),
    ("build-engine", "--min-batch", "--trt-profile", "2", (2, 8, 32)),
    ("build-engine", "--opt-batch", "--trt-profile", "16", (1, 16, 32)),
    ("build-engine", "--max-batch", "--trt-profile", "64", (1, 8, 64)),
])
def test_old_spellings_still_work_with_a_deprecation_note(monkeypatch, tmp_path, command, old, new, given, profile):
    """Each old spelling reaches the library as the new one, and says on stderr what to use instead."""
    import sedeploy.cli.build_cmd
    import sedeploy.cli.model_cmds

    seen = {}

    class Stop(Exception):
        pass

    def fake_export(**kwargs):
        seen["out"] = kwargs["output"]
        raise Stop

    def fake_build(model, out, opts, **kwargs):
        seen["out"], seen["profile"] = out, (opts.engine.min_batch, opts.engine.opt_batch, opts.engine.max_batch)
        raise Stop

    monkeypatch.setattr(sedeploy.cli.model_cmds, "export_model", fake_export)
    monkeypatch.setattr(sedeploy.cli.build_cmd, "build_engines", fake_build)
    value = given or str(tmp_path / "x")
    res = CliRunner().invoke(cli, [command, old, value])
    assert isinstance(res.exception, Stop), res.output
    assert f"{old} is deprecated; use {new}" in res.output
    if given is None:
        assert str(seen["out"]) == value
    if profile:
        assert seen["profile"] == profile


def test_old_and_new_spelling_together_are_refused(run, tmp_path):
    res = CliRunner().invoke(cli, ["build-engine", "--out-dir", str(tmp_path / "a"), "-o", str(tmp_path / "b")])
    assert res.exit_code == 2 and "give only -o/--out" in res.output


def test_package_needs_no_triton_flag(monkeypatch, tmp_path):
    """Triton is the default format; --triton is still accepted."""
    import sedeploy.cli.serve_cmds as R

    calls = []
    monkeypatch.setattr(R, "package_triton", lambda *a, **k: calls.append((a, k)) or {"models": []})
    monkeypatch.setattr(R, "format_package", lambda res: "packaged")
    for extra in ([], ["--triton"]):
        res = CliRunner().invoke(cli, ["package", str(tmp_path), "-o", str(tmp_path / "repo"), *extra])
        assert res.exit_code == 0 and "packaged" in res.output, res.output
    assert len(calls) == 2 and calls[0] == calls[1]


def test_json_stdout_carries_only_the_json_whatever_libraries_print():
    """With --json, what a library prints to stdout while the command runs (NNCF's progress bars and log lines
    print there; a C library writes to file descriptor 1) goes to stderr: stdout parses as the one JSON object."""
    import subprocess
    import sys

    code = ("import json, logging, os, sys\n"
            "from sedeploy.cli.core import emit, json_only_stdout\n"
            "handler = logging.StreamHandler(sys.stdout)  # bound before, as a library's logger is at import\n"
            "with json_only_stdout():\n"
            "    print('python-level noise')\n"
            "    logging.getLogger('lib').addHandler(handler); logging.getLogger('lib').warning('logged noise')\n"
            "    os.write(1, b'fd-level noise\\n')\n"
            "    emit({'ok': True}, True, 'human')\n"
            "print('after')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    body, after = proc.stdout.rsplit("}", 1)
    assert json.loads(body + "}") == {"ok": True} and after.strip() == "after"
    for noise in ("python-level noise", "logged noise", "fd-level noise"):
        assert noise in proc.stderr and noise not in proc.stdout
