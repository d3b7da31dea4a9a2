"""Dataset importers: public spatial-transcriptomics sources -> hexpr's HEST-style files.

    import_dataset(source, out_dir, kind="auto", ...)      any supported source (or a list of them)
    import_legacy_st(root, out_dir, ...)                    legacy ST, her2st layout
    import_visium(folder(s), out_dir, ...)                  10x Space Ranger output
    import_hest(root, out_dir, ...)                         HEST-1k st/ + wsis/ or patches/
    load_visium_hd(folder, tile_um=...)                     10x Visium HD bins pooled into tiles
    load_xenium(folder, tile_um=... | None)                 10x Xenium cells pooled into tiles (or per cell)

Output (CONTRACT.md "HEST-style files"): ``out_dir/patches/<sample>.h5`` + ``out_dir/st/<sample>.h5ad``,
or with ``output="challenge"`` ``out_dir/<sample>/<barcode>.png`` + ``out_dir/dataset.csv``
(ID = ``<sample>/<barcode>`` as embedder.datasets names HEST spots; path, group, x, y, then one
column per gene of normalised expression).  Samples cut from a slide also get
``out_dir/thumbnails/<sample>.png`` (longest side <= 2048 px); its scale (thumbnail px per
full-res px) is in the patch file attrs ``thumbnail_scale`` / ``thumbnail`` (path relative to
out_dir), in ``uns['hexpr_import']`` and in the summary.
All samples of one call share one gene set (intersection).  Everything is written under temporary
names and renamed only when every sample succeeded.
"""

from __future__ import annotations

from .errors import ImporterError, ImporterWarning
from .hest import import_hest, load_hest_sample
from .legacy_st import derive_um_per_px, import_legacy_st, load_legacy_section
from .patches import cut_patch
from .sample import SampleData, SampleSpec
from .slide_image import open_image
from .sources import IMPORTERS, KINDS, ImportRequest, detect_kind, import_dataset
from .tenx_h5 import read_10x_h5
from .tiles import DEFAULT_MIN_TILE_COUNTS
from .visium import import_visium, load_visium, read_10x_mtx
from .visium_hd import load_visium_hd
from .xenium import load_xenium

__all__ = [
    "ImporterError", "ImporterWarning", "import_dataset", "detect_kind", "import_legacy_st", "import_visium",
    "import_hest", "load_legacy_section", "load_visium", "load_hest_sample", "derive_um_per_px",
    "read_10x_h5", "read_10x_mtx", "open_image", "cut_patch", "SampleData", "SampleSpec", "KINDS",
    "IMPORTERS", "ImportRequest", "DEFAULT_MIN_TILE_COUNTS", "load_visium_hd", "load_xenium",
]
