"""import: raw spatial transcriptomics (legacy ST, 10x Visium, HEST-1k) -> a dataset hexpr trains on."""
from __future__ import annotations

from pathlib import Path

from hexpr.embedder.importers import import_dataset as import_sources
from hexpr.workflow.options import check_output_folder

__all__ = ["import_dataset"]


def import_dataset(source, out_dir: str | Path, **options) -> dict:
    """``embedder.importers.import_dataset``, refusing an ``out_dir`` that names an existing file first.

    Example::

        >>> report = hexpr.import_dataset("raw/her2st", "datasets/her2st")
        >>> report["n_spots"]
    """
    check_output_folder("--out", out_dir)
    return import_sources(source, out_dir, **options)
