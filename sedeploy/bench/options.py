"""What one `sedeploy bench` run is asked to do: :class:`BenchOptions`, checked in one place.

Every option of :func:`sedeploy.bench.run.run_bench` is a field here, with the same default; :meth:`check` refuses
a bad combination with one error naming the option before anything is opened or measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sedeploy.backends.timing import check_timing_config
from sedeploy.errors import SedeployError
from sedeploy.onnxcore import check_threads

__all__ = ["BenchOptions", "DEFAULT_BATCHES"]

DEFAULT_BATCHES = (1, 8, 32)


@dataclass
class BenchOptions:
    """The options of a benchmark run (see :func:`sedeploy.bench.run.run_bench` for each one's meaning)."""

    engines: Sequence[str | Path] = ()
    images: str | Path | None = None
    labels: str | Path | None = None
    batches: Sequence[int] | None = None  # None: DEFAULT_BATCHES, or the engines' fixed batch
    threads: int | None = None
    warmup: int = 3
    repeats: int = 20
    max_seconds: float | None = None
    reference: str | None = None
    torch_baseline: bool = True
    checkpoint: str | None = None
    compare_plain: bool = False
    probe: bool = True
    probe_seconds: float = 2.0
    out_dir: str | Path | None = None
    plots: bool = True
    progress: bool = True
    max_top1_drop: float | None = None
    min_agreement: float | None = None
    image_limit: int | None = None
    eval_batch: int = 32
    synsets: str | Path | None = None
    providers: Any = None
    optimization: str = "all"
    settle: int = 1
    label_offset: int | None = None  # None: the offset the engines record (build-engine --label-offset), else 0
    peers: bool = False
    peer_calib: str | Path | None = None

    @property
    def budget(self) -> bool:
        """Whether an accuracy budget (``max_top1_drop`` / ``min_agreement``) was given."""
        return self.max_top1_drop is not None or self.min_agreement is not None

    def check(self) -> list[int]:
        """Refuse bad options (one error naming the option); returns the batch sizes as a list."""
        repeats = self.repeats
        sizes = check_timing_config(DEFAULT_BATCHES if self.batches is None else self.batches, self.warmup, repeats,
                                    min(3, repeats) if repeats >= 1 else 1, None)
        drop, agree = self.max_top1_drop, self.min_agreement
        if drop is not None and not (isinstance(drop, (int, float)) and drop >= 0):
            raise SedeployError(f"--max-top1-drop {drop}.", expected="percentage points ≥ 0, e.g. 0.5")
        if agree is not None and not (isinstance(agree, (int, float)) and 0 <= agree <= 100):
            raise SedeployError(f"--min-agreement {agree}.", expected="a percentage from 0 to 100, e.g. 99")
        if self.image_limit is not None and self.image_limit < 1:
            raise SedeployError(f"--image-limit {self.image_limit}.",
                                expected="a number of images ≥ 1, or no limit")
        if self.labels is not None and self.images is None:
            raise SedeployError("A labels file was given without an image folder.",
                                fix="pass --images DIR (the folder the labels file names files in)")
        if self.images is None and self.budget:
            raise SedeployError("An accuracy budget (--max-top1-drop / --min-agreement) needs images to measure on.",
                                fix="pass --images DIR, or drop the budget")
        if self.eval_batch < 1:
            raise SedeployError(f"Accuracy batch {self.eval_batch}.", expected="a positive integer, e.g. 32")
        check_threads(self.threads)
        if self.out_dir is not None and self.images is not None:
            o, i = Path(self.out_dir).resolve(), Path(self.images).resolve()
            if o == i or i in o.parents:  # the next run would score the plots as images
                raise SedeployError(f"The results folder (--out) '{self.out_dir}' is inside the image folder "
                                    f"(--images) '{self.images}'.", expected="a results folder outside the images",
                                    fix="pass another --out folder, e.g. --out bench-results")
        return sizes
