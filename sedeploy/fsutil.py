"""Write files so that an interrupted run never leaves a half-written artifact behind."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from sedeploy.errors import SedeployError


def cache_dir(kind: str) -> Path:
    """``$SEDEPLOY_CACHE/<kind>`` when SEDEPLOY_CACHE is set, else ``~/.cache/sedeploy/<kind>`` (the one place
    sedeploy's caches live: ``checkpoints``, ``calib``)."""
    root = os.environ.get("SEDEPLOY_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "sedeploy") / kind


def ensure_writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create ``path`` if needed and prove we can write there, or raise a clear error."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".sedeploy-write-test-"):
            pass
    except OSError as err:
        raise SedeployError(f"The {what} '{p}' is not writable ({err.strerror or err}).",
                            fix=f"choose another {what} (e.g. -o ./out) or fix its permissions") from err
    return p


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``final`` is untouched.
    """
    final = Path(final)
    ensure_writable_dir(final.parent)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; published files follow the umask
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def atomic_write_text(final: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(final, text.encode("utf-8"))
