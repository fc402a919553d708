"""Publishing a finished build: the staging folder's set moved into the output folder, manifest last, what the
previous build wrote and this one did not removed; errors about staged files named as sedeploy's intermediates."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from sedeploy.artifacts import MANIFEST
from sedeploy.build.result import BuildResult
from sedeploy.errors import SedeployError
from sedeploy.fsutil import publish_staged
from sedeploy.layout import Manifest

log = logging.getLogger("sedeploy")


def listed_files(out: Path) -> set[str]:
    """The file names (in the output folder) the previous build's manifest lists; none when there is no readable
    one (then nothing is removed)."""
    try:
        return Manifest.read(out).listed_files()
    except SedeployError:
        return set()


def publish(stage: Path, out: Path, res: BuildResult) -> None:
    """Move the finished set from ``stage`` into ``out`` (manifest last) and remove what the previous manifest
    listed that this build did not write. Runs with SIGINT/SIGTERM/SIGHUP held back. The result and the sidecars
    already record the published paths (:meth:`BuildResult.published`), so nothing is rewritten here."""
    new = sorted(p.name for p in stage.iterdir() if not p.name.startswith("."))
    keep = set(new) | {MANIFEST}
    source = Path(res.source)
    for p in (source.absolute(), source.resolve()):  # a MODEL inside the output folder is never removed, nor the
        if p.parent.resolve() == out.resolve():     # file a MODEL symlink points to there
            keep.add(p.name)
    stale = sorted(listed_files(out) - keep)
    if stale:
        res.notes.append(f"removed what the previous build wrote and this one did not: {', '.join(stale)}")
    Manifest.write(stage, res.as_dict())
    publish_staged(stage, out, new, last=MANIFEST, stale=stale)  # the old manifest goes first, the new one last
    if stale:
        log.info("Removed %d file(s) of the previous build that this build did not write: %s", len(stale),
                 ", ".join(stale))


def name_intermediates(err: SedeployError, stage: Path, model) -> None:
    """An error about a file in the staging folder (which is removed when the build fails) names it as what it
    is: sedeploy's intermediate made from the user's MODEL, not a file the user gave."""
    source = f" from '{model}'" if model is not None else ""
    for root in {str(stage.resolve()), str(stage)}:
        pattern = re.compile(re.escape(root) + r"/([^'\s]+)")
        err.what = pattern.sub(lambda m: f"{m.group(1)} (sedeploy's intermediate{source})", err.what)
        err.args = tuple(pattern.sub(lambda m: f"{m.group(1)} (sedeploy's intermediate{source})", a)
                         if isinstance(a, str) else a for a in err.args)
