"""The real TensorRT Python bindings (10.x and 11.x) on a machine without TensorRT: where the wheels come from, how
they are unpacked, and the stub native libraries that let them import.

``tensorrt-cu12-bindings`` wheels (≈1.3 MB, module ``tensorrt_bindings``) install anywhere, but their
``tensorrt.so`` links ``libnvinfer.so.N``, ``libnvonnxparser.so.N`` and ``libnvinfer_plugin.so.N``, which only
NVIDIA's index serves. ``tests/trt_stubs/stub.c`` exports the entry points the bindings need at import, every
factory returning NULL; compiled with the right sonames it lets the *real* module import: real enums with their
real values, ``Dims``, ``ILogger``, pybind11 signatures and argument checks. Nothing reaches a native builder.

Wheels: ``$SEDEPLOY_TRT_WHEELS`` or ``<repo>/.cache/trt-wheels/`` (``python tests/trt_bindings.py download``
fetches :data:`VERSIONS` there with ``pip download``; CI runs it). A wheel is unpacked (it is a zip) into a cache
folder, never installed: installed, ``import tensorrt`` would succeed in the main test process and change what
every other test sees. Each TensorRT version is imported in a process of its own (two cannot share one).

Caches (content-addressed, written atomically, safe for concurrent pytest-xdist workers):
``<repo>/.cache/trt-bindings/`` or ``$SEDEPLOY_TRT_BINDINGS_CACHE``.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUB_SOURCE = Path(__file__).resolve().parent / "trt_stubs" / "stub.c"
#: One release of each major version, tested against (the newest binding wheels on PyPI when written).
VERSIONS = {10: "10.16.1.11", 11: "11.4.0.106"}
WHEEL_PACKAGE = "tensorrt-cu12-bindings"
STUB_LIBRARIES = ("nvinfer", "nvonnxparser", "nvinfer_plugin")
#: The C symbols the bindings take from the native libraries at import (10.16 / 11.4: ``nm -D --undefined-only
#: tensorrt.so``; getInferLibVersion is exported too for releases that ask).
STUB_SYMBOLS = ("createInferBuilder_INTERNAL", "createInferRefitter_INTERNAL", "createInferRuntime_INTERNAL",
                "createNvOnnxParser_INTERNAL", "createNvOnnxParserRefitter_INTERNAL", "getBuilderPluginRegistry",
                "getNvOnnxParserVersion", "getPluginRegistry", "initLibNvInferPlugins", "getInferLibVersion")


class Unavailable(Exception):
    """The real bindings cannot be set up here; the message says exactly why and how to fix it."""


def wheel_dir() -> Path:
    return Path(os.environ.get("SEDEPLOY_TRT_WHEELS") or REPO / ".cache" / "trt-wheels")


def cache_dir() -> Path:
    return Path(os.environ.get("SEDEPLOY_TRT_BINDINGS_CACHE") or REPO / ".cache" / "trt-bindings")


def python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def find_wheel(version: str, folder: Path | None = None) -> Path:
    folder = Path(folder or wheel_dir())
    stem = f"{WHEEL_PACKAGE.replace('-', '_')}-{version}-"
    found = sorted(folder.glob(f"{stem}*.whl")) if folder.is_dir() else []
    fitting = [w for w in found if f"-{python_tag()}-" in w.name and "linux" in w.name
               and w.name.endswith("_x86_64.whl")]
    if not fitting:
        why = (f"only {', '.join(w.name for w in found)} (not {python_tag()} linux x86-64)" if found else
               f"no {stem}*.whl in {folder}")
        raise Unavailable(f"TensorRT {version} binding wheel missing: {why}. Fetch it with `python "
                          f"tests/trt_bindings.py download` (pip download --no-deps --only-binary=:all: "
                          f"{WHEEL_PACKAGE}=={version} -d {folder}) or set SEDEPLOY_TRT_WHEELS")
    return fitting[-1]


@contextmanager
def locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _publish_dir(final: Path, fill) -> Path:
    """Create ``final`` once: fill a temporary sibling, then rename it (under a lock: one writer)."""
    if final.is_dir():
        return final
    with locked(final.with_name(final.name + ".lock")):
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
        try:
            fill(tmp)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def unpacked(wheel: Path) -> Path:
    """The wheel's contents (``tensorrt_bindings/``), unpacked once per wheel content."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()[:16]
    final = cache_dir() / f"{wheel.stem}-{digest}"

    def fill(tmp: Path) -> None:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)
        if not (tmp / "tensorrt_bindings" / "tensorrt.so").is_file():
            raise Unavailable(f"{wheel.name} has no tensorrt_bindings/tensorrt.so")
    return _publish_dir(final, fill)


def encoded_version(version: str) -> int:
    major, minor, patch = (int(x) for x in (re.findall(r"\d+", version) + ["0", "0"])[:3])
    return major * 10000 + minor * 100 + patch


def compiler() -> str:
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise Unavailable("no C compiler (gcc or cc on PATH, or $CC) to build the stub TensorRT libraries from "
                      f"{STUB_SOURCE.relative_to(REPO)}; install gcc (apt-get install gcc)")


def stub_libraries(version: str) -> Path:
    """A folder with ``libnvinfer.so.N``, ``libnvonnxparser.so.N``, ``libnvinfer_plugin.so.N`` (N: the major
    version) compiled from tests/trt_stubs/stub.c; cached by the hash of the source, version and compiler."""
    cc = compiler()
    major = version.split(".")[0]
    code = encoded_version(version)
    key = hashlib.sha256(STUB_SOURCE.read_bytes() + f"|{code}|{cc}".encode()).hexdigest()[:16]
    final = cache_dir() / f"stubs-{major}-{key}"

    def fill(tmp: Path) -> None:
        for lib in STUB_LIBRARIES:
            name = f"lib{lib}.so.{major}"
            cmd = [cc, "-shared", "-fPIC", "-O1", f"-DSTUB_TRT_VERSION={code}", f"-Wl,-soname,{name}",
                   "-o", str(tmp / name), str(STUB_SOURCE)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise Unavailable(f"compiling the stub {name} failed ({' '.join(cmd)}):\n{done.stderr}")
    return _publish_dir(final, fill)


def environment(version: str) -> dict[str, str]:
    """Environment of a process that imports the real ``tensorrt_bindings`` of ``version`` over the stubs.
    Raises :class:`Unavailable` with the reason when the wheel or a compiler is missing."""
    wheel = find_wheel(version)
    site = unpacked(wheel)
    stubs = stub_libraries(version)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(stubs), env.get("LD_LIBRARY_PATH")) if p)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(site), env.get("PYTHONPATH")) if p)
    env["SEDEPLOY_TRT_BINDINGS_VERSION"] = version
    env["SEDEPLOY_TRT_BINDINGS_SITE"] = str(site)
    return env


def download(dest: Path | None = None) -> list[Path]:
    """``pip download`` the binding wheels of :data:`VERSIONS` (no dependencies, binary only) into ``dest``."""
    dest = Path(dest or wheel_dir())
    dest.mkdir(parents=True, exist_ok=True)
    for version in VERSIONS.values():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(dest), f"{WHEEL_PACKAGE}=={version}"], check=True)
    return [find_wheel(v, dest) for v in VERSIONS.values()]


if __name__ == "__main__":
    if sys.argv[1:2] != ["download"] or len(sys.argv) > 3:
        sys.exit("usage: python tests/trt_bindings.py download [DEST]   (default: $SEDEPLOY_TRT_WHEELS or "
                 ".cache/trt-wheels)")
    for path in download(Path(sys.argv[2]) if len(sys.argv) == 3 else None):
        print(path)
