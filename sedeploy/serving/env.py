"""What the serve extra needs from this machine, checked (not assumed) before a server starts.

Two traps are detected here:

1. **The python-backend stub's libpython.** PyTriton runs the model through Triton's python backend, whose stub
   (``pytriton/tritonserver/python_backend_stubs/3.X/triton_python_backend_stub``) is linked against
   ``libpython3.X.so.1.0`` by soname. On a machine where the system has its own ``libpython3.X`` (Debian's
   3.11.2) but ``python3`` is another build (pyenv's 3.11.7), the stub loads the system library and runs the
   interpreter's standard library on it; model load then fails with
   ``'_thread.RLock' object has no attribute '_recursion_count'``. :func:`stub_library_path` resolves which
   libpython the stub would load (``ldd``) and, when it is not this interpreter's own
   (``sysconfig LIBDIR/INSTSONAME``), returns ``LIBDIR`` to put first on ``LD_LIBRARY_PATH``.
2. **numpy 2.** nvidia-pytriton 0.7 declares ``numpy<2``: with numpy 2 its stub returns empty output tensors
   ("output tensor shape does not match size of output"). :func:`check_pytriton` refuses that combination with
   the fix instead of serving wrong answers.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from sedeploy.errors import IncompatibleDependencyError, MissingDependencyError, SedeployError

log = logging.getLogger("sedeploy")

SERVE_EXTRA = "serve"


def require_client(purpose: str) -> None:
    """tritonclient (HTTP/gRPC client and Triton's ModelConfig protobuf) must be importable (exit 4 otherwise)."""
    if importlib.util.find_spec("tritonclient") is None:
        raise MissingDependencyError("tritonclient", SERVE_EXTRA, purpose)
    for part in ("tritonclient.http", "tritonclient.grpc"):
        try:
            importlib.import_module(part)
        except ImportError as err:
            raise SedeployError(f"{purpose} needs '{part}', which does not import here ({err}).",
                                fix=f"pip install 'sedeploy[{SERVE_EXTRA}]' (installs tritonclient[http,grpc])") from err


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def check_pytriton() -> None:
    """PyTriton must be importable and run with a numpy it supports (see the module docstring)."""
    if importlib.util.find_spec("pytriton") is None:
        raise MissingDependencyError("nvidia-pytriton", SERVE_EXTRA, "Serving with Triton Inference Server")
    import numpy as np

    requires = importlib.metadata.requires("nvidia-pytriton") or []
    numpy_caps = [m.group(1) for r in requires if (m := re.match(r"numpy\b[^;]*<\s*([\d.]+)", r.replace(" ", "")))]
    if numpy_caps and _version_tuple(np.__version__) >= _version_tuple(numpy_caps[0]):
        raise IncompatibleDependencyError(
            f"nvidia-pytriton {importlib.metadata.version('nvidia-pytriton')} supports numpy < {numpy_caps[0]}, "
            f"but numpy {np.__version__} is installed: its Triton python-backend stub would return empty tensors.",
            expected=f"numpy < {numpy_caps[0]} in the environment that serves",
            fix=f"pip install 'sedeploy[{SERVE_EXTRA}]' in a fresh environment (it resolves numpy < "
                f"{numpy_caps[0]}), or pip install 'numpy<{numpy_caps[0]}'")


@dataclass(frozen=True)
class StubLibpython:
    """Which libpython the python-backend stub loads, and which one this interpreter is."""

    stub: Path | None  # the stub binary for this Python version
    loads: Path | None  # what the dynamic loader resolves for the stub's libpython soname
    ours: Path | None  # this interpreter's shared libpython (None: a static build)
    fix_dir: Path | None  # the folder to put first on LD_LIBRARY_PATH (None: nothing to fix)

    def as_dict(self) -> dict:
        return {k: str(v) if v is not None else None for k, v in self.__dict__.items()}


def _interpreter_libpython() -> Path | None:
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not libdir or not soname or not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    path = Path(libdir) / soname
    return path if path.is_file() else None


def _ldd_libpython(binary: Path, env: dict[str, str]) -> Path | None:
    ldd = shutil.which("ldd")
    if ldd is None:
        return None
    out = subprocess.run([ldd, str(binary)], capture_output=True, text=True, env=env, timeout=30, check=False).stdout
    for line in out.splitlines():
        m = re.match(r"\s*libpython[\d.]+\.so[\d.]*\s*=>\s*(\S+)", line)
        if m and m.group(1) != "not":
            return Path(m.group(1))
    return None


def stub_libpython(env: dict[str, str] | None = None) -> StubLibpython:
    """Resolve the python-backend stub's libpython under ``env`` (default: this process's environment)."""
    import pytriton

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = Path(pytriton.__file__).parent / "tritonserver" / "python_backend_stubs" / version / \
        "triton_python_backend_stub"
    ours = _interpreter_libpython()
    if not stub.is_file():
        return StubLibpython(None, None, ours, None)
    loads = _ldd_libpython(stub, dict(env if env is not None else os.environ))
    same = loads is not None and ours is not None and loads.resolve() == ours.resolve()
    fix = ours.parent if (ours is not None and not same) else None
    return StubLibpython(stub, loads, ours, fix)


@dataclass(frozen=True)
class TritonDistribution:
    """The parts of PyTriton's bundled Triton Inference Server that ``sedeploy serve`` runs."""

    server: Path  # the tritonserver binary
    python_backend: Path  # Triton's python backend (libtriton_python.so, triton_python_backend_utils.py)
    stub: Path  # the python-backend stub built for this interpreter's Python version
    libs: Path  # the shared libraries tritonserver needs (on LD_LIBRARY_PATH)


def triton_distribution() -> TritonDistribution:
    """Locate PyTriton's tritonserver, python backend and this Python's stub; a clear error when one is missing."""
    import pytriton
    from pytriton.utils.distribution import get_libs_path

    root = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    dist = TritonDistribution(server=root / "bin" / "tritonserver", python_backend=root / "backends" / "python",
                              stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
                              libs=Path(get_libs_path()))
    for part in (dist.server, dist.python_backend / "libtriton_python.so", dist.stub):
        if not part.is_file():
            raise SedeployError(f"The nvidia-pytriton installation lacks '{part}' (Python {version}).",
                                expected="nvidia-pytriton with tritonserver and a python-backend stub for this "
                                         "Python version",
                                fix=f"pip install --force-reinstall 'sedeploy[{SERVE_EXTRA}]'")
    return dist


def server_environment() -> dict[str, str]:
    """The variables to set before PyTriton starts ``tritonserver`` (which copies ``os.environ``): today only
    ``LD_LIBRARY_PATH`` when the stub would load another libpython than this interpreter's."""
    info = stub_libpython()
    if info.fix_dir is None:
        return {}
    current = os.environ.get("LD_LIBRARY_PATH", "")
    log.info("The Triton python-backend stub would load %s, this interpreter is %s: putting %s first on "
             "LD_LIBRARY_PATH for the server.", info.loads, info.ours, info.fix_dir)
    return {"LD_LIBRARY_PATH": os.pathsep.join([str(info.fix_dir), *([current] if current else [])])}
