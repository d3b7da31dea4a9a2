"""A Deep Zoom tile pyramid of a slide for the browser viewer, cut by region through the slide readers.

Levels follow Deep Zoom (OpenSeadragon's native layout): level ``L`` is the slide reduced by
``2 ** (max_level - L)``, ``max_level = ceil(log2(longest side))``, cut into ``TILE`` px JPEG tiles
``<folder>/<L>/<col>_<row>.jpg``. The slide is never loaded whole:

* fine levels (the slide's own pixels down to ``2 ** BLOCK_STEPS`` times smaller) are cut in blocks of
  ``TILE * 2 ** BLOCK_STEPS`` level-0 px, each read once through the reader table and halved step by
  step; only blocks that a predicted tile overlaps are cut, so glass costs nothing (the page draws the
  coarser level there);
* coarse levels are cut whole, block by block, from the coarsest resolution level of the slide that is
  fine enough (the slide's own pyramid).
"""
from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from hexpr.embedder.slides import SlideImage, open_image

TILE = 256                 # Deep Zoom tile side (no overlap)
BLOCK_STEPS = 2            # fine levels cut from one block read: level-0 block = TILE * 2**2 = 1,024 px
JPEG_QUALITY = 80
PYRAMID_WORKERS = 4        # processes cutting fine blocks of a large slide (at most one per CPU)
MIN_BLOCKS_PER_WORKER = 8  # fewer blocks than this per process: cut in this process


@dataclass
class Pyramid:
    """What the page needs to know of a written pyramid."""
    width: int
    height: int
    max_level: int
    fine_from: int             # levels >= fine_from exist only in the blocks of ``blocks``
    block_px: int              # level-0 side of a fine block
    blocks: np.ndarray         # (block rows, block cols) bool: cut at the fine levels
    n_tiles: int
    n_bytes: int

    def describe(self) -> dict:
        return {"width": self.width, "height": self.height, "tile_size": TILE, "max_level": self.max_level,
                "fine_from": self.fine_from, "block_px": self.block_px,
                "block_cols": int(self.blocks.shape[1]), "block_rows": int(self.blocks.shape[0]),
                "blocks": "".join("1" if b else "0" for b in self.blocks.ravel()),
                "n_tiles": self.n_tiles, "bytes": self.n_bytes}


def max_level(width: int, height: int) -> int:
    return max(0, math.ceil(math.log2(max(int(width), int(height), 1))))


def level_size(width: int, height: int, level: int, top: int) -> tuple[int, int]:
    d = 2 ** (top - level)
    return -(-int(width) // d), -(-int(height) // d)


def tissue_blocks(width: int, height: int, block_px: int, boxes: np.ndarray) -> np.ndarray:
    """(rows, cols) bool: the blocks of ``block_px`` level-0 px that any box (x0, y0, x1, y1) overlaps."""
    rows, cols = -(-int(height) // block_px), -(-int(width) // block_px)
    hit = np.zeros((rows, cols), bool)
    b = np.asarray(boxes, float).reshape(-1, 4)
    c0 = np.clip(np.floor(b[:, 0] / block_px), 0, cols - 1).astype(int)
    r0 = np.clip(np.floor(b[:, 1] / block_px), 0, rows - 1).astype(int)
    c1 = np.clip(np.ceil(b[:, 2] / block_px) - 1, 0, cols - 1).astype(int)
    r1 = np.clip(np.ceil(b[:, 3] / block_px) - 1, 0, rows - 1).astype(int)
    for span in np.unique(np.c_[r0, r1, c0, c1], axis=0):
        hit[span[0]:span[1] + 1, span[2]:span[3] + 1] = True
    return hit


class _TileWriter:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.n_tiles = 0
        self.n_bytes = 0
        self._made: set[int] = set()

    def cut(self, image: Image.Image, level: int, col0: int, row0: int) -> None:
        """Cut ``image`` (whose top-left is tile (col0, row0) of ``level``) into tiles and save them."""
        if level not in self._made:
            (self.folder / str(level)).mkdir(parents=True, exist_ok=True)
            self._made.add(level)
        w, h = image.size
        for ty in range(0, h, TILE):
            for tx in range(0, w, TILE):
                path = self.folder / str(level) / f"{col0 + tx // TILE}_{row0 + ty // TILE}.jpg"
                image.crop((tx, ty, min(w, tx + TILE), min(h, ty + TILE))).save(path, quality=JPEG_QUALITY)
                self.n_tiles += 1
                self.n_bytes += path.stat().st_size


def _read_reduced(slide: SlideImage, d: int, x0: int, y0: int, w: int, h: int) -> Image.Image:
    """``w`` x ``h`` px of the slide reduced ``d`` times, top-left at (x0, y0) of that reduction."""
    level = slide.best_level(d)
    dx, dy = slide.level_downsamples[level]
    sx0, sy0 = math.floor(x0 * d / dx), math.floor(y0 * d / dy)
    sx1, sy1 = math.ceil((x0 + w) * d / dx), math.ceil((y0 + h) * d / dy)
    region = slide.level_region(level, sx0, sy0, max(sx1, sx0 + 1), max(sy1, sy0 + 1))
    if region.size == (w, h):
        return region
    box = (x0 * d / dx - sx0, y0 * d / dy - sy0, (x0 + w) * d / dx - sx0, (y0 + h) * d / dy - sy0)
    return region.resize((w, h), Image.Resampling.BOX, box=box)


def pyramid_workers(slide: SlideImage, n_blocks: int) -> int:
    """Processes cutting the fine blocks: up to PYRAMID_WORKERS (one per CPU) for a slide read from a file
    with enough blocks to pay for starting them; else 1 (this process)."""
    if n_blocks < MIN_BLOCKS_PER_WORKER * 2 or not Path(str(slide.path)).is_file() or slide.mode not in ("region", "openslide"):
        return 1
    return max(1, min(PYRAMID_WORKERS, os.cpu_count() or 1, n_blocks // MIN_BLOCKS_PER_WORKER))


def _cut_fine_block(slide: SlideImage, writer: _TileWriter, r: int, c: int, top: int, steps: int, width: int,
                    height: int) -> None:
    """One block of the fine levels: read once at level 0, halved ``steps`` times, cut at each step."""
    block_px = TILE * 2 ** steps
    x0, y0 = c * block_px, r * block_px
    image = _read_reduced(slide, 1, x0, y0, min(block_px, width - x0), min(block_px, height - y0))
    for step in range(steps + 1):
        writer.cut(image, top - step, (x0 >> step) // TILE, (y0 >> step) // TILE)
        if step < steps:
            image = image.reduce(2)          # odd sides round up, like the Deep Zoom level sizes


_WORKER_SLIDE: SlideImage | None = None     # the slide a worker process opened (see _open_in_worker)


def _open_in_worker(path: str) -> None:
    """Worker process start: open the slide through the reader table, once."""
    global _WORKER_SLIDE
    _WORKER_SLIDE = open_image(path)


def _cut_in_worker(r: int, c: int, folder: Path, top: int, steps: int, width: int, height: int) -> tuple[int, int]:
    """In a worker process: cut one fine block of the slide it opened; (tiles, bytes) written."""
    writer = _TileWriter(folder)
    _cut_fine_block(_WORKER_SLIDE, writer, r, c, top, steps, width, height)
    return writer.n_tiles, writer.n_bytes


def write_pyramid(slide: SlideImage, folder: Path, boxes: np.ndarray,
                  progress: Callable[[int, int], None] | None = None) -> Pyramid:
    """Cut ``slide`` into a Deep Zoom pyramid under ``folder``; fine levels only where ``boxes``
    (level-0 x0, y0, x1, y1 of the predicted tiles) are. ``progress(done, total)`` is called per block."""
    width, height = int(slide.width), int(slide.height)
    top = max_level(width, height)
    steps = min(BLOCK_STEPS, top)
    fine_from = top - steps
    block_px = TILE * 2 ** steps
    blocks = tissue_blocks(width, height, block_px, boxes)
    writer = _TileWriter(folder)
    coarse_blocks = []
    for level in range(fine_from - 1, -1, -1):
        lw, lh = level_size(width, height, level, top)
        coarse_blocks += [(level, x, y, min(block_px, lw - x), min(block_px, lh - y))
                          for y in range(0, lh, block_px) for x in range(0, lw, block_px)]
    fine = [(int(r), int(c)) for r, c in np.argwhere(blocks)]
    total, done = len(fine) + len(coarse_blocks), 0
    n_workers = pyramid_workers(slide, len(fine))
    if n_workers > 1:        # each process opens the slide itself and cuts every n-th block
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_open_in_worker, initargs=(str(slide.path),)) as pool:
            jobs = [pool.submit(_cut_in_worker, r, c, folder, top, steps, width, height) for r, c in fine]
            for job in as_completed(jobs):
                n, size = job.result()
                writer.n_tiles += n
                writer.n_bytes += size
                done += 1
                if progress:
                    progress(done, total)
    else:
        for r, c in fine:
            _cut_fine_block(slide, writer, r, c, top, steps, width, height)
            done += 1
            if progress:
                progress(done, total)
    for level, x, y, w, h in coarse_blocks:
        writer.cut(_read_reduced(slide, 2 ** (top - level), x, y, w, h), level, x // TILE, y // TILE)
        done += 1
        if progress:
            progress(done, total)
    return Pyramid(width, height, top, fine_from, block_px, blocks, writer.n_tiles, writer.n_bytes)
