"""Expression tables as CSV: ``ID`` plus one column per gene, written atomically."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from embedder.datasets import ID_COLUMN
from embedder.files import CSV_FLOAT_FORMAT, atomic_path


def write_table(path: str | Path, frame: pd.DataFrame, index_label: str | None = ID_COLUMN) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index_label is not None, index_label=index_label, float_format=CSV_FLOAT_FORMAT)
    return Path(path)
