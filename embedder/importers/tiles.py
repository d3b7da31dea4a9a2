"""Pooling bins or cells into square tiles: raw counts summed per tile, sparse, chunk by chunk.

A tile is a cell ``(tile_row, tile_col)`` of a square grid laid over the platform's own frame (the
Visium HD bin array, the Xenium µm frame).  Every observation (bin or cell) belongs to the tile its
centre falls in; a tile's counts are the sum of its members' counts.  Tiles whose total count is
below ``min_counts`` are dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

DEFAULT_MIN_TILE_COUNTS = 10        # a tile needs this many counts (all genes) to be kept
_MERGE_NNZ = 20_000_000             # pending partial sums merged once they hold this many values


@dataclass
class TileGrid:
    """Which tile each observation falls in: ``key`` (n,) indexes ``rows`` / ``cols`` (n_tiles,)."""

    key: np.ndarray
    rows: np.ndarray
    cols: np.ndarray

    @classmethod
    def from_indices(cls, tile_row: np.ndarray, tile_col: np.ndarray) -> "TileGrid":
        rc = np.c_[np.asarray(tile_row, np.int64), np.asarray(tile_col, np.int64)]
        uniq, key = np.unique(rc, axis=0, return_inverse=True)
        return cls(key.ravel().astype(np.int64), uniq[:, 0], uniq[:, 1])

    @property
    def n_tiles(self) -> int:
        return len(self.rows)

    def members(self) -> np.ndarray:
        """Number of observations in each tile."""
        return np.bincount(self.key, minlength=self.n_tiles)

    def centres(self, obs_xy: np.ndarray, obs_frame: np.ndarray, tile_frame: np.ndarray,
                frame_to_xy: np.ndarray) -> np.ndarray:
        """Tile centres in image pixels: each tile's members' mean pixel position, moved by the linear
        map ``frame_to_xy`` (2x2) from the members' mean frame position to the tile's centre in the
        frame.  Exact for an affine frame -> pixel map, local (so robust) for a nearly affine one."""
        n = np.bincount(self.key, minlength=self.n_tiles).astype(np.float64)[:, None]
        mean_xy = np.c_[np.bincount(self.key, obs_xy[:, 0], self.n_tiles),
                        np.bincount(self.key, obs_xy[:, 1], self.n_tiles)] / n
        mean_frame = np.c_[np.bincount(self.key, obs_frame[:, 0], self.n_tiles),
                           np.bincount(self.key, obs_frame[:, 1], self.n_tiles)] / n
        return mean_xy + (tile_frame - mean_frame) @ np.asarray(frame_to_xy, np.float64).T


class TileSums:
    """Sum rows of count chunks into tiles: ``add(chunk, keys)`` then ``result()`` (tiles x genes CSR)."""

    def __init__(self, n_tiles: int, n_genes: int):
        self.shape = (n_tiles, n_genes)
        self.total: sp.csr_matrix = sp.csr_matrix(self.shape, dtype=np.int64)   # int64: no overflow in sums
        self.pending: list[sp.csr_matrix] = []
        self.pending_nnz = 0

    def add(self, counts: sp.csr_matrix, keys: np.ndarray) -> None:
        """Add each row of ``counts`` to the tile ``keys[row]`` (rows with key < 0 are skipped)."""
        keys = np.asarray(keys, np.int64)
        ok = np.flatnonzero(keys >= 0)
        if not len(ok):
            return
        pool = sp.csr_matrix((np.ones(len(ok), counts.dtype), (keys[ok], ok)), shape=(self.shape[0], counts.shape[0]))
        part = (pool @ counts).tocsr()
        part.sum_duplicates()           # canonical (sorted, unique indices): fast CSR additions below
        self.pending.append(part)
        self.pending_nnz += part.nnz
        if self.pending_nnz > max(_MERGE_NNZ, self.total.nnz):
            self._merge()

    def _merge(self) -> None:
        """Add the pending parts to the running total pairwise (a tree of CSR additions)."""
        parts = [self.total, *self.pending]
        self.pending, self.pending_nnz = [], 0
        while len(parts) > 1:
            parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
        self.total = parts[0]

    def result(self) -> sp.csr_matrix:
        self._merge()
        out = self.total.tocsr()
        out.sum_duplicates()
        out.eliminate_zeros()
        mx = out.data.max() if out.nnz else 0
        return out.astype(np.int32) if mx < 2**31 else out


def counts_summary(totals: np.ndarray) -> dict:
    """Min / median / mean / max of per-tile total counts (for the import report)."""
    t = np.asarray(totals, np.float64)
    if not len(t):
        return {"n": 0}
    return {"n": int(len(t)), "min": float(t.min()), "median": float(np.median(t)), "mean": float(t.mean()),
            "max": float(t.max())}


def tile_ids(prefix: str, rows: np.ndarray, cols: np.ndarray) -> list[str]:
    """Readable, sortable tile ids: ``<prefix>_r<row>_c<col>``."""
    w = max(4, len(str(int(max(np.max(rows, initial=0), np.max(cols, initial=0))))))
    return [f"{prefix}_r{int(r):0{w}d}_c{int(c):0{w}d}" for r, c in zip(rows, cols)]
