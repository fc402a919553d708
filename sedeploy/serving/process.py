"""The ``tritonserver`` process of ``sedeploy serve``: stopping it with its python stubs, quoting its error lines,
and removing the run folders of servers that were killed (see :mod:`sedeploy.serving.server` for the life cycle).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("sedeploy")

__all__ = ["KILL_GRACE_S", "WORKDIR_RE", "TritonProcess", "die_with_parent", "descendants", "is_running",
           "remove_stale_workdirs"]

#: seconds tritonserver may take beyond its own exit timeout before it (and its stubs) are killed
KILL_GRACE_S = 3.0


def die_with_parent() -> None:  # runs in the child before exec: tritonserver ends if sedeploy is killed
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(0), []):
            if c not in out:
                out.append(c)
                todo.append(c)
    return out


@dataclass
class TritonProcess:
    """A started ``tritonserver``: its process, its run folder and its log."""

    proc: subprocess.Popen
    workdir: Path
    log_path: Path
    log_handle: Any
    keep_log: bool

    def error_lines(self, limit: int = 4) -> list[str]:
        """tritonserver's error lines (glog 'E…' lines and 'error:'), messages only."""
        with contextlib.suppress(OSError):
            self.log_handle.flush()
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        lines = []
        for line in text.splitlines():
            m = re.match(r'^E\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] "?(.*?)"?$', line)
            if m and "CudaDriverHelper" not in m.group(1):  # said on every machine without a GPU driver
                lines.append(m.group(1))
            elif line.startswith("error:"):
                lines.append(line[len("error:"):].strip())
        # Triton quotes a python error with escaped newlines and the stub's "At:" stack: keep the message only
        lines = [" ".join(t.split("\\n\\nAt:")[0].replace("\\n", " ").split()) for t in lines]
        lines = [t for k, t in enumerate(lines) if not any(t in u for u in lines[k + 1:] if u != t)]
        return list(dict.fromkeys(lines))[-limit:]

    def stop(self, exit_timeout_s: float, force: threading.Event | None = None) -> None:
        """SIGINT (Triton's graceful stop: requests in flight get ``exit_timeout_s``), then SIGKILL for the server
        and its stubs when it is still there ``KILL_GRACE_S`` later, or at once when ``force`` is set."""
        family = descendants(self.proc.pid)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + exit_timeout_s + KILL_GRACE_S
        while self.proc.poll() is None and time.monotonic() < deadline and not (force and force.is_set()):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0.1)
        if self.proc.poll() is None:
            log.warning("tritonserver did not stop within %.0f s: killing it.", exit_timeout_s + KILL_GRACE_S)
            family = list(dict.fromkeys([*family, *descendants(self.proc.pid)]))
            self.proc.kill()
            self.proc.wait()
        # its python stubs end with it; one that lingers (tritonserver was killed) is ended here
        end = time.monotonic() + 2.0
        for pid in family:
            while is_running(pid) and time.monotonic() < end:
                time.sleep(0.05)
            if is_running(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.log_handle.close()
        shutil.rmtree(self.workdir, ignore_errors=True)  # the repository, the backend copy, the temporary log


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


WORKDIR_RE = re.compile(r"^sedeploy-serve-(\d+)-")


def remove_stale_workdirs(folder: str | Path | None = None) -> list[Path]:
    """Remove the run folders (``sedeploy-serve-<pid>-*`` in the temporary folder) of servers whose process is
    gone: a run killed with SIGKILL could not remove its own. Returns what was removed."""
    removed = []
    root = Path(folder or tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for d in root.iterdir():
            m = WORKDIR_RE.match(d.name)
            with contextlib.suppress(OSError):
                if (m and d.is_dir() and not d.is_symlink() and d.stat().st_uid == os.getuid()
                        and int(m.group(1)) != os.getpid() and not is_running(int(m.group(1)))):
                    shutil.rmtree(d)
                    removed.append(d)
    if removed:
        log.info("Removed %d folder(s) of serve runs that were killed: %s", len(removed),
                 ", ".join(d.name for d in removed))
    return removed
