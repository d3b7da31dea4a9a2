"""The one error root. Every mistake a user can make raises a subclass of ``HexprError``; the CLI
catches ``HexprError`` alone and prints its message as one ``Error:`` line (exit code 2).

``UsageError``: an option or parameter value that cannot work. ``DataError``: input files (patches,
tables, slides, caches) that are missing, unreadable or inconsistent. ``ModelError``: a model or its
weights cannot be built, loaded or applied. ``OutputExistsError`` / ``MissingInputError`` keep the
built-in ``FileExistsError`` / ``FileNotFoundError`` meaning for Python callers.
"""
from __future__ import annotations


class HexprError(Exception):
    """A problem the user can fix; the message says which file, row or option, and what to do."""


class UsageError(HexprError, ValueError):
    """An option or hyper-parameter value that is not accepted."""


class DataError(HexprError, ValueError):
    """Input data that is missing, unreadable or inconsistent."""


class ModelError(HexprError, RuntimeError):
    """A model, head or backbone that cannot be built, loaded or applied."""


class OutputExistsError(HexprError, FileExistsError):
    """An output path is taken by something hexpr will not replace."""


class MissingInputError(DataError, FileNotFoundError):
    """An input path (data, model, slide) does not exist."""


class RandomInitWarning(UserWarning):
    """Features come from randomly initialised weights (testing only). Commands that end with a note
    saying so (fit-head, demo, finetune) do not repeat it as a warning."""


def brief(exc: BaseException, limit: int = 120) -> str:
    """``Type: first line of the message``, cut at ``limit`` characters: a low-level cause in one line."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."
