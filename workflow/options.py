"""Checks of option values before any work: one UsageError (or OutputExistsError) naming the
command-line option and what it accepts, so a bad value never falls back to a default, and never
fails after minutes of embedding. Python callers of ``workflow`` get the same checks."""
from __future__ import annotations

import difflib
from pathlib import Path

from hexpr.embedder.errors import MissingInputError, OutputExistsError, UsageError
from hexpr.embedder.hub_ids import parse_hub_id
from hexpr.heads.params import Constraint, Int, Real
from hexpr.heads.registry import AUTO, HEAD_CLASSES

WHOLE_POSITIVE = Int(1)
WHOLE_NON_NEGATIVE = Int(0)
POSITIVE = Real(0, low_open=True)
SHARE = Real(0, 1)
MODELS_DIR = Path("cache") / "models"   # where fit-head saves models by default (workflow.fit.DEFAULT_MODELS_DIR)
MODEL_FILES = ("model.joblib", "finetuned.pt")


def saved_models(folder: Path = MODELS_DIR) -> list[str]:
    """The model folders under ``folder`` (those holding a model file), as paths to pass to predict."""
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if p.is_dir() and any((p / f).is_file() for f in MODEL_FILES))


def check_model_path(path) -> Path:
    """A model folder (or model file) that exists; otherwise a MissingInputError that says how to make
    one and lists the models saved under cache/models/. Cheap: runs before any heavy import.

    Example::

        >>> hexpr.check_model_path("cache/models/train__ridge")
        # -> PosixPath('cache/models/train__ridge'); a missing one names `hexpr fit-head` and lists saved models
    """
    path = Path(path)
    if path.exists() or parse_hub_id(str(path)):   # a Hugging Face id (org/name[@revision]) is resolved later
        return path
    found = saved_models()
    listing = (f"models in {MODELS_DIR}/: {', '.join(found)}" if found
               else f"there is no model in {MODELS_DIR}/ yet")
    raise MissingInputError(f"no fitted model at {path}; fit one with `hexpr fit-head DATA` (saved as "
                            f"{MODELS_DIR}/<data>__<head>, or where --out says), or give a Hugging Face model id "
                            f"(org/name[@revision]); {listing}")


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


def head_names() -> list[str]:
    """The names ``--head`` accepts: every registered head, and "auto".

    Example::

        >>> "ridge" in hexpr.head_names()
        # -> True
    """
    return sorted(HEAD_CLASSES) + [AUTO]


def check_head(name: str) -> str:
    """``name`` if it names a head (see ``head_names``), else a UsageError listing them (and the
    closest names). Light: the command line runs it before any heavy import.

    Example::

        >>> hexpr.check_head("ridge")
        # -> 'ridge'; an unknown name raises a UsageError listing the heads
    """
    if name not in head_names():
        close = difflib.get_close_matches(name, head_names(), n=2, cutoff=0.6)
        maybe = f"did you mean {' or '.join(close)}? " if close else ""
        raise UsageError(f"unknown head {name!r}; {maybe}choose one of: {', '.join(head_names())}")
    return name
