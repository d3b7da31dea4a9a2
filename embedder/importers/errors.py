"""The importers' error and warning classes and the one helper that warns and records."""

from __future__ import annotations

from hexpr.embedder.slides import SlideError, SlideWarning, record_warning


class ImporterError(SlideError):
    """Bad or inconsistent importer input; the message names the file and the fix."""


class ImporterWarning(SlideWarning):
    """Recoverable inconsistency in importer input (counts are in the message)."""


def warn(messages: list[str] | None, msg: str) -> None:
    """Emit an :class:`ImporterWarning` and remember it in ``messages``."""
    record_warning(messages, msg, ImporterWarning, stacklevel=4)
