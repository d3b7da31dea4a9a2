"""Context scales: a wider square around each spot's or tile's centre, cut from its source slide by region.

A context scale of ``S`` µm is, for every row of a dataset, a square of ``S`` µm centred where the
row's patch is centred, read from the full-resolution source image through the slide reader table
(:data:`embedder.slides.SLIDE_READERS`, :func:`embedder.slides.read_square`: by region, white-padded
at the image edge like the importers' patches) and resampled to the dataset's patch pixels. The
squares of one scale form a :class:`RegionDataset`, a patch dataset like any other, so the normal
embed loop and cache embed them (the fingerprint names the source images, the centres and the
scale: each scale has its own cache key and is embedded once).

Where the squares come from:

* HEST-style datasets written by ``hexpr import``: each patch file records its source image
  (``source_image`` attribute, else ``uns['hexpr_import']['source_files']['image']`` of the sample's
  ``.h5ad``) and the image's µm/px (``source_pixel_size_um``, else ``uns['hexpr_import']``); the
  spot coordinates are full-resolution pixels of that image.
* Slide tiles (:class:`embedder.tiling.TileDataset`): the slide itself, around each tile centre.
* The challenge CSV layout holds patches only, no source image: :class:`ContextError` says so.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from hexpr.embedder.datasets import CsvPatchDataset, HestPatchDataset, PatchDataset
from hexpr.embedder.errors import DataError, UsageError
from hexpr.embedder.slides import SlideError, SlideImage, open_slide, read_square
from hexpr.embedder.tiling import TileDataset, slide_digest

CONTEXT_OPTION = "--context-um"


class ContextError(DataError):
    """Context squares cannot be cut: no source image, an unknown scale, or a size that does not fit."""


class ContextWarning(UserWarning):
    """Context squares that reach beyond the image edge (padded with white), counted per scale."""


def parse_context_um(value) -> tuple[float, ...]:
    """Context sizes in µm from ``"336,672"``, a number or a list; () for None/"" (no context).
    Sizes keep their order (the order the features are concatenated in); repeats are refused."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    parts = value.replace(";", ",").split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    sizes = []
    for part in parts:
        try:
            size = float(str(part).strip())
        except ValueError:
            raise UsageError(f"{CONTEXT_OPTION} must be sizes in µm separated by commas (e.g. 336,672), got {value!r}") from None
        if not math.isfinite(size) or size <= 0:
            raise UsageError(f"{CONTEXT_OPTION} sizes must be positive numbers of µm, got {part!r} in {value!r}")
        sizes.append(size)
    repeated = sorted({s for s in sizes if sizes.count(s) > 1})
    if repeated:
        raise UsageError(f"{CONTEXT_OPTION} {value!r} names {repeated[0]:g} µm more than once; give each size once")
    return tuple(sizes)


def format_um(sizes) -> str:
    return ",".join(f"{s:g}" for s in sizes)


@dataclass
class ContextSource:
    """Where a dataset's context squares come from: per row a slide (index into ``slides``) and a
    centre (continuous level-0 px); the patch's own size (µm and px)."""

    slides: list[Path]
    um_per_px: list[float]
    slide_index: np.ndarray
    centres: np.ndarray
    patch_um: float
    patch_px: int
    open_slide: SlideImage | None = None   # a slide the dataset already holds open (tiles), reused


@dataclass
class RegionDataset(PatchDataset):
    """Squares of ``side_um`` µm around each row's centre in its source slide, resampled to ``patch_px``.
    Picklable: each process opens the slide it needs on first read and keeps one slide open at a time."""

    slide_paths: list[Path] = field(default_factory=list)
    slide_um_per_px: list[float] = field(default_factory=list)
    slide_index: np.ndarray | None = None
    side_um: float = 0.0
    patch_px: int = 224
    _slide: SlideImage | None = field(default=None, repr=False)
    _slide_key: tuple | None = field(default=None, repr=False)
    _shared: SlideImage | None = field(default=None, repr=False)
    _shared_pid: int | None = field(default=None, repr=False)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_slide"] = state["_slide_key"] = state["_shared"] = None
        return state

    def slide(self, s: int) -> SlideImage:
        if self._shared is not None and self._shared_pid == os.getpid() and len(self.slide_paths) == 1:
            return self._shared
        key = (s, os.getpid())
        if self._slide_key != key:
            if self._slide is not None and self._slide_key[1] == os.getpid():
                self._slide.close()
            self._slide = open_slide(self.slide_paths[s], self.slide_um_per_px[s], force_um_per_px=True)
            self._slide_key = key
        return self._slide

    def read_image(self, i: int) -> np.ndarray:
        s = int(self.slide_index[i])
        cx, cy = self.coords[i]
        side_src = self.side_um / self.slide_um_per_px[s]
        return np.array(read_square(self.slide(s), float(cx), float(cy), side_src, self.patch_px)[0])

    def image_label(self, i: int) -> str:
        cx, cy = self.coords[i]
        return (f"the {self.side_um:g} µm context of {self.ids[i]!r} centred at ({cx:.0f}, {cy:.0f}) in "
                f"{self.slide_paths[int(self.slide_index[i])]}")

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(type(self).__name__.encode())
            for path, mpp in zip(self.slide_paths, self.slide_um_per_px):
                h.update(f"{slide_digest(path)}|{mpp:.9g}\n".encode())
            h.update(f"{self.side_um:.9g}|{self.patch_px}|pyramid-levels".encode())
            h.update("\n".join(self.ids).encode())
            h.update(np.ascontiguousarray(self.slide_index, np.int64).tobytes())
            h.update(np.ascontiguousarray(self.coords, np.float64).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = self._slide_key = None


# ----------------------------------------------------------------------------- where the squares come from
def _uns_record(patch_file: Path) -> dict:
    """``source_files/image`` and ``source_um_per_px`` of ``uns['hexpr_import']`` in the sample's .h5ad."""
    for h5ad in (patch_file.with_suffix(".h5ad"), patch_file.parent.parent / "st" / f"{patch_file.stem}.h5ad"):
        if not h5ad.is_file():
            continue
        try:
            with h5py.File(h5ad, "r") as f:
                record = f.get("uns/hexpr_import")
                if record is None:
                    return {}
                image = record.get("source_files/image")
                mpp = record.get("source_um_per_px")
                return {"image": None if image is None else _text(image[()]),
                        "um_per_px": None if mpp is None else _number(mpp[()])}
        except OSError:
            return {}
    return {}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _resolve(recorded: str, patch_file: Path) -> Path:
    """A recorded image path: absolute as is; relative, from the working folder or the dataset's folder."""
    path = Path(recorded)
    if path.is_absolute() or path.exists():
        return path
    for base in (patch_file.parent.parent, patch_file.parent.parent.parent):
        if (base / path).exists():
            return base / path
    return path


def _hest_source(dataset: HestPatchDataset, why: str) -> ContextSource:
    scale = dataset.patch_scale()
    slides, mpps = [], []
    for patch_file in dataset.patch_files:
        with h5py.File(patch_file, "r") as f:
            attrs = dict(f.attrs)
        fallback = _uns_record(patch_file)
        image = _text(attrs["source_image"]) if attrs.get("source_image") not in (None, "", b"") else fallback.get("image")
        mpp = _number(attrs.get("source_pixel_size_um")) or fallback.get("um_per_px")
        if not image:
            raise ContextError(
                f"{why} needs the source image of each spot, and {patch_file} does not record one (its patches were "
                f"not cut from a whole-slide image by `hexpr import`, e.g. HEST ready patches); import the sample "
                f"from its whole-slide image (HEST: wsis/<sample>.tif) with `hexpr import`")
        if mpp is None:
            raise ContextError(f"{why} needs the µm/px of {image}, and {patch_file} does not record it "
                               f"(attribute source_pixel_size_um); re-import the sample with `hexpr import`")
        path = _resolve(image, patch_file)
        if not path.is_file():
            raise ContextError(f"{why} cuts its squares from the source image {image}, recorded by {patch_file}, "
                               f"which is not found; restore the image there (or re-import the sample)")
        slides.append(path)
        mpps.append(mpp)
    if scale is None or dataset.coords is None:
        raise ContextError(f"{why} needs the patch size and spot coordinates; {dataset.source} records "
                           f"{'no patch size (patch_size_um)' if scale is None else 'no coords'}; re-import it with `hexpr import`")
    # a spot coordinate (x, y) names pixel img[y, x]; its patch is centred at (x + 0.5, y + 0.5)
    return ContextSource(slides, mpps, dataset.rows[:, 0].astype(np.int64), np.asarray(dataset.coords, np.float64) + 0.5,
                         float(scale["patch_um"]), int(scale["patch_px"]))


def context_source(dataset: PatchDataset, why: str = "context (--context-um)") -> ContextSource:
    """Where ``dataset``'s context squares come from, or a ContextError naming what is missing."""
    if isinstance(dataset, TileDataset):
        return ContextSource([Path(dataset.slide_path)], [float(dataset.um_per_px)], np.zeros(len(dataset), np.int64),
                             np.asarray(dataset.coords, np.float64), float(dataset.tile_src_px * dataset.um_per_px),
                             int(dataset.patch_px), open_slide=dataset.slide())
    if isinstance(dataset, HestPatchDataset):
        return _hest_source(dataset, why)
    if isinstance(dataset, CsvPatchDataset):
        raise ContextError(
            f"{why} cuts wider squares around each spot from its source slide, and {dataset.source} is in the challenge "
            f"CSV layout, which holds the patches alone (no source image, no µm/px); use a dataset written by "
            f"`hexpr import` (HEST-style output), which records both")
    raise ContextError(f"{why} needs each spot's source image and µm/px, which {dataset.source} "
                       f"({type(dataset).__name__}) does not record")


def _slide_sizes(source: ContextSource) -> list[tuple[int, int]]:
    sizes = []
    for path, mpp in zip(source.slides, source.um_per_px):
        if source.open_slide is not None:
            sizes.append((int(source.open_slide.width), int(source.open_slide.height)))
            continue
        try:
            with open_slide(path, mpp, force_um_per_px=True) as slide:
                sizes.append((int(slide.width), int(slide.height)))
        except SlideError as exc:
            raise ContextError(f"context squares are cut from {path}, which cannot be read: {exc}") from exc
    return sizes


def check_context_sizes(source: ContextSource, sizes, where: str) -> list[tuple[int, int]]:
    """Every size is larger than the patch and fits at least one source image; returns the image sizes."""
    for size in sizes:
        if size <= source.patch_um * (1 + 1e-9):
            raise UsageError(f"{CONTEXT_OPTION} {size:g}: a context square must be larger than the patch it surrounds "
                             f"({source.patch_um:g} µm in {where}); give sizes above {source.patch_um:g} µm, e.g. "
                             f"{3 * source.patch_um:g}")
    image_sizes = _slide_sizes(source)
    for size in sizes:
        fits = [max(w, h) * mpp >= size for (w, h), mpp in zip(image_sizes, source.um_per_px)]
        if not any(fits):
            largest = max(max(w, h) * mpp for (w, h), mpp in zip(image_sizes, source.um_per_px))
            raise UsageError(f"{CONTEXT_OPTION} {size:g}: a context square of {size:g} µm is larger than every source "
                             f"image of {where} (the largest spans {largest:,.0f} µm); give a smaller size")
    return image_sizes


def check_context(dataset: PatchDataset, sizes, why: str = "context (--context-um)") -> tuple[float, ...]:
    """The parsed sizes, once ``dataset`` is known to have source images they all fit (before any work)."""
    sizes = parse_context_um(sizes)
    if sizes:
        check_context_sizes(context_source(dataset, why), sizes, str(dataset.source))
    return sizes


def fitting_sizes(dataset: PatchDataset, multiples) -> tuple[tuple[float, ...], str | None]:
    """Context sizes of ``multiples`` x the patch size that ``dataset`` can be cut at, and why some or
    all cannot (None when all can): for choosers such as ``--head auto`` that try context when possible."""
    try:
        source = context_source(dataset, "context")
    except ContextError as exc:
        return (), str(exc)
    sizes, why = [], None
    for m in multiples:
        size = float(m) * source.patch_um
        try:
            check_context_sizes(source, [size], str(dataset.source))
            sizes.append(size)
        except UsageError as exc:
            why = str(exc)
    return tuple(sizes), why


def padded_rows(source: ContextSource, image_sizes, side_um: float) -> np.ndarray:
    """Which rows' squares of ``side_um`` reach beyond their image (padded with white there)."""
    mpp = np.asarray(source.um_per_px, np.float64)[source.slide_index]
    wh = np.asarray(image_sizes, np.float64)[source.slide_index]
    half = side_um / mpp / 2
    cx, cy = source.centres[:, 0], source.centres[:, 1]
    return (cx - half < 0) | (cy - half < 0) | (cx + half > wh[:, 0]) | (cy + half > wh[:, 1])


def context_datasets(dataset: PatchDataset, sizes, why: str = "context (--context-um)") -> list[tuple[RegionDataset, dict]]:
    """One :class:`RegionDataset` per context size (in the given order) with its record
    (``context_um``, ``context_px``, ``n_padded``); squares padded at an image edge are counted and
    warned about, as the importers do. A bad size or a dataset without source images: one error."""
    sizes = parse_context_um(sizes)
    if not sizes:
        return []
    source = context_source(dataset, why)
    image_sizes = check_context_sizes(source, sizes, str(dataset.source))
    out = []
    for size in sizes:
        padded = padded_rows(source, image_sizes, size)
        if padded.any():
            warnings.warn(f"{dataset.source}: {int(padded.sum())} of {len(padded)} context squares of {size:g} µm reach "
                          f"beyond the image edge and are padded with white", ContextWarning, stacklevel=3)
        region = RegionDataset(name=f"{dataset.name}__context{size:g}um", source=dataset.source, ids=list(dataset.ids),
                               coords=source.centres, slide_paths=list(source.slides),
                               slide_um_per_px=list(source.um_per_px), slide_index=source.slide_index,
                               side_um=float(size), patch_px=source.patch_px)
        if source.open_slide is not None:
            region._shared, region._shared_pid = source.open_slide, os.getpid()
        if hasattr(dataset, "item_noun"):
            region.item_noun = dataset.item_noun
        out.append((region, {"context_um": float(size), "context_px": source.patch_px, "n_padded": int(padded.sum()),
                             "n_rows": len(padded)}))
    return out
