"""Bags at import: observations measured over several patches (``hexpr import --pool-spots K`` / ``--subtile-um S``).

* **Pooling** (``pool_spots = K``): K x K neighbouring spots of a spot grid become one observation.
  Its target is the sum of the members' raw counts (normalised like any spot, library size = the
  members' summed totals over all genes); its patches are the members' own patches. The grid is
  read from the array coordinates the importer keeps (``POOL_GRIDS``: legacy ST ``array_x/array_y``;
  Visium and HEST ``array_row/array_col``, whose hexagonal columns step by 2, so a block spans K
  rows of K spots). Blocks at the tissue edge keep the members they have (1 .. K^2).
* **Sub-tiles** (``subtile_um = S``): each spot's footprint (its diameter, a square of
  ``ceil(d / S)`` x ``ceil(d / S)`` sub-tiles of S µm centred on the spot) is cut into S-µm
  patches; the spot's counts are the target.

Both write the same form: the patch file gets ``bag`` (the observation id of each patch) and the
attribute ``subtile_um``; ``st/<sample>.h5ad`` holds one row per observation. Any source that can
say which patches make an observation (Visium HD bins, Xenium cells) can write it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ImporterError

MIN_SUBTILE_PX = 8          # below this a backbone sees no structure

# array-coordinate columns of a spot grid -> the step of one spot along each (hexagonal Visium: 2 columns)
POOL_GRIDS = (
    (("array_x", "array_y"), (1, 1)),
    (("array_row", "array_col"), (1, 2)),
)


def check_bag_options(pool_spots, subtile_um, output: str) -> None:
    """One clear ImporterError for a bad --pool-spots / --subtile-um, before any work."""
    if pool_spots is not None and (isinstance(pool_spots, bool) or not isinstance(pool_spots, (int, np.integer))
                                   or pool_spots < 1):
        raise ImporterError(f"--pool-spots must be a whole number of spots per side >= 1 (2: 2 x 2 blocks), got {pool_spots!r}")
    if subtile_um is not None and not (isinstance(subtile_um, (int, float)) and subtile_um > 0):
        raise ImporterError(f"--subtile-um must be a positive size in µm, got {subtile_um!r}")
    if pool_spots not in (None, 1) and subtile_um is not None:
        raise ImporterError("--pool-spots and --subtile-um do not combine: pool spots (their patches are the "
                            "sub-tiles) or cut each spot into sub-tiles, not both")
    if (pool_spots not in (None, 1) or subtile_um is not None) and output != "hest":
        raise ImporterError("--pool-spots / --subtile-um write bags, which only the HEST-style output holds; "
                            "drop --output challenge")


def check_subtile_pixels(subtile_um: float, source_um_per_px: float | None, target_um_per_px: float, sid: str) -> None:
    """Sub-tiles must span >= MIN_SUBTILE_PX pixels of the slide and of the written patch."""
    for what, um_per_px in (("the slide's resolution", source_um_per_px), ("the target scale", target_um_per_px)):
        if um_per_px and subtile_um / um_per_px < MIN_SUBTILE_PX:
            raise ImporterError(
                f"{sid}: sub-tiles of {subtile_um:g} µm are {subtile_um / um_per_px:.1f} px at {what} "
                f"({um_per_px:g} µm/px), below the {MIN_SUBTILE_PX} px a backbone can see; "
                f"use --subtile-um >= {MIN_SUBTILE_PX * um_per_px:.3g}")


@dataclass
class SubtileLayout:
    """Sub-tile centres of every spot: ``spot[i]`` is the spot row of patch i, ``offset[i]`` its shift in px."""

    spot: np.ndarray
    offsets: np.ndarray
    suffixes: list[str]
    per_side: int


def subtile_layout(n_spots: int, spot_diameter_um: float | None, subtile_um: float, source_um_per_px: float,
                   sid: str) -> SubtileLayout:
    """``ceil(d / S)`` x ``ceil(d / S)`` sub-tiles of S µm centred on each spot of diameter d."""
    if not spot_diameter_um:
        raise ImporterError(f"{sid}: --subtile-um needs the spot diameter, which this source does not record; "
                            "use --pool-spots or import without sub-tiles")
    per_side = max(1, math.ceil(spot_diameter_um / subtile_um - 1e-9))
    centres = ((np.arange(per_side) + 0.5) * subtile_um - per_side * subtile_um / 2) / source_um_per_px
    grid = [(r, c) for r in range(per_side) for c in range(per_side)]
    offsets = np.array([[centres[c], centres[r]] for r, c in grid])            # (x, y) shift in source px
    return SubtileLayout(spot=np.repeat(np.arange(n_spots), len(grid)), offsets=np.tile(offsets, (n_spots, 1)),
                         suffixes=[f"#r{r}c{c}" for r, c in grid] * n_spots, per_side=per_side)


def pool_labels(obs: pd.DataFrame | None, k: int, sid: str) -> list[str]:
    """The K x K block of the spot grid each spot belongs to, as an observation id."""
    for columns, steps in POOL_GRIDS:
        if obs is not None and all(c in obs.columns for c in columns):
            grid = obs[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
            if not np.isfinite(grid).all():
                raise ImporterError(f"{sid}: some spots lack array coordinates ({', '.join(columns)}); "
                                    "--pool-spots needs every spot on the grid")
            block = np.floor(grid / (k * np.asarray(steps, dtype=np.float64))).astype(np.int64)
            return [f"pool{k}_{a}_{b}" for a, b in block]
    raise ImporterError(f"{sid}: --pool-spots needs the spots' array (grid) coordinates, which this source does not "
                        "record (legacy ST array_x/array_y, Visium or HEST array_row/array_col)")


def observations(labels: list[str], spot_rows: np.ndarray) -> tuple[list[str], sp.csr_matrix]:
    """(observation ids in first-seen order, (n_obs, n_rows) 0/1 matrix: which spot rows each sums).

    A spot row counted by several patches of one observation (its sub-tiles) is summed once."""
    obs_ids = list(dict.fromkeys(labels))
    position = {o: i for i, o in enumerate(obs_ids)}
    pairs = sorted({(position[o], int(r)) for o, r in zip(labels, spot_rows)})
    rows, cols = zip(*pairs)
    n_rows = int(np.max(spot_rows)) + 1
    member = sp.csr_matrix((np.ones(len(pairs), dtype=np.int64), (rows, cols)), shape=(len(obs_ids), n_rows))
    return obs_ids, member
