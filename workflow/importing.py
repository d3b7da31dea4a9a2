"""import: raw spatial transcriptomics (legacy ST, 10x Visium, HEST-1k) -> a dataset hexpr trains on."""
from __future__ import annotations

from embedder.importers import import_dataset

__all__ = ["import_dataset"]
