"""Checks of option values before any work: one UsageError (or OutputExistsError) naming the
command-line option and what it accepts, so a bad value never falls back to a default, and never
fails after minutes of embedding. Python callers of ``workflow`` get the same checks."""
from __future__ import annotations

from pathlib import Path

from hexpr.embedder.errors import OutputExistsError, UsageError
from hexpr.heads.params import Constraint, Int, Real

WHOLE_POSITIVE = Int(1)
WHOLE_NON_NEGATIVE = Int(0)
POSITIVE = Real(0, low_open=True)
SHARE = Real(0, 1)


def check_option(option: str, value, constraint: Constraint, *, optional: bool = False) -> None:
    """``value`` of ``option`` (e.g. "--tile-um") satisfies ``constraint``; None passes when ``optional``."""
    if optional and value is None:
        return
    if not constraint(value):
        raise UsageError(f"{option} must be {constraint.describe()}, got {value!r}")


def check_choice(option: str, value, choices) -> None:
    """``value`` is one of ``choices`` (a UsageError listing them otherwise)."""
    if value not in tuple(choices):
        raise UsageError(f"{option} {value!r} is not one of: {', '.join(map(str, choices))}")


def check_output_file(option: str, path) -> None:
    """A file output (replaced when it exists) must not name an existing folder or sit under a file."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{option} {path} is an existing folder; give a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputExistsError(f"{option} {path}: {parent} is a file, not a folder; choose another path")
            break


def check_output_folder(option: str, path) -> None:
    """A folder output must not name an existing file (or sit under one)."""
    if path is None:
        return
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise OutputExistsError(f"{option} {path}: {candidate} is an existing file, not a folder; "
                                        "choose another path")
            break
