"""File names of a build: artifact kinds and their suffixes, engine and sidecar suffixes, the manifest's name.

The one place that knows how sedeploy names what it writes. It sits below :mod:`sedeploy.onnxcore` and imports
nothing of sedeploy's but :mod:`sedeploy.errors` (and :mod:`sedeploy.fsutil` to write the manifest), so every layer
(ONNX loading, backends, the build, bench, serving) can ask it without an import cycle::

    <stem>.<kind>.onnx                 a portable artifact        (kind: fp32, fp16, int8-trt, int8-cpu, int8-ov)
    <stem>.<kind>.ort-opt.onnx         an ONNX Runtime engine  +  <stem>.<kind>.ort.json   (its sidecar)
    <stem>.<kind>.plan                 a TensorRT engine       +  <stem>.<kind>.trt.json
    <stem>.<kind>.ov.xml / .ov.bin     an OpenVINO engine      +  <stem>.<kind>.ov.json
    manifest.json                      what one build wrote (read by bench, package, serve and the next build)

:class:`Manifest` is the one reader and writer of ``manifest.json``: one validation, typed accessors, and one rule
for which file a recorded path stands for (:meth:`Manifest.locate`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sedeploy.errors import SedeployError
from sedeploy.fsutil import atomic_write_text

#: the file a build-engine output folder lists its artifacts and engines in (read by bench, package, peers)
MANIFEST = "manifest.json"
#: artifact kinds: the precision plus, for INT8, the flavour (the backend family the Q/DQ form is made for)
KINDS = ("fp32", "fp16", "int8-trt", "int8-cpu", "int8-ov")
INT8_FLAVOURS = ("trt", "cpu", "ov")

#: per backend (the ``--backend`` name): the ending of its engine files and of their JSON sidecars
ENGINE_SUFFIX = {"ort": ".ort-opt.onnx", "trt": ".plan", "openvino": ".ov.xml"}
SIDECAR_SUFFIX = {"ort": ".ort.json", "trt": ".trt.json", "openvino": ".ov.json"}
#: an OpenVINO engine's weights, written beside its ``.ov.xml``
OPENVINO_WEIGHTS_SUFFIX = ".ov.bin"

#: files a build writes that are not ONNX models, and what each is (named when one is given as a model)
NOT_A_MODEL = ((ENGINE_SUFFIX["openvino"], "an OpenVINO engine (IR)"),
               (OPENVINO_WEIGHTS_SUFFIX, "an OpenVINO engine's weights file"),
               (ENGINE_SUFFIX["trt"], "a TensorRT engine"),
               *((suffix, "an engine's sidecar") for suffix in SIDECAR_SUFFIX.values()))

# what artifact_stem strips: the kinds and the engines' own markers
_NAME_MARKERS = tuple(f".{k}" for k in KINDS) + (".ort-opt", ".ov")


def artifact_path(out_dir: str | Path, stem: str, kind: str) -> Path:
    """``<out_dir>/<stem>.<kind>.onnx``."""
    if kind not in KINDS:
        raise SedeployError(f"Unknown artifact kind {kind!r}.", expected=f"one of {', '.join(KINDS)}")
    return Path(out_dir) / f"{stem}.{kind}.onnx"


def artifact_stem(path: str | Path) -> str:
    """``se-resnet50.int8-cpu.onnx`` → ``se-resnet50``: artifacts of artifacts keep the model's name."""
    stem = Path(path).name
    for ext in (".onnx", ".plan", ".xml", ".blob"):
        stem = stem.removesuffix(ext)
    for marker in _NAME_MARKERS:
        stem = stem.removesuffix(marker)
    return stem


def engine_paths(out_dir: str | Path, source: str | Path, backend: str) -> tuple[Path, Path]:
    """(engine file, sidecar) that ``backend`` writes in ``out_dir`` for the ONNX file ``source``
    (``x.fp32.onnx`` → ``x.fp32.plan`` + ``x.fp32.trt.json``)."""
    stem = Path(source).name.removesuffix(".onnx")
    out = Path(out_dir)
    return out / f"{stem}{ENGINE_SUFFIX[backend]}", out / f"{stem}{SIDECAR_SUFFIX[backend]}"


def engine_stem(engine: str | Path) -> str:
    """An engine or artifact file name without its engine ending (``x.fp32.ov.xml`` → ``x.fp32``,
    ``x.fp32.onnx`` → ``x.fp32``)."""
    name = Path(engine).name
    for suffix in (*ENGINE_SUFFIX.values(), ".onnx"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class Manifest:
    """A build-engine output folder's ``manifest.json``, read and checked once (:meth:`read`).

    Recorded paths are as the build wrote them (relative to where it ran, or absolute); :meth:`locate` turns one
    into the file of *this* folder. What the build wrote into its output folder is taken from this folder whatever
    path was recorded, so a copied or moved folder never uses the files of the folder it came from; an input the
    build used where it was (an FP16/INT8 artifact given as MODEL, recorded outside the output folder) is taken
    from its recorded path."""

    def __init__(self, folder: str | Path, data: dict[str, Any], *, alternative: str | None = None):
        self.folder, self.data, self.alternative = Path(folder), data, alternative

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST

    @staticmethod
    def present(folder: str | Path) -> bool:
        """Does ``folder`` hold a ``manifest.json``?"""
        return (Path(folder) / MANIFEST).is_file()

    @classmethod
    def read(cls, folder: str | Path, *, alternative: str | None = None) -> "Manifest":
        """The manifest of ``folder``, or one clear error: missing, unreadable, not JSON, not an object, or
        ``engines``/``artifacts`` not lists of objects with a ``path``. ``alternative``: what else the command
        takes instead of a build folder (said in the error, e.g. "the engine files themselves")."""
        d = Path(folder)
        path = d / MANIFEST
        otherwise = f", or pass {alternative}" if alternative else ""
        rebuild = f"rebuild with `sedeploy build-engine … -o {d}`{otherwise}"
        if not path.is_file():
            raise SedeployError(f"'{d}' has no {MANIFEST}.",
                                expected="a folder written by `sedeploy build-engine`"
                                         + (f", or {alternative}" if alternative else ""),
                                fix=f"run `sedeploy build-engine MODEL -o {d}` first{otherwise}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SedeployError(f"'{path}' is not valid JSON ({err}).", fix=rebuild) from err
        except OSError as err:
            raise SedeployError(f"'{path}' cannot be read ({err.strerror or err}).",
                                fix="fix its permissions, or " + rebuild) from err
        if not isinstance(data, dict) or not all(_entries_ok(data.get(key)) for key in ("engines", "artifacts")):
            raise SedeployError(f"'{path}' is not a build-engine manifest.",
                                expected='an object whose "engines" and "artifacts" lists hold objects with a "path"',
                                fix=rebuild)
        return cls(d, data, alternative=alternative)

    @staticmethod
    def write(folder: str | Path, data: dict[str, Any]) -> Path:
        """Write ``data`` as ``folder``'s ``manifest.json``, atomically (a reader sees the old file or the new)."""
        return atomic_write_text(Path(folder) / MANIFEST, json.dumps(data, indent=2, default=str) + "\n")

    @property
    def engines(self) -> list[dict[str, Any]]:
        """The engine entries (copies): ``path``, ``sidecar``, ``backend``, ``precision``, ``from``, ``files`` …"""
        return [dict(e) for e in self.data.get("engines") or []]

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        """The portable ONNX artifact entries (copies): ``path``, ``kind``, ``precision``, ``flavour``, ``report``."""
        return [dict(a) for a in self.data.get("artifacts") or []]

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The INT8 calibration record (``folder``, ``images``, ``seed``, ``skipped`` …), None when the build did
        not calibrate (or the record lacks its folder and image count)."""
        calib = self.data.get("calibration")
        ok = isinstance(calib, dict) and isinstance(calib.get("folder"), str) and isinstance(calib.get("images"), int)
        return dict(calib) if ok else None

    @property
    def out_dir(self) -> str | None:
        """The output folder as the build was given it (None in a manifest that does not say)."""
        out = self.data.get("out_dir")
        return out if isinstance(out, str) and out else None

    def listed_files(self) -> set[str]:
        """The file names (in this folder) the manifest lists: artifacts, engines, their sidecars and companion
        files."""
        names = set()
        for entry in self.artifacts + self.engines:
            recorded = [entry.get("path"), entry.get("sidecar"), *(entry.get("files") or [])]
            names.update(Path(r).name for r in recorded if isinstance(r, str) and r)
        return names

    def _inside(self, rec: Path) -> bool:
        """Was ``rec`` written into the build's output folder (or does the manifest not say where that was)?"""
        return self.out_dir is None or rec.parent == Path(self.out_dir)

    def find(self, recorded: str | Path) -> Path | None:
        """The file a recorded path stands for (see the class docstring); None when it is not there."""
        rec = Path(recorded)
        own = self.folder / rec.name
        inside = self._inside(rec)
        if inside and own.is_file():
            return own
        if not inside and rec.is_file():
            return rec
        if self.out_dir is None and rec.is_file():  # a manifest that does not say where it was built
            return rec
        if not inside and rec.parent == Path() and own.is_file():  # a bare name written by hand: this folder's
            return own
        return None

    def locate(self, recorded: str | Path) -> Path:
        """:meth:`find`, or an error naming what is missing and where it was looked for."""
        found = self.find(recorded)
        if found is not None:
            return found
        rec = Path(recorded)
        inside = self._inside(rec)
        where = f"in '{self.folder}'" if inside else f"at '{rec}' (an input the build used where it was)"
        raise SedeployError(f"'{self.path}' lists '{rec.name}', which is not {where}: an incomplete, moved or "
                            "hand-edited build folder.",
                            fix=f"rebuild with `sedeploy build-engine … -o {self.folder}`"
                                + (f", or pass {self.alternative}" if self.alternative else ""))

    def locate_entry(self, entry: dict[str, Any]) -> Path:
        """The file an engine or artifact entry stands for; its sidecar and companion files must be there too (an
        engine without its sidecar would run unchecked)."""
        found = self.locate(entry["path"])
        for extra in (*(entry.get("files") or []), entry.get("sidecar")):
            if isinstance(extra, str) and extra:
                self.locate(extra)
        return found


def _entries_ok(entries: Any) -> bool:
    """``engines`` / ``artifacts``: absent, or a list of objects with a non-empty ``path``."""
    return entries is None or (isinstance(entries, list) and all(
        isinstance(e, dict) and isinstance(e.get("path"), str) and e["path"] for e in entries))
