"""What every benchmark script shares: where its results go and the provenance they carry.

Each script ``benchmarks/<name>.py`` or ``benchmarks/experiments/<name>.py`` writes to
``benchmarks/results/<name>/`` (:func:`results_dir`), and every results file records the machine (CPU, cores, load
average, library versions — :func:`sedeploy.bench.report.machine_description`), the exact command and the git
commit it ran at (:func:`provenance`), so a figure in the docs can always be traced to the run that made it.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
SHARED_DATA = REPO.parent / "shared" / "data"


def results_dir(script: str | Path) -> Path:
    """``benchmarks/results/<script name>/`` (created): the one folder a script writes to."""
    out = RESULTS / Path(script).stem
    out.mkdir(parents=True, exist_ok=True)
    return out


def script_path(script: str | Path) -> str:
    """The script as typed from the repository root: ``benchmarks/<name>.py`` or ``benchmarks/experiments/<name>.py``
    (a script outside the repository is named as if it were in ``benchmarks/``)."""
    path = Path(script).resolve()
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return f"benchmarks/{path.name}"


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def provenance(script: str | Path, argv: list[str] | None = None) -> dict[str, Any]:
    """Machine, versions, command and commit of this run."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from sedeploy.bench.report import machine_description

    args = sys.argv[1:] if argv is None else argv
    return {"command": shlex.join(["python", script_path(script), *args]),
            "git_commit": _git_commit(), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "machine": machine_description()}


def provenance_markdown(p: dict[str, Any]) -> str:
    m = p.get("machine", {})
    versions = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())
    return "\n".join([
        f"- Command: `{p.get('command')}` (commit {p.get('git_commit') or 'unknown'}, {p.get('date_utc')} UTC)",
        f"- Machine: {m.get('cpu', '?')}, {m.get('usable_cores', '?')} usable cores, load average {m.get('loadavg', '?')}",
        f"- Versions: {versions or '?'}",
    ])


def write_results(script: str | Path, data: dict[str, Any], markdown: str | None = None, *,
                  argv: list[str] | None = None, name: str = "results") -> Path:
    """Write ``<name>.json`` (``data`` plus ``provenance``) and, when given, ``<name>.md`` (the markdown with a
    provenance footer) into the script's results folder, atomically. Returns the folder."""
    from sedeploy.fsutil import atomic_write_text

    out = results_dir(script)
    prov = data.get("provenance") or provenance(script, argv)
    atomic_write_text(out / f"{name}.json", json.dumps({**data, "provenance": prov}, indent=1, default=str) + "\n")
    if markdown is not None:
        atomic_write_text(out / f"{name}.md", markdown.rstrip() + "\n\n## Provenance\n" + provenance_markdown(prov)
                          + "\n")
    return out


def time_activated(runners: dict, images, **kwargs):
    """:func:`sedeploy.backends.timing.time_runners` over ``runners`` activated for the call and deactivated after it,
    also when timing fails (each script times its engines this way)."""
    from sedeploy.backends.timing import time_runners

    active = []
    try:
        for r in runners.values():
            r.activate()
            active.append(r)
        return time_runners(runners, images, **kwargs)
    finally:
        for r in active:
            r.deactivate()
