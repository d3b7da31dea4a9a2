"""Hugging Face repository ids (``org/name[@revision]``): recognised without importing anything heavy,
so the command line can tell a model id from a mistyped folder before loading torch."""
from __future__ import annotations

import re

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def parse_hub_id(ref: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of ``org/name[@revision]``; None when ``ref`` is not such an id."""
    match = HUB_ID.match(str(ref))
    return (match["repo"], match["revision"]) if match else None
