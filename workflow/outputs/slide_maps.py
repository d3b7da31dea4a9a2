"""What predict-slide writes per slide, as one table {output name: writer}.

A ``SlideMap`` holds one slide's tile predictions and geometry; each writer puts one output format
of it into a folder and returns {key: file name} (key: the format, or the gene for heatmaps). A
new output format is one row of ``SLIDE_OUTPUTS`` (plus its writer module in workflow/outputs/).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hexpr.embedder.errors import UsageError
from hexpr.workflow.outputs.anndata import provenance_uns, write_anndata
from hexpr.workflow.outputs.geojson import write_tile_geojson
from hexpr.workflow.outputs.plots import plot_tile_map, safe_filename
from hexpr.workflow.outputs.spatialdata import require_spatialdata, write_spatialdata
from hexpr.workflow.outputs.viewer import VIEWER_DIR, write_viewer

DEFAULT_GEOJSON_GENES = 50          # QuPath measurements per tile: the most variable predicted genes
H5AD_COMPRESSION = "gzip"


@dataclass
class Footprints:
    """The coarse regions a bag model learned from, laid on the slide: cells of k x k sub-tiles (k =
    the model's sub-tiles per observation side) holding the mean of their sub-tiles' predictions,
    i.e. the model's region-level prediction. Level-0 pixels, like ``SlideMap``."""
    predictions: pd.DataFrame          # footprints x genes
    centres: np.ndarray                # (n, 2) footprint centres
    tile_px: float                     # footprint side
    obs: pd.DataFrame                  # row, col, n_subtiles, tissue_fraction


@dataclass
class SlideMap:
    """One slide's tile predictions. Coordinates are level-0 slide pixels (x right, y down)."""
    name: str                          # the slide's stem: scanpy's library_id
    predictions: pd.DataFrame          # tiles x genes
    centres: np.ndarray                # (n, 2) tile centres
    tile_px: float                     # tile side
    stride_px: float                   # tile step (the heatmap raster cell)
    thumbnail: np.ndarray              # (h, w, 3) uint8
    thumbnail_scale: float             # thumbnail px per level-0 px
    obs: pd.DataFrame                  # per-tile columns (row, col, tissue_fraction, ...)
    provenance: dict
    scores: pd.DataFrame = field(default_factory=pd.DataFrame)   # tiles x score_<set>
    heatmap_genes: list[str] = field(default_factory=list)
    geojson_genes: list[str] | None = None                       # None: every gene
    layers: dict[str, pd.DataFrame] = field(default_factory=dict)   # uncertainty: std, lower, upper (tiles x genes)
    model: str = "the model"           # the model's name, in the heatmaps' titles
    unit: str | None = None            # what the predictions measure (the training targets' unit), on colour bars
    footprints: Footprints | None = None   # a bag model's region-level cells (SpatialData's second shape layer)

    def unit_label(self) -> str:
        return self.unit or "training target units"

    def tile_obs(self) -> pd.DataFrame:
        """Per-tile columns plus the gene-set scores, indexed like ``predictions``."""
        obs = self.obs.reset_index(drop=True).set_axis(self.predictions.index.astype(str))
        return pd.concat([obs, self.scores.set_axis(obs.index)], axis=1) if self.scores.shape[1] else obs


def _write_h5ad(m: SlideMap, folder: Path) -> dict[str, str]:
    spatial = {"spatial": {m.name: {
        "images": {"hires": np.asarray(m.thumbnail, np.uint8)},
        "scalefactors": {"tissue_hires_scalef": float(m.thumbnail_scale), "spot_diameter_fullres": float(m.tile_px)}}}}
    write_anndata(folder / "predictions.h5ad", m.predictions, m.centres, None, m.provenance, obs=m.tile_obs(), uns=spatial,
                  layers=m.layers, compression=H5AD_COMPRESSION)
    return {"h5ad": "predictions.h5ad"}


def _write_geojson(m: SlideMap, folder: Path) -> dict[str, str]:
    genes = m.predictions if m.geojson_genes is None else m.predictions[m.geojson_genes]
    measurements = pd.concat([genes, m.scores.set_axis(genes.index)], axis=1) if m.scores.shape[1] else genes
    about = {key: m.provenance[key] for key in ("model_id", "units") if key in m.provenance}
    write_tile_geojson(folder / "tiles.geojson", measurements, m.centres, m.tile_px, about)
    return {"geojson": "tiles.geojson"}


def _write_spatialdata(m: SlideMap, folder: Path) -> dict[str, str]:
    footprints = None if m.footprints is None else (m.footprints.predictions, m.footprints.centres, m.footprints.tile_px,
                                                    m.footprints.obs)
    write_spatialdata(folder / "spatialdata.zarr", m.predictions, m.centres, m.tile_px, m.thumbnail, m.thumbnail_scale,
                      obs=m.tile_obs(), uns={"hexpr": provenance_uns(m.provenance)}, layers=m.layers,
                      footprints=footprints)
    return {"spatialdata": "spatialdata.zarr"}


def _write_viewer(m: SlideMap, folder: Path) -> dict[str, str]:
    write_viewer(m, folder / VIEWER_DIR)
    return {"viewer": f"{VIEWER_DIR}/index.html"}


def uncertainty_map(layers: dict[str, pd.DataFrame], gene: str, interval: float | None = None
                    ) -> tuple[pd.Series, str] | None:
    """(values, what they are) drawn as ``uncertainty_<gene>.png``: the interval width, else the members' std."""
    if "lower" in layers and "upper" in layers:
        coverage = f"{interval:.0%} " if interval else ""
        return layers["upper"][gene] - layers["lower"][gene], f"{coverage}prediction interval width"
    if "std" in layers:
        return layers["std"][gene], "bagged members' std"
    return None


def _write_heatmaps(m: SlideMap, folder: Path) -> dict[str, str]:
    """One PNG a map; each title names the slide, the model and the gene, each colour bar what it shows and its unit."""
    unit = m.unit_label()
    maps = [(g, "heatmap", m.predictions[g], f"predicted {g}", f"predicted {g} ({unit})", "viridis")
            for g in m.heatmap_genes]
    maps += [(s, "heatmap", m.scores[s], f"gene set {s}", f"{s} score (mean z-score of its genes)", "viridis")
             for s in m.scores.columns]
    for g in m.heatmap_genes:
        drawn = uncertainty_map(m.layers, g, ((m.provenance.get("config") or {}).get("uncertainty") or {}).get("interval"))
        if drawn is not None:
            maps.append((f"uncertainty:{g}", "uncertainty", drawn[0], f"uncertainty of {g}: {drawn[1]}",
                         f"{g} {drawn[1]} ({unit})", "magma"))
    return {key: plot_tile_map(values.to_numpy(), m.centres, m.stride_px, m.thumbnail, m.thumbnail_scale,
                               folder / f"{prefix}_{safe_filename(key.split(':', 1)[-1])}.png",
                               title=f"{m.name}: {title}\nmodel {m.model}", cmap=cmap, cbar_label=label).name
            for key, prefix, values, title, label, cmap in maps}


@dataclass(frozen=True)
class SlideOutput:
    write: Callable[[SlideMap, Path], dict[str, str]]
    help: str
    require: Callable[[], None] | None = None     # raises UsageError when an optional dependency is missing


SLIDE_OUTPUTS: dict[str, SlideOutput] = {
    "h5ad": SlideOutput(_write_h5ad, "predictions.h5ad (AnnData; scanpy's uns['spatial'] layout, sc.pl.spatial draws it)"),
    "geojson": SlideOutput(_write_geojson, "tiles.geojson (QuPath objects; --geojson-genes chooses the measurements)"),
    "heatmaps": SlideOutput(_write_heatmaps, "heatmap_<gene>.png, heatmap_score_<set>.png and uncertainty_<gene>.png "
                            "over the thumbnail"),
    "spatialdata": SlideOutput(_write_spatialdata, "spatialdata.zarr (SpatialData: image, tile shapes, table; "
                               "needs pip install 'hexpr[spatialdata]')", require_spatialdata),
    "viewer": SlideOutput(_write_viewer, "viewer/index.html: the slide as a tile pyramid with the maps, opens in a browser "
                          "from disk (no server, no network); hexpr view writes one for maps already written"),
}
DEFAULT_OUTPUTS = ("h5ad", "geojson", "heatmaps")


def parse_outputs(outputs: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Output names from 'h5ad,geojson' or a list of such strings (None: the default); a bad name or a
    missing optional dependency is a UsageError, raised before any work."""
    if outputs is None:
        return DEFAULT_OUTPUTS
    items = [outputs] if isinstance(outputs, str) else list(outputs)
    names = list(dict.fromkeys(n.strip().lower() for item in items for n in item.split(",") if n.strip()))
    if not names:
        raise UsageError(f"--outputs is empty; choose from {', '.join(SLIDE_OUTPUTS)}")
    unknown = [n for n in names if n not in SLIDE_OUTPUTS]
    if unknown:
        raise UsageError(f"--outputs {unknown[0]!r} is not an output; choose from {', '.join(SLIDE_OUTPUTS)}")
    for name in names:
        if SLIDE_OUTPUTS[name].require:
            SLIDE_OUTPUTS[name].require()
    return tuple(names)


def parse_geojson_genes(value: str | int | None) -> int | None:
    """--geojson-genes: a count (the most variable predicted genes) or 'all' (None)."""
    if value is None:
        return DEFAULT_GEOJSON_GENES
    if str(value).strip().lower() == "all":
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        n = -1
    if n < 0:
        raise UsageError(f"--geojson-genes must be a number of genes (0 or more) or 'all', got {value!r}")
    return n


def write_slide_outputs(m: SlideMap, folder: Path, outputs: tuple[str, ...] = DEFAULT_OUTPUTS) -> dict[str, dict[str, str]]:
    """Write each chosen output of ``m`` into ``folder``: {output name: {key: file name}}."""
    return {name: SLIDE_OUTPUTS[name].write(m, Path(folder)) for name in outputs}
