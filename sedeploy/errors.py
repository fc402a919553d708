"""One exception type for every mistake a user can make.

Each message says what was given, what is allowed, and how to fix it (the Polygraphy style). The CLI prints
``str(err)`` and exits with ``err.exit_code``; library callers can catch :class:`SedeployError`.
"""
from __future__ import annotations


class SedeployError(Exception):
    """A user-facing error: bad input, missing optional dependency, failed verification."""

    exit_code = 2

    def __init__(self, what: str, *, expected: str | None = None, fix: str | None = None):
        self.what, self.expected, self.fix = what, expected, fix
        parts = [what]
        if expected:
            parts.append(f"Expected: {expected}")
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__("\n  ".join(parts))


class VerificationError(SedeployError):
    """A produced artifact failed its numeric check against the reference (the artifact is removed)."""

    exit_code = 3


class MissingDependencyError(SedeployError):
    """An optional dependency (an extra) is not installed."""

    exit_code = 4

    def __init__(self, module: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the Python package '{module}', which is not importable here.",
            fix=f"pip install 'sedeploy[{extra}]'",
        )


class IncompatibleDependencyError(SedeployError):
    """An optional dependency is installed in a version (or next to one) that cannot work."""

    exit_code = 4
