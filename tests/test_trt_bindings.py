"""sedeploy's TensorRT backend through the real TensorRT Python bindings of one 10.x and one 11.x release.

Each release runs tests/trt_bindings_cases.py in a process of its own (two TensorRT versions cannot share one), set
up by tests/trt_bindings.py: the binding wheel unpacked (from ``$SEDEPLOY_TRT_WHEELS`` or ``.cache/trt-wheels/``;
``python tests/trt_bindings.py download`` fetches them) over stub native libraries compiled from
tests/trt_stubs/stub.c. One test here per case and release reports that case's outcome in that process; they skip,
with the reason, when a wheel or a C compiler is missing. Only the binding layer is real: no TensorRT engine is
built or run (see tests/trt_bindings_cases.py).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import trt_bindings as tb

CASES_FILE = Path(__file__).resolve().parent / "trt_bindings_cases.py"
CASES = [node.name for node in ast.parse(CASES_FILE.read_text()).body
         if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
INNER_TIMEOUT_S = 300


def _parse_junit(path: Path) -> dict[str, dict[str, str]]:
    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        status, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = child.tag
                text = f"{child.get('message', '')}\n{child.text or ''}".strip()
                break
        cases[case.get("name")] = {"status": status, "text": text[-4000:]}
    return cases


def _run_releases(root: Path, artifacts) -> dict[str, dict]:
    """Run tests/trt_bindings_cases.py for every release in :data:`trt_bindings.VERSIONS`, in parallel, one
    process per release; a release that cannot be set up is recorded with the reason. ``artifacts()`` makes the
    tiny model's artifacts (only when some release can run)."""
    started, results = {}, {}
    for version in tb.VERSIONS.values():
        try:
            env = tb.environment(version)
        except tb.Unavailable as err:
            results[version] = {"unavailable": str(err)}
            continue
        for key in [k for k in env if k.startswith("PYTEST_XDIST") or k == "PYTEST_CURRENT_TEST"]:
            del env[key]
        env["SEDEPLOY_TRT_ARTIFACTS"] = json.dumps({k: str(v) for k, v in artifacts().items()})
        junit = root / f"junit-{version}.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={root / version}",
               f"--junitxml={junit}", str(CASES_FILE)]
        log = open(root / f"output-{version}.txt", "w+")
        started[version] = (subprocess.Popen(cmd, env=env, cwd=tb.REPO, stdout=log, stderr=subprocess.STDOUT),
                            log, junit)
    for version, (proc, log, junit) in started.items():
        try:
            returncode = proc.wait(timeout=INNER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = proc.wait()
        log.seek(0)
        tail = log.read()[-6000:]
        log.close()
        results[version] = {"version": version, "returncode": returncode, "tail": tail,
                            "cases": _parse_junit(junit) if junit.is_file() else {}}
    return results


@pytest.fixture(scope="session")
def release_results(run_folder, request):
    """``get(version)``: the outcome of every case in that release's process; all releases run once per pytest
    run (the first xdist worker to ask runs them, the others read its results)."""
    root = run_folder / "trt-bindings-runs"  # one per run, shared by its xdist workers
    root.mkdir(parents=True, exist_ok=True)
    memo: dict[str, dict] = {}

    def get(version: str) -> dict:
        if not memo:
            result_file = root / "results.json"
            with tb.locked(root / "results.lock"):
                if not result_file.is_file():
                    made = _run_releases(root, lambda: request.getfixturevalue("tiny_artifacts"))
                    result_file.write_text(json.dumps(made))
                memo.update(json.loads(result_file.read_text()))
        result = memo[version]
        if "unavailable" in result:
            pytest.skip(result["unavailable"])
        return result
    return get


@pytest.mark.slow
@pytest.mark.trt_bindings
@pytest.mark.parametrize("version", [tb.VERSIONS[10], tb.VERSIONS[11]])
@pytest.mark.parametrize("case", CASES)
def test_backend_through_real_bindings(release_results, version, case):
    result = release_results(version)
    mine = {name: r for name, r in result["cases"].items() if name == case or name.startswith(case + "[")}
    assert mine, (f"{case} did not run in the TensorRT {version} process (exit {result['returncode']}):\n"
                  f"{result['tail']}")
    bad = {name: r for name, r in mine.items() if r["status"] != "passed"}  # skipped counts as not passed
    assert not bad, "\n\n".join(f"{name} [{r['status']}] under the real TensorRT {version} bindings:\n{r['text']}"
                                for name, r in bad.items())


@pytest.mark.slow
@pytest.mark.trt_bindings
@pytest.mark.parametrize("version", [tb.VERSIONS[10], tb.VERSIONS[11]])
def test_release_process_ran_every_case_and_nothing_else_failed(release_results, version):
    result = release_results(version)
    ran = {name.split("[", 1)[0] for name in result["cases"]}
    assert ran == set(CASES), f"cases run: {sorted(ran)}; expected {sorted(CASES)}\n{result['tail']}"
    assert result["returncode"] == 0, result["tail"]


# ------------------------------------------------------------- the set-up itself (runs everywhere, no wheel)
def test_missing_wheel_is_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("SEDEPLOY_TRT_WHEELS", str(tmp_path))
    with pytest.raises(tb.Unavailable, match=r"TensorRT 10\.16\.1\.11 binding wheel missing: no "
                                             r"tensorrt_cu12_bindings-10\.16\.1\.11-\*\.whl in ") as err:
        tb.find_wheel("10.16.1.11")
    assert "python tests/trt_bindings.py download" in str(err.value)
    (tmp_path / "tensorrt_cu12_bindings-10.16.1.11-cp39-none-manylinux_2_28_x86_64.whl").write_bytes(b"")
    with pytest.raises(tb.Unavailable, match=rf"not {tb.python_tag()} linux x86-64"):
        tb.find_wheel("10.16.1.11")


def test_missing_compiler_is_named(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(tb.Unavailable, match="no C compiler"):
        tb.compiler()


def test_encoded_version_is_tensorrts():
    assert tb.encoded_version("10.16.1.11") == 101601 and tb.encoded_version("11.4.0.106") == 110400
    assert tb.encoded_version("11") == 110000
