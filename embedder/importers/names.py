"""Names and ids: AnnData-style unique names, file-system-safe names, joining two tables by id."""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import ImporterError, warn

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(s: str) -> str:
    """``s`` as a file or folder name: runs of other characters than letters, digits, ``._-`` -> ``_``."""
    s = _UNSAFE.sub("_", str(s)).strip("._")
    return s or "x"


def make_unique(names: Sequence[str]) -> tuple[list[str], int]:
    """AnnData-style unique names: second 'A' -> 'A-1', third -> 'A-2'. Returns (names, n_renamed)."""
    names = [str(n) for n in names]
    seen: dict[str, int] = {}
    taken = set(names)
    out = []
    n_renamed = 0
    for n in names:
        if n not in seen:
            seen[n] = 0
            out.append(n)
            continue
        k = seen[n]
        while True:
            k += 1
            cand = f"{n}-{k}"
            if cand not in taken:
                break
        seen[n] = k
        taken.add(cand)
        out.append(cand)
        n_renamed += 1
    return out, n_renamed


def match_ids(
    count_ids: Sequence[str],
    pos_ids: Sequence[str],
    count_file: Any,
    pos_file: Any,
    messages: list[str] | None,
    what: str = "spot",
) -> list[str]:
    """Ids present in both tables (count-table order); warns with counts about the rest."""
    pos_set = set(pos_ids)
    count_set = set(count_ids)
    common = [i for i in count_ids if i in pos_set]
    only_counts = [i for i in count_ids if i not in pos_set]
    only_pos = [i for i in pos_ids if i not in count_set]
    if only_counts:
        warn(messages, f"{len(only_counts)} {what}(s) of {count_file} have no position in "
                       f"{pos_file} and are skipped (e.g. {only_counts[:3]})")
    if only_pos:
        warn(messages, f"{len(only_pos)} {what}(s) listed in {pos_file} have no counts in "
                       f"{count_file} and are skipped (e.g. {only_pos[:3]})")
    if not common:
        raise ImporterError(
            f"no {what} id is shared by {count_file} ({len(count_set)} ids, e.g. "
            f"{list(count_ids)[:3]}) and {pos_file} ({len(pos_set)} ids, e.g. {list(pos_ids)[:3]});"
            f" check that both files belong to the same sample")
    return common


def positions_in(ids: Sequence[str], table_ids: Any) -> np.ndarray:
    """Row of each of ``ids`` in ``table_ids`` (a pyarrow string column or array), -1 when absent.
    One hash join in Arrow: fast for the millions of barcodes of a Visium HD run."""
    found = pc.index_in(pa.array(list(ids), pa.string()), value_set=pc.cast(table_ids, pa.string()))
    return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
