"""The measuring steps of a benchmark run that touch images: the image head, the streamed accuracy pass, the
timing progress bar.

Images are fed to each runner as it declares (``input_layout``, ``input_dtype``); an engine with a static batch gets
a short chunk padded with its last image (the padded rows dropped). The accuracy pass streams the folder: image
chunks in the outer loop, engines inside, so at any moment every engine has seen the same images and an
interrupted pass still yields figures on a common subset. tqdm is imported only when a bar is shown.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import numpy as np

from sedeploy import preprocess
from sedeploy.bench.accuracy import Drift
from sedeploy.bench.engines import EngineSpec
from sedeploy.errors import SedeployError
from sedeploy.fsutil import signals_held
from sedeploy.onnxcore import load_onnx, output_kind, pad_to_batch

__all__ = ["CHECK_IMAGES", "pad_run", "prepare_batch", "load_head", "accuracy_pass", "outputs_probabilities",
           "timing_bar"]

#: images used to check that the PyTorch baseline is the engines' network
CHECK_IMAGES = 4


def pad_run(runner, x: np.ndarray, static: int | None) -> np.ndarray:
    """Run a chunk; an engine with a static batch gets the chunk padded with its last image (rows dropped)."""
    if static is None or len(x) == static:
        return runner.infer(x)
    return runner.infer(pad_to_batch(x, static))[: len(x)]


def prepare_batch(runner, x: np.ndarray) -> np.ndarray:
    """An N×3×H×W batch as ``runner`` takes it: its layout (``input_layout``, set from the engine's description)
    and dtype."""
    x = preprocess.layout_batch(x, getattr(runner, "input_layout", None))
    want = getattr(runner, "input_dtype", None)
    return x if want is None or np.dtype(want) == x.dtype else x.astype(want)


def load_head(paths: list[Path], pp, count: int, what: str) -> np.ndarray:
    """The first ``count`` images of ``paths`` that decode (fewer when the folder has fewer): what the timing
    pool and the PyTorch check use. Raises the loader's error when no image of the folder decodes."""
    got: list[np.ndarray] = []
    have = 0
    for i in range(0, len(paths), count):
        try:
            x, _ = preprocess.load_batch(paths[i:i + count], pp, what=what)
        except SedeployError:  # none of this block decodes (each file was named in a warning): try the next
            continue
        got.append(x[:count - have])
        have += len(got[-1])
        if have >= count:
            break
    if not got:
        raise SedeployError(f"None of the {len(paths)} image file(s) in the {what} could be decoded.",
                            fix="check the files are valid JPEG/PNG images, or pass another folder")
    return np.concatenate(got)


def accuracy_pass(specs, runners, paths: list[Path], pp, chunk: int, progress: bool, *, probabilities: bool,
                   what: str) -> tuple[dict[str, Drift], list[Path], set[Path], bool]:
    """Score every engine against the reference (``specs[0]``) on ``paths``, streamed: images are decoded
    ``chunk`` files at a time and scored in batches of ``chunk`` decoded images (the same batches as if the
    whole folder had been decoded first), so memory holds two chunks, not the folder. Returns (drift per engine,
    the paths scored, the paths that did not decode, complete). An interruption keeps the whole batches scored by
    every engine."""
    from tqdm import tqdm

    ref = specs[0]
    drifts = {s.name: Drift() for s in specs}
    scored: list[Path] = []
    buf_x: list[np.ndarray] = []
    buf_p: list[Path] = []
    bad: set[Path] = set()
    complete = True

    def score(xb: np.ndarray) -> None:
        outs = {}
        for s in specs:
            size = s.static_batch or min(chunk, s.max_batch or chunk)
            got = [pad_run(runners[s.name], prepare_batch(runners[s.name], xb[j:j + size]), s.static_batch)
                   for j in range(0, len(xb), size)]
            out = np.asarray(np.concatenate(got), np.float32)
            if probabilities:  # softmax(log p) = p: agreement and KL keep their meaning (said in the notes)
                out = np.log(np.maximum(out.astype(np.float64), 1e-30))
            outs[s.name] = out
        with signals_held():  # every engine's figures take this batch, or none does
            for name, out in outs.items():
                drifts[name].add(outs[ref.name], out)

    with tqdm(total=len(paths), desc="Accuracy", unit="img", disable=not progress, leave=False) as bar:
        try:
            for i in range(0, len(paths), chunk):
                block = paths[i:i + chunk]
                try:
                    x, loaded = preprocess.load_batch(block, pp, what=what)
                except SedeployError:  # none of this block decodes (each file was named in a warning)
                    x, loaded = None, []
                bad.update(set(block) - set(loaded))
                if x is not None:
                    buf_x += list(x)
                    buf_p += loaded
                while len(buf_x) >= chunk or (i + chunk >= len(paths) and buf_x):
                    take = min(chunk, len(buf_x))
                    score(np.stack(buf_x[:take]))
                    scored += buf_p[:take]
                    del buf_x[:take], buf_p[:take]
                bar.update(len(block))
        except KeyboardInterrupt:
            complete = False
    return drifts, scored, bad, complete


def outputs_probabilities(spec: EngineSpec) -> bool:
    """Whether the reference engine (an ONNX file) ends in Softmax; other engine files cannot be read as graphs."""
    if spec.path.suffix != ".onnx":
        return False
    return output_kind(load_onnx(spec.path, check=False)) == "probabilities"


@contextlib.contextmanager
def timing_bar(sizes: Sequence[int], repeats: int, n_engines: int, progress: bool):
    """A tqdm bar over the timed rounds (all batch sizes) on stderr, or nothing when ``progress`` is off."""
    if not progress:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=len(sizes) * repeats, desc="Timing", unit="round", leave=False,
              postfix=f"{n_engines} engines interleaved") as bar:
        done: dict[int, int] = {}

        def on_round(b: int, rounds: int) -> None:
            bar.set_description(f"Timing batch {b}")
            bar.update(rounds - done.get(b, 0))
            done[b] = rounds

        yield on_round
