"""Expression tables as CSV: ``ID`` plus one column per gene, written atomically."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from hexpr.embedder.datasets import ID_COLUMN
from hexpr.embedder.files import CSV_FLOAT_FORMAT, write_csv


def write_table(path: str | Path, frame: pd.DataFrame, index_label: str | None = ID_COLUMN) -> Path:
    return write_csv(path, frame, index=index_label is not None, index_label=index_label, float_format=CSV_FLOAT_FORMAT)
