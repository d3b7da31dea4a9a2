"""Tile predictions as a SpatialData zarr store (the format scverse whole-slide tools exchange).

Elements, all placed in the ``global`` coordinate system = level-0 slide pixels (x right, y down):
  images/slide   the slide thumbnail as a multiscale (c, y, x) uint8 image; its transformation is a
                 Scale by the thumbnail's reduction factor (thumbnail px -> level-0 px)
  shapes/tiles   one square polygon per tile (its level-0 pixel box), identity transformation
  tables/table   AnnData: X = predicted expression, obs = tile columns (+ gene-set scores),
                 annotating ``tiles`` (region_key 'region', instance_key 'instance_id' = the shape's index)
A model fitted on bags (sub-tiles of larger measured regions) adds the regions' scale:
  shapes/footprints       one square per cell of k x k sub-tiles (k: the model's sub-tiles per
                          observation side), the size of the regions the model learned from
  tables/footprint_table  AnnData annotating ``footprints``: X = the mean of the cell's sub-tile
                          predictions (the model's region-level prediction), obs = row, col,
                          n_subtiles, tissue_fraction; ``table``'s obs column ``footprint`` is the
                          footprint instance each sub-tile belongs to
``spatialdata`` is an optional dependency: ``pip install 'hexpr[spatialdata]'``.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from hexpr.embedder.errors import UsageError

EXTRA = "spatialdata"
IMAGE, SHAPES, TABLE = "slide", "tiles", "table"
FOOTPRINTS, FOOTPRINT_TABLE = "footprints", "footprint_table"
COORDINATE_SYSTEM = "global"
REGION_KEY, INSTANCE_KEY = "region", "instance_id"
MIN_LEVEL_SIDE = 64      # pyramid levels halve until the shorter side would drop below this
CHUNK_PX = 1024


def require_spatialdata() -> None:
    """UsageError naming the extra when spatialdata (or its geopandas/shapely) is not installed."""
    missing = [m for m in ("spatialdata", "geopandas", "shapely") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"the spatialdata output needs {missing[0]!r}, which is not installed: "
                         f"pip install 'hexpr[{EXTRA}]' (or leave spatialdata out of --outputs)")


def _pyramid(height: int, width: int) -> list[int]:
    factors, side = [], min(height, width)
    while side // 2 >= MIN_LEVEL_SIDE:
        factors.append(2)
        side //= 2
    return factors


def _squares(centres: np.ndarray, side_px: float):
    """Square polygons of ``side_px`` around ``centres`` as a parsed SpatialData shapes element."""
    import geopandas
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    half = float(side_px) / 2
    squares = geopandas.GeoDataFrame(
        geometry=shapely.box(centres[:, 0] - half, centres[:, 1] - half, centres[:, 0] + half, centres[:, 1] + half),
        index=pd.Index(np.arange(len(centres)), name=INSTANCE_KEY))
    return ShapesModel.parse(squares, transformations={COORDINATE_SYSTEM: Identity()})


def _table(predictions: pd.DataFrame, centres: np.ndarray, obs: pd.DataFrame | None, region: str, uns=None, layers=None):
    """An AnnData table annotating the shapes element ``region`` row by row (instance = row number)."""
    import anndata
    from spatialdata.models import TableModel

    table_obs = pd.DataFrame(index=predictions.index.astype(str)) if obs is None else \
        obs.reset_index(drop=True).set_axis(predictions.index.astype(str))
    table_obs[REGION_KEY] = pd.Categorical([region] * len(centres))
    table_obs[INSTANCE_KEY] = np.arange(len(centres))
    adata = anndata.AnnData(X=predictions.to_numpy(np.float32), obs=table_obs,
                            var=pd.DataFrame(index=predictions.columns.astype(str)))
    adata.obsm["spatial"] = centres
    adata.uns.update(uns or {})
    for name, values in (layers or {}).items():   # uncertainty: std, lower, upper (tiles x genes)
        adata.layers[name] = np.asarray(values, dtype=np.float32)
    return TableModel.parse(adata, region=region, region_key=REGION_KEY, instance_key=INSTANCE_KEY)


def write_spatialdata(path: str | Path, predictions: pd.DataFrame, centres: np.ndarray, tile_px: float,
                      thumbnail: np.ndarray, thumbnail_scale: float, obs: pd.DataFrame | None = None,
                      uns: dict | None = None, layers: dict | None = None, footprints=None) -> Path:
    """Write the store described in the module docstring to ``path`` (a new ``.zarr`` folder).

    ``centres``: tile centres (x, y) in level-0 px; ``tile_px``: tile side in level-0 px;
    ``thumbnail_scale``: thumbnail px per level-0 px; ``obs``: extra per-tile columns (same row order);
    ``uns``: entries for the table's ``uns`` (e.g. provenance); ``footprints``: a bag model's coarse
    regions, (predictions, centres, side px, obs) with the same genes, written as a second shape layer
    and table (``obs`` must then hold the ``footprint`` column of each tile)."""
    require_spatialdata()
    import spatialdata
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    if len(centres) != len(predictions):
        raise ValueError(f"{len(predictions)} prediction rows for {len(centres)} tile centres")
    shapes = {SHAPES: _squares(centres, tile_px)}
    tables = {TABLE: _table(predictions, centres, obs, SHAPES, uns, layers)}
    if footprints is not None:
        fp_predictions, fp_centres, fp_px, fp_obs = footprints
        fp_centres = np.asarray(fp_centres, dtype=np.float64).reshape(-1, 2)
        shapes[FOOTPRINTS] = _squares(fp_centres, fp_px)
        tables[FOOTPRINT_TABLE] = _table(fp_predictions, fp_centres, fp_obs, FOOTPRINTS, uns)

    per_px = 1.0 / float(thumbnail_scale)       # level-0 px per thumbnail px
    height, width = thumbnail.shape[:2]
    image = Image2DModel.parse(np.moveaxis(np.asarray(thumbnail, np.uint8), -1, 0), dims=("c", "y", "x"),
                               c_coords=["r", "g", "b"], scale_factors=_pyramid(height, width) or None,
                               chunks=(3, CHUNK_PX, CHUNK_PX),
                               transformations={COORDINATE_SYSTEM: Scale([per_px, per_px], axes=("y", "x"))})
    store = spatialdata.SpatialData(images={IMAGE: image}, shapes=shapes, tables=tables)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        store.write(Path(path))
    return Path(path)
