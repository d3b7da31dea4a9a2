"""Slide thumbnails written beside an import: ``out_dir/thumbnails/<sample>.png``.

The slide is reduced by an integer factor ``f`` (longest side <= :data:`THUMBNAIL_MAX_SIDE`), so
thumbnail pixel ``j`` covers full-resolution pixels ``[j*f, (j+1)*f)`` and a full-resolution
position ``p`` lies at ``p * thumbnail_scale`` (``thumbnail_scale = 1/f``, thumbnail px per
full-res px).  The scale and the path (relative to ``out_dir``) are stored in the patch file's
attrs (``thumbnail_scale``, ``thumbnail``), in the .h5ad's ``uns['hexpr_import']`` and as PNG text
chunks (``hexpr_thumbnail_scale``).  Big TIFFs use a pyramid level or band-wise reads.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from hexpr.embedder.slides import THUMBNAIL_MAX_SIDE, SlideImage, thumbnail_factor

from .staging import Staging

THUMBNAIL_DIR = "thumbnails"            # folder of the thumbnails, under the import's out_dir


def write_thumbnail(image: SlideImage, sid: str, staging: Staging, out_dir: Path) -> dict:
    """Write out_dir/thumbnails/<sid>.png (under a temporary name until commit); returns its record."""
    f = thumbnail_factor(image.width, image.height, THUMBNAIL_MAX_SIDE)
    arr = image.thumbnail(f)
    rel = f"{THUMBNAIL_DIR}/{sid}.png"
    final = out_dir / THUMBNAIL_DIR / f"{sid}.png"
    final.parent.mkdir(parents=True, exist_ok=True)
    scale = 1.0 / f
    info = PngInfo()
    info.add_text("hexpr_thumbnail_scale", repr(scale))
    info.add_text("hexpr_image_size", f"{int(image.width)}x{int(image.height)}")
    info.add_text("hexpr_sample_id", str(sid))
    Image.fromarray(arr).save(staging.temp_file(final), format="PNG", pnginfo=info, compress_level=3)
    return {"thumbnail": rel, "thumbnail_scale": scale, "thumbnail_factor": int(f),
            "thumbnail_size": [int(arr.shape[1]), int(arr.shape[0])]}
