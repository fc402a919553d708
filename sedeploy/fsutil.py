"""Write files so that an interrupted run never leaves a half-written artifact behind.

- :func:`atomic_path` writes beside the final name (``.<name>.<random>.partial``) and renames into place only when
  the block succeeds; a full disk becomes one clear error (:func:`disk_full_error`).
- :func:`clean_stale_partials` removes the ``.partial`` files a killed run (SIGKILL, power loss) left behind.
- :func:`folder_lock` is an exclusive ``flock`` on a folder, so two runs never write into it at once.
- :func:`staging_folder` + :func:`publish_staged` write a whole result set aside and move it in as one, with
  Ctrl-C/SIGTERM/SIGHUP held back (:func:`signals_held`) for those few renames (`build-engine`, `bench --out`).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from sedeploy.errors import SedeployError

log = logging.getLogger("sedeploy")

#: the temporary names :func:`atomic_path` creates: ``.<final name>.<8 random chars>.partial``
PARTIAL_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.partial$")
#: errno values that mean "no room left": ENOSPC (disk full) and EDQUOT (quota exceeded)
NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
#: a build writes into ``<out>/.sedeploy-staging-<random>/`` and publishes the finished set (sedeploy.build)
STAGE_PREFIX = ".sedeploy-staging-"


def cache_dir(kind: str) -> Path:
    """``$SEDEPLOY_CACHE/<kind>`` when SEDEPLOY_CACHE is set, else ``~/.cache/sedeploy/<kind>`` (the one place
    sedeploy's caches live: ``checkpoints``, ``calib``)."""
    root = os.environ.get("SEDEPLOY_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "sedeploy") / kind


def require_utf8_path(path: str | os.PathLike, what: str) -> Path:
    """Refuse a path whose name is not valid UTF-8 (bytes the file system allows, which ONNX and ONNX Runtime
    cannot take as a path), naming it, before any work."""
    p = Path(path)
    try:
        os.fsdecode(os.fsencode(p)).encode("utf-8")
    except UnicodeEncodeError:
        raise SedeployError(f"The {what} {ascii(str(p))} has a name that is not valid UTF-8.",
                            expected="a path in UTF-8 (ONNX and ONNX Runtime take paths as UTF-8 text)",
                            fix="rename it, or copy it to a path with a UTF-8 name") from None
    return p


def ensure_writable_dir(path: str | os.PathLike, what: str = "output directory", *, fix: str | None = None) -> Path:
    """Create ``path`` if needed and prove we can write there, or raise a clear error naming ``what`` it is.

    ``fix`` replaces the default advice (which suggests ``-o``, right only for the output directory)."""
    p = require_utf8_path(path, what)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".sedeploy-write-test-"):
            pass
    except OSError as err:
        if err.errno in NO_SPACE:
            raise disk_full_error(p, err) from err
        blocker = next((q for q in (p, *p.parents) if q.exists() and not q.is_dir()), None)
        if blocker is not None:
            raise SedeployError(f"The {what} '{p}' is not writable: '{blocker}' is a file, not a folder.",
                                fix=f"remove or rename that file, or {fix or f'choose another {what}'}") from err
        raise SedeployError(f"The {what} '{p}' is not writable ({err.strerror or err}).",
                            fix=fix or f"choose another {what} (e.g. -o ./out) or fix its permissions") from err
    return p


def missing_dirs(path: str | os.PathLike) -> list[Path]:
    """``path`` and its parents that do not exist yet, deepest first: what ``mkdir(parents=True)`` would make."""
    p = Path(path)
    return [q for q in (p, *p.parents) if not q.exists()]


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove the folders of :func:`missing_dirs` again, deepest first, each only while empty (so a folder that
    something else wrote into meanwhile stays, and so do its parents)."""
    for q in dirs:
        if not q.exists():
            continue
        try:
            q.rmdir()
        except OSError:
            return


def is_disk_full(err: BaseException | None) -> bool:
    """True when ``err`` or an exception it was raised from is an out-of-space OSError."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            return True
        if isinstance(err, SedeployError) and "No space left" in err.what:
            return True
        err = err.__cause__ or err.__context__
    return False


def user_path(path: str | os.PathLike) -> Path:
    """The path a user knows for a temporary one: ``.x.onnx.<random>.partial`` → ``x.onnx``, and a file in a
    build's staging folder → the same name in the output folder."""
    p = Path(path)
    while PARTIAL_RE.match(p.name):
        p = p.with_name(p.name[1:].rsplit(".", 2)[0])
    if p.parent.name.startswith(STAGE_PREFIX):
        p = p.parent.parent / p.name
    return p


def disk_full_error(where: str | os.PathLike, err: BaseException | None = None) -> SedeployError:
    """The one message for a full disk (or exhausted quota) while writing into ``where``."""
    p = user_path(where)
    folder = p if p.is_dir() else p.parent
    free = ""
    with contextlib.suppress(OSError):
        st = os.statvfs(folder)
        free = f" ({st.f_bavail * st.f_frsize / 2**20:.0f} MiB free there now)"
    return SedeployError(f"The disk is full: writing '{p}' failed with no space left on the device{free}. "
                         "Nothing partial was kept.",
                         fix="free some space on that disk, or write to another disk (-o / --out DIR)")


def short_of_space(folder: str | os.PathLike, need_bytes: int) -> bool:
    """Does ``folder``'s disk have less than ``need_bytes`` free? For errors raised by libraries that write files
    themselves and lose the errno (OpenVINO's "iostream error", ONNX Runtime's protobuf errors): asked after such
    an error, it tells a full disk from a real failure."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < need_bytes


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``final`` is untouched; an
    out-of-space error becomes :func:`disk_full_error`.
    """
    final = require_utf8_path(final, "file")
    ensure_writable_dir(final.parent, "folder", fix=f"write '{final.name}' somewhere else, or fix the folder's "
                                                    "permissions")
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; published files follow the umask
        os.replace(tmp_path, final)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if is_disk_full(err) and not (isinstance(err, SedeployError) and err.what.startswith("The disk is full")):
            raise disk_full_error(final, err) from err
        raise


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def atomic_write_text(final: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(final, text.encode("utf-8"))


#: in a folder no lock protects, a partial file is taken as abandoned only once it is this old (seconds)
UNLOCKED_GRACE_S = 900.0


def clean_stale_partials(folder: str | os.PathLike, *, older_than: float | None = None,
                         final_name: str | None = None, locked: bool = True) -> list[Path]:
    """Remove sedeploy's own ``.<name>.<random>.partial`` files in ``folder`` (not below it) last modified before
    ``older_than`` (a ``time.time()`` value: this run's start; default: now). Those are left by runs that were
    killed (SIGKILL, power loss) before :func:`atomic_path` could clean up.

    ``locked``: this run holds :func:`folder_lock` on ``folder``, so no other run writes there. Without the lock a
    partial file must also be :data:`UNLOCKED_GRACE_S` old (another live run may be writing it). ``final_name``:
    only the partial files of that final name. Returns what was removed."""
    cutoff = time.time() if older_than is None else older_than
    if not locked:
        cutoff = min(cutoff, time.time() - UNLOCKED_GRACE_S)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not PARTIAL_RE.match(e.name) or (final_name is not None and not e.name.startswith(f".{final_name}.")):
            continue
        try:
            if e.is_file(follow_symlinks=False) and e.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(e.path)
                removed.append(Path(e.path))
        except OSError:
            continue  # gone meanwhile, or not ours to remove
    if removed:
        log.info("Removed %d stale partial file(s) left by an interrupted run in %s: %s", len(removed), folder,
                 ", ".join(p.name for p in removed[:5]) + (" …" if len(removed) > 5 else ""))
    return removed


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, what: str = "output folder", command: str = "sedeploy",
                option: str = "-o DIR") -> Iterator[Path]:
    """Hold an exclusive, non-blocking ``flock`` on the folder itself for the block.

    A second run that wants the same folder fails at once with a clear error. The lock is on the directory's own
    file descriptor, so it leaves no file behind, and the kernel releases it when the holder exits, however it
    exits (even SIGKILL): there is never a stale lock to clean up.
    """
    import fcntl

    p = Path(folder)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as err:
        raise SedeployError(f"Cannot open the {what} '{p}' ({err.strerror or err}).",
                            fix=f"choose another {what} or fix its permissions") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SedeployError(f"Another {command} run is writing into the {what} '{p}'.",
                                fix=f"wait for it to finish, or write to another {what} ({option})") from None
        yield p
    finally:
        os.close(fd)  # releases the lock


#: the signals that end a run (Ctrl-C, ``kill``/``timeout``/CI cancel, a closed terminal or SSH session) and that
#: :func:`signals_held` holds back; the CLI exits 128 + the signal's number for each (130, 143, 129)
HELD_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


@contextlib.contextmanager
def signals_held(held: tuple[int, ...] = HELD_SIGNALS) -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back until the block ends, so a publish is never cut in half.

    Masking the main thread is not enough: the kernel then delivers the signal to another thread (ONNX Runtime's
    and OpenVINO's workers do not block it) and Python still runs the handler in the main thread, mid-block. So
    the Python handlers are swapped for ones that only note the signal; when the block has finished, the previous
    handlers are back and each noted signal is raised again (``signal.raise_signal``; in the order of ``held``:
    SIGTERM first), at a point where the folder holds one complete set. A signal that was ignored (``SIG_IGN``,
    e.g. SIGHUP under ``nohup``) stays ignored. If the block fails, its own error goes on unmasked (the noted
    signal is dropped: the run ends anyway). Where a handler was installed outside Python (an embedding host),
    Python cannot restore it, so the thread's signal mask is used instead, as the best that can be done there."""
    if threading.current_thread() is not threading.main_thread() or any(
            signal.getsignal(sig) is None for sig in held):
        with _signals_masked(held):
            yield
        return
    noted: list[int] = []
    previous = {}
    try:
        for sig in held:
            previous[sig] = signal.signal(sig, lambda signum, frame: noted.append(signum))
        yield
    except BaseException:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    for sig in held:  # in order: the first one raised ends the run
        if sig in noted and previous[sig] is not signal.SIG_IGN:
            signal.raise_signal(sig)


@contextlib.contextmanager
def _signals_masked(held):
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):  # no pthread_sigmask on this platform
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def staging_folder(out: str | os.PathLike, *, locked: bool = True) -> Iterator[Path]:
    """A fresh ``<out>/.sedeploy-staging-<random>/`` for a run to write its whole result set into, removed when
    the block ends (after :func:`publish_staged` moved the set out, or on any failure or interruption).

    ``locked``: the caller holds :func:`folder_lock` on ``out``, so staging folders left by killed runs (SIGKILL,
    power loss) are removed first; without the lock they may belong to a live run and are left alone."""
    out = Path(out)
    if locked:
        for old in out.glob(f"{STAGE_PREFIX}*"):
            shutil.rmtree(old, ignore_errors=True)
    try:
        stage = Path(tempfile.mkdtemp(dir=out, prefix=STAGE_PREFIX))
    except OSError as err:
        if err.errno in NO_SPACE:
            raise disk_full_error(out, err) from err
        raise
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish_staged(stage: str | os.PathLike, out: str | os.PathLike, names: list[str], *, last: str,
                   stale: list[str] | tuple[str, ...] = ()) -> None:
    """Publish a finished set from ``stage`` into ``out`` as one: with SIGINT/SIGTERM/SIGHUP held back
    (:func:`signals_held`), the old ``last`` file (the set's index: a manifest, results.json) is removed first,
    so it never describes a half-replaced set; then ``names`` are moved in, the ``stale`` files of the previous set
    that this one did not write are removed, and ``last`` is moved in at the end. Renames within one file system:
    no copy, no disk space needed."""
    stage, out = Path(stage), Path(out)
    with signals_held():
        (out / last).unlink(missing_ok=True)
        for name in names:
            if name != last:
                os.replace(stage / name, out / name)
        for name in stale:
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
        os.replace(stage / last, out / last)
