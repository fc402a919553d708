"""What every command shares: logging on stderr, --json output, and errors/signals turned into exit codes."""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import signal
import sys

import click

from sedeploy.errors import SedeployError
from sedeploy.fsutil import disk_full_error, is_disk_full


def setup_logging(verbose: bool) -> None:
    """sedeploy's own messages on stderr (warnings always, explanations with -v); other libraries stay quiet."""
    logging.basicConfig(format="%(levelname)s: %(message)s", stream=sys.stderr, level=logging.WARNING)
    logging.getLogger("sedeploy").setLevel(logging.DEBUG if verbose else logging.INFO)


def progress(as_json: bool) -> bool:
    """Progress bars only for a person watching: a terminal on stderr, and not --json."""
    return not as_json and sys.stderr.isatty()


#: where --json output goes while a command runs (stdout itself is pointed at stderr then): see json_only_stdout
_JSON_STREAM: list = []


@contextlib.contextmanager
def json_only_stdout():
    """With --json, stdout carries sedeploy's JSON and nothing else: while the command runs, whatever a library
    prints to stdout (NNCF's progress bars and log lines, a C library's printf) goes to stderr, at the file
    descriptor level where stdout is a real file, else at sys.stdout's; :func:`emit` and :func:`emit_line` write
    to the real stdout."""
    real = sys.stdout
    try:
        fd = real.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test runner's capture): Python level only
        fd = None
    saved = None
    if fd is not None:
        real.flush()
        saved = os.dup(fd)
        os.dup2(sys.stderr.fileno(), fd)
        stream = os.fdopen(saved, "w", encoding="utf-8", closefd=False)
    else:
        stream = real
    _JSON_STREAM.append(stream)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = real
        _JSON_STREAM.pop()
        stream.flush()
        if saved is not None:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)


def emit_line(text: str) -> None:
    """One line of machine-readable output on the real stdout (flushed: a reader may be waiting for it)."""
    stream = _JSON_STREAM[-1] if _JSON_STREAM else sys.stdout
    click.echo(text, file=stream)
    stream.flush()


def emit(result: dict, as_json: bool, human: str) -> None:
    """One JSON object (--json) or the human summary on stdout."""
    if as_json:
        emit_line(json.dumps(result, indent=2, default=str))
    else:
        click.echo(human)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that every cleanup (``finally``, ``atomic_path``) runs as
    for Ctrl-C. A KeyboardInterrupt subclass: code that cleans up on Ctrl-C cleans up on these too, and can name
    the signal by ``signal_name``; the CLI exits 128 + ``signum`` (143 SIGTERM, 129 SIGHUP)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__()
        self.signum = int(signum)
        self.signal_name = signal.Signals(signum).name


#: the signals that stop a command like Ctrl-C: SIGTERM (`timeout`, CI cancels, `docker stop`) and SIGHUP (the
#: terminal or SSH session closed). A SIGHUP ignored when the command started (`nohup`) stays ignored.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
#: the signals that arrived (code that catches KeyboardInterrupt can tell)
TERMINATED: list[int] = []


def on_stop_signal(signum, frame):
    TERMINATED.append(signum)
    raise Terminated(signum)


def stop_word_and_code() -> tuple[str, int]:
    """How the run was stopped: ('interrupted', 130) after Ctrl-C, ('terminated (SIGTERM)', 143) after SIGTERM …"""
    if TERMINATED:
        return f"terminated ({signal.Signals(TERMINATED[0]).name})", 128 + TERMINATED[0]
    return "interrupted", 130


def _exit_for_os_error(err: OSError) -> None:
    if is_disk_full(err):
        click.echo(f"error: {disk_full_error(err.filename or '.', err)}", err=True)
        sys.exit(2)
    if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        where = f"'{err.filename}'" if err.filename else "a file"
        click.echo(f"error: cannot access {where} ({err.strerror or err}).\n  Fix: check the "
                   "permissions, or choose another path", err=True)
        sys.exit(2)


def handle_errors(fn):
    """Turn library errors into one clear message and an exit code; never a traceback for user mistakes.

    SIGTERM and SIGHUP are handled like Ctrl-C (cleanup runs, one line is printed) and exit 128 + the signal's
    number: 143 (SIGTERM), 129 (SIGHUP)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = {}
        try:
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's ignored SIGHUP stays ignored
                    previous[sig] = signal.signal(sig, on_stop_signal)
        except ValueError:  # not the main thread (the CLI called from a library's thread): leave signals alone
            pass
        try:
            with json_only_stdout() if kwargs.get("as_json") else contextlib.nullcontext():
                return fn(*args, **kwargs)
        except SedeployError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except Terminated as stop:
            click.echo(f"terminated ({stop.signal_name}): stopped; temporary files were removed and no output was "
                       "left half-written", err=True)
            sys.exit(128 + stop.signum)
        except KeyboardInterrupt:
            click.echo("interrupted: stopped; temporary files were removed and no output was left half-written",
                       err=True)
            sys.exit(130)
        except OSError as err:
            _exit_for_os_error(err)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return wrapper
