"""What an importer's loader hands to the writer: one sample's spots, counts, scale and image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class SampleData:
    """Everything needed to write one sample (produced by an importer's loader)."""

    sample_id: str
    barcodes: list[str]                 # spot ids, one per row of counts
    genes: list[str]                    # unique gene symbols, one per column of counts
    counts: sp.csr_matrix               # (N, G) raw counts
    coords: np.ndarray                  # (N, 2) float64 spot centre, full-res px (x=col, y=row)
    source_um_per_px: float | None      # slide µm/px (None only for ready patches)
    scale_info: dict                    # how source_um_per_px was obtained
    image_path: Path | None = None      # full-resolution slide to cut from ...
    patches_h5: Path | None = None      # ... or ready patches (HEST)
    patches_rows: np.ndarray | None = None   # row of each spot in patches_h5['img']
    patches_um_per_px: float | None = None   # pixel size of the ready patches
    obs: pd.DataFrame | None = None     # extra per-spot columns (same row order)
    source_files: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    counts_info: dict = field(default_factory=dict)


@dataclass
class SampleSpec:
    """A sample found in a source: its genes are known before the (costlier) load."""

    sample_id: str
    kind: str
    genes: list[str]
    load: Callable[[], SampleData]
    source_files: dict = field(default_factory=dict)
