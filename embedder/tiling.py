"""Tissue detection and the tile grid of a whole slide, and the tiles as a patch dataset.

* :func:`tissue_mask`: on a thumbnail, HSV saturation > Otsu threshold (stained tissue is
  coloured, glass is grey/white), then morphological closing/opening and removal of small
  objects and small holes (the "fast mode" of sopa/HEST).
* :func:`tile_grid`: squares of ``tile_px`` level-0 pixels every ``stride_px``; with
  :func:`tissue_fraction` per tile from the mask, tiles with at least ``min_tissue`` are kept.
* :class:`TileDataset`: the kept tiles as a :class:`~embedder.datasets.PatchDataset` (ids
  ``tile_r<row>_c<col>``, ``coords`` = tile centres in level-0 pixels), read lazily from the
  slide and resampled to the model's patch size, so the normal embed loop and cache (resumable)
  embed them. Its fingerprint hashes the slide file and the tile geometry, never every pixel.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from hexpr.embedder.datasets import PatchDataset
from hexpr.embedder.slides import SlideImage, open_slide, read_square

MIN_SATURATION_RANGE = 0.02     # a thumbnail flatter than this has no tissue
MIN_OTSU_SATURATION = 0.05      # never call pixels greyer than this tissue (blank slides)
PALE_MIN_SATURATION = 0.09      # pale stroma is stained (~0.10-0.15 on her2st); grey smudges and glass are not
TEXTURE_MIN_STD = 4.0           # glass and haze vary less than this (HSV value, 5x5 window); stroma more
GLASS_VALUE_PERCENTILE = 95     # the glass's brightness (HSV value): this percentile of the thumbnail
GLASS_VALUE_MARGIN = 20         # pixels this much darker (HSV value, 0-255) than the glass are tissue
MIN_GLASS_VALUE = 200           # glass is at least this bright (a crop without glass: assume so)
BLACK_MAX_VALUE = 40            # black ink / scanner borders
PEN_BLUE_MIN_RATIO = 1.5        # blue ink: blue > 3x red (hematoxylin stays below ~2.5x at thumbnail scale)
PEN_MIN_CHROMA = 60             # ink is strongly coloured
OBJECT_MIN_FRACTION = 0.0005    # tissue pieces smaller than this share of the thumbnail are dropped
HOLE_MAX_FRACTION = 0.0005      # holes smaller than this share of the thumbnail are filled
FINGERPRINT_SAMPLE_BYTES = 1 << 20


def _disk(radius: int) -> np.ndarray:
    r = max(1, int(radius))
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an (h, w, 3) uint8 image."""
    a = rgb.astype(np.float32)
    mx, mn = a.max(axis=-1), a.min(axis=-1)
    return np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)


def local_std(value: np.ndarray, size: int = 5) -> np.ndarray:
    """Standard deviation of ``value`` in a ``size`` x ``size`` window around each pixel."""
    v = value.astype(np.float32)
    mean = ndimage.uniform_filter(v, size)
    return np.sqrt(np.maximum(ndimage.uniform_filter(v * v, size) - mean * mean, 0))


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Marker ink, never tissue: saturated blue (red far below blue, green above red), green (green
    the brightest channel by a margin) and black (no channel above BLACK_MAX_VALUE)."""
    a = rgb.astype(np.int16)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    blue = (b > 2 * PEN_BLUE_MIN_RATIO * r) & (g > r) & (b - r > PEN_MIN_CHROMA)
    green = (g > r + PEN_MIN_CHROMA // 2) & (g > b + PEN_MIN_CHROMA // 4)
    black = a.max(axis=-1) <= BLACK_MAX_VALUE
    return blue | green | black


def tissue_mask(thumbnail: np.ndarray, smooth_px: int | None = None) -> np.ndarray:
    """Boolean tissue mask of a thumbnail.

    A pixel is tissue when it is not marker ink (:func:`pen_mask`) and is either clearly coloured
    (HSV saturation above Otsu's threshold: stained tissue against glass, the sopa/HEST "fast mode")
    or stained and either darker than the glass (value below the glass's by GLASS_VALUE_MARGIN) or
    textured (fibres and nuclei: local standard deviation of value above TEXTURE_MIN_STD, where glass
    and eosin haze are smooth), stained meaning saturation above PALE_MIN_SATURATION. The second rule keeps pale stroma when tissue fills the image and
    Otsu splits pink from purple; it rejects the bright eosin haze and grey smudges on glass. Then
    closed, opened, and cleaned of small objects and small holes.
    """
    from skimage.filters import threshold_otsu

    sat = saturation(thumbnail)
    value = thumbnail.max(axis=-1)
    usable = ~pen_mask(thumbnail)
    if not usable.any() or np.ptp(sat[usable]) < MIN_SATURATION_RANGE:
        return np.zeros(sat.shape, bool)
    threshold = max(float(threshold_otsu(sat[usable])), MIN_OTSU_SATURATION)
    glass_value = max(float(np.percentile(value[usable], GLASS_VALUE_PERCENTILE)), MIN_GLASS_VALUE)
    pale = (sat > PALE_MIN_SATURATION) & ((value < glass_value - GLASS_VALUE_MARGIN) | (local_std(value) > TEXTURE_MIN_STD))
    mask = usable & ((sat > threshold) | pale)
    r = smooth_px if smooth_px is not None else max(1, round(max(mask.shape) / 500))
    mask = ndimage.binary_closing(mask, structure=_disk(r), iterations=1, border_value=0)
    mask = ndimage.binary_opening(mask, structure=_disk(r), iterations=1)
    area = mask.size
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        small = sizes < OBJECT_MIN_FRACTION * area
        small[0] = False
        mask[small[labels]] = False
    holes, n = ndimage.label(~mask)
    if n:
        sizes = np.bincount(holes.ravel())
        border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        fill = sizes < HOLE_MAX_FRACTION * area
        fill[0] = False
        fill[border] = False
        mask[fill[holes]] = True
    return mask & usable


@dataclass
class TileGrid:
    """Square tiles of ``tile_px`` level-0 pixels; ``x0``/``y0`` are top-left corners (N,)."""

    x0: np.ndarray
    y0: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    tile_px: float
    stride_px: float
    n_rows: int
    n_cols: int

    def __len__(self) -> int:
        return len(self.x0)

    @property
    def centres(self) -> np.ndarray:
        """(N, 2) tile centres (x, y), continuous level-0 pixel positions."""
        return np.column_stack([self.x0 + self.tile_px / 2, self.y0 + self.tile_px / 2])

    def ids(self) -> list[str]:
        return [f"tile_r{r}_c{c}" for r, c in zip(self.rows, self.cols)]

    def subset(self, keep: np.ndarray) -> "TileGrid":
        return TileGrid(self.x0[keep], self.y0[keep], self.rows[keep], self.cols[keep], self.tile_px, self.stride_px,
                        self.n_rows, self.n_cols)


def tile_grid(width: int, height: int, tile_px: float, stride_px: float | None = None) -> TileGrid:
    """Every tile that fits in the slide, row-major, starting at (0, 0) every ``stride_px``."""
    stride_px = float(tile_px if stride_px is None else stride_px)
    if tile_px <= 0 or stride_px <= 0:
        raise ValueError(f"tile size and stride must be positive, got {tile_px} and {stride_px}")
    n_cols = max(0, math.floor((width - tile_px) / stride_px) + 1)
    n_rows = max(0, math.floor((height - tile_px) / stride_px) + 1)
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    return TileGrid(cols * stride_px, rows * stride_px, rows, cols, float(tile_px), stride_px, n_rows, n_cols)


def tissue_fraction(mask: np.ndarray, scale: float, grid: TileGrid) -> np.ndarray:
    """Share of each tile's area that is tissue, from a mask at ``scale`` mask px per level-0 px."""
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.float64)
    integral[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)

    def clip(v, hi):
        return np.clip(np.rint(v).astype(np.int64), 0, hi)

    x0, y0 = clip(grid.x0 * scale, w), clip(grid.y0 * scale, h)
    x1, y1 = clip((grid.x0 + grid.tile_px) * scale, w), clip((grid.y0 + grid.tile_px) * scale, h)
    x1, y1 = np.maximum(x1, np.minimum(x0 + 1, w)), np.maximum(y1, np.minimum(y0 + 1, h))
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return total / area


def slide_digest(path: Path) -> str:
    """Cheap content identity of a slide file: size, first and last MiB (plus sidecar folder sizes)."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_SAMPLE_BYTES))
        f.seek(max(0, size - FINGERPRINT_SAMPLE_BYTES))
        h.update(f.read(FINGERPRINT_SAMPLE_BYTES))
    sidecar = path.with_suffix("")          # MRXS keeps its data in a folder of the same stem
    if sidecar.is_dir():
        for p in sorted(sidecar.rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(sidecar)}:{p.stat().st_size}".encode())
    return h.hexdigest()


@dataclass
class TileDataset(PatchDataset):
    """Tiles of one slide as patches: square of ``tile_src_px`` level-0 px around each centre,
    resampled to ``patch_px``. Picklable: each process opens the slide itself on first read."""

    item_noun = "tiles"      # progress and interruption messages count tiles
    slide_path: Path | None = None
    um_per_px: float = 0.0
    tile_src_px: float = 0.0
    patch_px: int = 224
    _slide: SlideImage | None = field(default=None, repr=False)
    _pid: int | None = field(default=None, repr=False)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_slide"] = None
        return state

    def slide(self) -> SlideImage:
        if self._slide is None or self._pid != os.getpid():
            self._slide = open_slide(self.slide_path, self.um_per_px, force_um_per_px=True)  # checked by the caller
            self._pid = os.getpid()
        return self._slide

    def read_image(self, i: int) -> np.ndarray:
        cx, cy = self.coords[i]
        return np.array(read_square(self.slide(), float(cx), float(cy), self.tile_src_px, self.patch_px)[0])  # writable

    def image_label(self, i: int) -> str:
        cx, cy = self.coords[i]
        return f"{self.slide_path} tile {self.ids[i]} centred at ({cx:.0f}, {cy:.0f})"

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(type(self).__name__.encode() + slide_digest(self.slide_path).encode())
            h.update(f"{self.um_per_px:.9g}|{self.tile_src_px:.9g}|{self.patch_px}|pyramid-levels".encode())
            h.update("\n".join(self.ids).encode())
            h.update(np.ascontiguousarray(self.coords, np.float64).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def tile_dataset(slide_path: Path, um_per_px: float, centres: np.ndarray, ids: list[str], tile_um: float,
                 patch_px: int, name: str | None = None, slide: SlideImage | None = None) -> TileDataset:
    """Tiles of ``tile_um`` µm centred at ``centres`` (level-0 px) of a slide at ``um_per_px``.
    ``slide``: the slide already open in this process (reused, not decoded again; closed by ``close()``)."""
    slide_path = Path(slide_path)
    dataset = TileDataset(name=name or f"slide_{slide_path.stem}", source=slide_path, ids=list(ids),
                          coords=np.asarray(centres, np.float64).reshape(-1, 2), slide_path=slide_path,
                          um_per_px=float(um_per_px), tile_src_px=float(tile_um / um_per_px), patch_px=int(patch_px))
    if slide is not None:
        dataset._slide, dataset._pid = slide, os.getpid()
    return dataset
