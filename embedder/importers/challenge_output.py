"""Challenge-layout output: ``<sample>/<barcode>.png`` per patch and one wide ``dataset.csv``
(ID = ``<sample>/<barcode>``, path, group, x, y, then one column per gene)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from .names import safe_name

CSV_LEADING_COLUMNS = ["ID", "path", "group", "x", "y"]


class PNGSink:
    """One PNG per patch, named after its barcode (file-safe, de-duplicated)."""

    def __init__(self, folder: Path, barcodes: list[str]):
        self.folder = folder
        names: dict[str, int] = {}
        self.files = []
        for b in barcodes:
            n = safe_name(b)
            if n in names:
                names[n] += 1
                n = f"{n}_{names[n]}"
            names.setdefault(n, 0)
            self.files.append(f"{n}.png")

    def put(self, i: int, patch: np.ndarray) -> None:
        Image.fromarray(patch).save(self.folder / self.files[i], compress_level=1)

    def drop(self, i: int) -> None:
        try:
            (self.folder / self.files[i]).unlink()
        except FileNotFoundError:
            pass

    def close(self):
        pass


def write_csv_header(fh: IO[str], genes: list[str]) -> None:
    csv.writer(fh).writerow(CSV_LEADING_COLUMNS + list(genes))


def csv_leading_fields(sid: str, barcodes: list[str], files: list[str], coords: np.ndarray) -> list[list[str]]:
    """ID, path, group, x, y of each row (x, y written as Python floats' repr)."""
    return [[f"{sid}/{b}", f"{sid}/{f}", sid, repr(float(x)), repr(float(y))]
            for b, f, (x, y) in zip(barcodes, files, coords)]


def write_csv_rows(fh: IO[str], head: list[list[str]], X) -> None:
    """Fast wide-CSV rows: csv-quoted leading fields + '%.6g' values ('0' for zeros)."""
    buf = io.StringIO()
    hw = csv.writer(buf)
    for i, h in enumerate(head):
        row = X[i] if isinstance(X, np.ndarray) else X[i].toarray().ravel()
        buf.seek(0)
        buf.truncate()
        hw.writerow(h)
        fh.write(buf.getvalue().rstrip("\r\n"))
        fh.write(",")
        fh.write(",".join(["0" if v == 0 else "%.6g" % v for v in row.tolist()]))
        fh.write("\n")
