"""predict-slide: whole H&E slides in, expression maps out (tissue tiles -> .h5ad, QuPath GeoJSON, heatmaps)."""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from hexpr.embedder.cache import DEFAULT_CACHE_DIR
from hexpr.embedder.datasets import DatasetError
from hexpr.embedder.errors import OutputExistsError
from hexpr.embedder.extract import check_embed_options, default_num_workers, resolve_device
from hexpr.embedder.files import atomic_dir
from hexpr.embedder.gene_names import unknown_gene_message
from hexpr.embedder.importers.names import safe_name
from hexpr.embedder.slides import SlideError, find_slides, open_slide, slide_thumbnail
from hexpr.embedder.errors import UsageError
from hexpr.embedder.tiling import TileGrid, tile_dataset, tile_grid, tissue_fraction, tissue_mask
from hexpr.heads.bags import Bags, aggregate
from hexpr.heads.fitting import BAG_SIDE_KEY
from hexpr.heads.uncertainty import DEFAULT_INTERVAL, check_interval, check_model_interval
from hexpr.workflow.options import POSITIVE, SHARE, WHOLE_NON_NEGATIVE, check_option, check_output_folder
from hexpr.workflow.outputs.gene_sets import SCORE_METHOD, read_gene_sets, score_gene_sets
from hexpr.workflow.outputs.slide_maps import Footprints, SlideMap, parse_geojson_genes, parse_outputs, write_slide_outputs
from hexpr.workflow.outputs.viewer import write_run_index
from hexpr.workflow.prediction import load_predictor, model_facts, predict_with_uncertainty, predictor_meta

DEFAULT_TILE_UM = 112.0          # HEST's patch: 224 px at 0.5 µm/px
DEFAULT_TILE_UM_PER_PX = 0.5
DEFAULT_MIN_TISSUE = 0.25
DEFAULT_HEATMAP_GENES = 3
MIN_TILE_SLIDE_PX = 8            # a (sub-)tile must span this many slide pixels
SLIDE_OUTPUTS = ("predictions.h5ad", "tiles.geojson")


def tile_scale(meta: dict, tile_um: float | None = None, tile_um_per_px: float | None = None) -> dict:
    """Tile size in µm and the pixel size it is resampled to: options, else what the model recorded
    at fit time (``feature_meta['patch']``), else 112 µm at 0.5 µm/px (with a warning)."""
    recorded = meta.get("patch") or {}
    if not recorded and (tile_um is None or tile_um_per_px is None):
        warnings.warn(f"the model does not record its training patch size; tiles of "
                      f"{DEFAULT_TILE_UM if tile_um is None else tile_um:g} µm at "
                      f"{DEFAULT_TILE_UM_PER_PX if tile_um_per_px is None else tile_um_per_px:g} µm/px are used (set --tile-um / --tile-um-per-px "
                      "to the patch size the model was trained on)", stacklevel=2)
    check_option("--tile-um", tile_um, POSITIVE, optional=True)
    check_option("--tile-um-per-px", tile_um_per_px, POSITIVE, optional=True)
    um = float(tile_um if tile_um is not None else recorded.get("patch_um") or DEFAULT_TILE_UM)
    mpp = float(tile_um_per_px if tile_um_per_px is not None else recorded.get("um_per_px") or DEFAULT_TILE_UM_PER_PX)
    if um <= 0 or mpp <= 0:
        raise DatasetError(f"tile size {um} µm at {mpp} µm/px: both must be positive")
    px = int(round(um / mpp))
    if px < 8:
        raise DatasetError(f"tiles of {um} µm at {mpp} µm/px are only {px} px; increase --tile-um or lower --tile-um-per-px")
    return {"tile_um": um, "tile_um_per_px": mpp, "tile_px": px,
            "source": "options" if tile_um is not None or tile_um_per_px is not None else ("model" if recorded else "default")}


def resolution_factor(resolution_um: float | None, scale: dict, stride_um: float | None = None) -> int:
    """How many model tiles (sub-tiles) a side of a ``--resolution-um`` cell spans: 1 without it; a
    UsageError unless it is a whole multiple of the model's tile (its sub-tile size, ``scale['tile_um']``)."""
    if resolution_um is None:
        return 1
    check_option("--resolution-um", resolution_um, POSITIVE)
    tile_um = float(scale["tile_um"])
    factor = float(resolution_um) / tile_um
    if abs(factor - round(factor)) > 1e-6 * max(1.0, factor) or round(factor) < 1:
        raise UsageError(f"--resolution-um {resolution_um:g} is not a multiple of the model's sub-tile size {tile_um:g} µm; "
                         f"use {tile_um:g}, {2 * tile_um:g}, {3 * tile_um:g}, ...")
    if stride_um is not None and round(factor) > 1:
        raise UsageError("--resolution-um and --stride-um do not combine: cells of --resolution-um are built from "
                         "the model's sub-tiles side by side; drop --stride-um")
    return int(round(factor))


def coarse_cells(grid: TileGrid, kept: np.ndarray, fraction: np.ndarray, factor: int) -> tuple[TileGrid, Bags, np.ndarray, np.ndarray]:
    """Cells of ``factor`` x ``factor`` sub-tiles of a (stride = tile) ``grid``: (cell grid, bags of the kept
    sub-tiles by cell, each cell's tissue fraction over its whole area, each cell's number of predicted sub-tiles)."""
    cell_rows, cell_cols = grid.rows // factor, grid.cols // factor
    n_cell_cols = -(-grid.n_cols // factor)
    label = cell_rows * n_cell_cols + cell_cols
    cells, index = np.unique(label[kept], return_inverse=True)
    bags = Bags.from_index(index, len(cells))
    position = {c: i for i, c in enumerate(cells)}
    tissue = np.zeros(len(cells))
    for lab, frac in zip(label, fraction):
        if lab in position:
            tissue[position[lab]] += frac / factor ** 2
    rows, cols = cells // n_cell_cols, cells % n_cell_cols
    side = grid.tile_px * factor
    cell_grid = TileGrid(cols * side, rows * side, rows, cols, side, side, -(-grid.n_rows // factor), n_cell_cols)
    return cell_grid, bags, tissue, bags.sizes


def bag_footprints(fitted, grid: TileGrid, kept: np.ndarray, fraction: np.ndarray, frame: pd.DataFrame, outputs,
                   factor: int) -> tuple[Footprints | None, np.ndarray | None]:
    """A bag model's regions on the slide, for SpatialData: (cells of k x k sub-tiles with the mean of
    their predictions, the footprint of each sub-tile when the slide is written at sub-tile resolution),
    or (None, None) for a model fitted on single patches, a k of 1, no spatialdata output, or an
    overlapping grid (--stride-um below the tile)."""
    side = int((getattr(fitted, "extra", None) or {}).get(BAG_SIDE_KEY) or 1)
    if side <= 1 or "spatialdata" not in outputs or not np.isclose(grid.stride_px, grid.tile_px):
        return None, None
    cells, bags, tissue, n_subtiles = coarse_cells(grid, kept, fraction, side)
    names = pd.Index([f"footprint_{i}" for i in range(len(cells))], name=frame.index.name)
    predictions = pd.DataFrame(aggregate(frame.to_numpy(), bags), index=names, columns=frame.columns)
    obs = pd.DataFrame({"row": cells.rows, "col": cells.cols, "n_subtiles": n_subtiles.astype(np.int32),
                        "tissue_fraction": tissue.astype(np.float32)})
    return (Footprints(predictions, cells.centres, float(cells.tile_px), obs),
            bags.index if factor == 1 else None)


def rank_share(items: list, rank: int | None = None, world: int | None = None) -> list:
    """This process's share under torchrun: items[rank::world] (everything when not distributed)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    return list(items)[rank::max(1, world)]


def slide_split(n_slides: int, world: int | None = None) -> str:
    """How torchrun ranks share the work: "slides" (rank r takes every world-th slide) when there are
    at least as many slides as ranks, else "tiles" (every rank embeds its share of each slide's tiles
    into the shared cache; rank 0 writes the outputs)."""
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    return "tiles" if world > 1 and n_slides < world else "slides"


def slide_embed_options(embed_options: dict) -> dict:
    """Slides are read by region and resampled: at least one DataLoader worker reads tiles while the
    model runs (the patch default on CPU is none); an explicit ``num_workers`` is kept."""
    options = dict(embed_options)
    if options.get("num_workers") is None:
        options["num_workers"] = max(1, default_num_workers(resolve_device(options.get("device", "auto"))))
    return options


def predict_tiles(model, slide, centres, ids, scale: dict, *, cache_dir=DEFAULT_CACHE_DIR, progress: bool = True,
                  distributed: bool = False, **embed_options) -> tuple[pd.DataFrame, dict, list[str]]:
    """Predict at square tiles of ``scale['tile_um']`` centred at ``centres`` (level-0 px) of an open
    slide (its ``um_per_px`` set; closed on return) with ``model`` (see ``load_predictor``); a fitted
    head embeds through the cache (resumable). ``distributed``: under torchrun every rank calls this
    for the same tiles and embeds its share of them. Returns (predictions, config, cache files)."""
    frame, _, config, cache_files = predict_tiles_with_uncertainty(model, slide, centres, ids, scale, interval=None,
                                                                   cache_dir=cache_dir, progress=progress,
                                                                   distributed=distributed, **embed_options)
    return frame, config, cache_files


def predict_tiles_with_uncertainty(model, slide, centres, ids, scale: dict, *, interval: float | None = DEFAULT_INTERVAL,
                                   clip: bool = True, cache_dir=DEFAULT_CACHE_DIR, progress: bool = True,
                                   distributed: bool = False,
                                   **embed_options) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], dict, list[str]]:
    """``predict_tiles`` plus the uncertainty layers (``std``, ``lower``, ``upper``) of
    ``workflow.prediction.predict_with_uncertainty``: (predictions, layers, config, cache files)."""
    dataset = tile_dataset(slide.path, slide.um_per_px, centres, ids, scale["tile_um"], scale["tile_px"], slide=slide)
    try:
        return predict_with_uncertainty(model, dataset, interval=interval, clip=clip, cache_dir=cache_dir,
                                        progress=progress, distributed=distributed, **embed_options)
    finally:
        dataset.close()


def _heatmap_genes(frame: pd.DataFrame, genes: list[str] | None, n: int) -> list[str]:
    if genes:
        unknown = [g for g in genes if g not in frame.columns]
        if unknown:
            raise DatasetError(unknown_gene_message("--gene", unknown[0], frame.columns, "the genes this model predicts"))
        return list(dict.fromkeys(genes))
    variance = frame.var(axis=0).fillna(0).sort_values(ascending=False, kind="stable")
    return list(variance.index[:n])


def slide_out_dir(out_dir, slide_path) -> Path:
    return Path(out_dir) / safe_name(Path(slide_path).stem)


def predict_slide(model_path, slides, out_dir, *, um_per_px: float | None = None, force_um_per_px: bool = False,
                  tile_um: float | None = None,
                  tile_um_per_px: float | None = None, stride_um: float | None = None,
                  min_tissue: float = DEFAULT_MIN_TISSUE, genes: list[str] | None = None,
                  n_heatmap_genes: int = DEFAULT_HEATMAP_GENES, cache_dir=DEFAULT_CACHE_DIR, overwrite: bool = False,
                  progress: bool = True, outputs: str | list[str] | None = None, geojson_genes: str | int | None = None,
                  gene_sets=None, interval: float | None = DEFAULT_INTERVAL, clip: bool = True,
                  resolution_um: float | None = None, trust_pickle: bool = False, **embed_options) -> dict:
    """Whole slides in, expression maps out: tissue tiles embedded and predicted with a fitted head
    or a fine-tuned model (see ``load_predictor``).

    ``slides``: slide files and/or folders of them; under torchrun rank r takes every world-th slide,
    or, with fewer slides than ranks, every rank embeds its share of each slide's tiles and rank 0
    writes the outputs (see ``slide_split``). ``um_per_px`` more than 10 % away from the scale the
    slide records is refused unless ``force_um_per_px``.
    A slide that cannot be read or tiled is skipped with a warning and listed in ``report['failed']``
    (the others are still written); when it is the only slide, or every slide fails, its error is raised.
    Writes ``out_dir/<slide>/`` atomically: predictions.h5ad (obsm['spatial'] = tile centres in
    level-0 px), tiles.geojson (QuPath), heatmap_<gene>.png; ``outputs`` chooses among them and
    spatialdata.zarr (see workflow.outputs.slide_maps). ``geojson_genes``: the GeoJSON's measurements,
    a count of the most variable predicted genes (default 50; ``genes`` are always in) or 'all'.
    ``gene_sets``: a .gmt or set,gene CSV; each set's score (workflow.outputs.gene_sets) joins every output.
    A fitted head's predictions are clipped to its training range (unless ``clip`` is False); the
    h5ad and SpatialData tables get layers ``std`` (bagged heads) and ``lower``/``upper`` (conformal
    interval at coverage ``interval``), and each heatmap gene an ``uncertainty_<gene>.png``.
    Tiles are the model's training patch (for a model fitted on bags: its sub-tile). ``resolution_um``
    (a whole multiple of that size) writes cells of that side instead, each the mean of the predictions
    of its sub-tiles (heads.bags.aggregate: exactly the region prediction for linear heads).
    An existing slide folder needs ``overwrite``. ``model_path``: a folder or a Hugging Face id
    (``org/name[@revision]``); ``trust_pickle``: also load an old pickled model (runs the code in it).
    Example::

        >>> report = hexpr.predict_slide("cache/models/ridge_resnet18", ["slide.svs"], "maps",
        ... outputs=["h5ad", "geojson"])
    """
    check_option("--min-tissue", min_tissue, SHARE)
    check_option("--stride-um", stride_um, POSITIVE, optional=True)
    check_option("--um-per-px", um_per_px, POSITIVE, optional=True)
    check_option("--tile-um", tile_um, POSITIVE, optional=True)
    check_option("--tile-um-per-px", tile_um_per_px, POSITIVE, optional=True)
    check_option("n_heatmap_genes", n_heatmap_genes, WHOLE_NON_NEGATIVE)
    check_output_folder("--out", out_dir)
    check_embed_options(**embed_options)
    interval = check_interval(interval)
    writing = {"outputs": parse_outputs(outputs), "n_geojson_genes": parse_geojson_genes(geojson_genes)}
    fitted = load_predictor(model_path, trust_pickle=trust_pickle)
    check_model_interval(fitted, interval)
    writing["gene_sets"] = read_gene_sets(gene_sets, fitted.genes) if gene_sets else {}
    scale = tile_scale(predictor_meta(fitted), tile_um, tile_um_per_px)
    factor = resolution_factor(resolution_um, scale, stride_um)
    if genes:  # an unknown --gene fails before any work
        _heatmap_genes(pd.DataFrame(columns=fitted.genes), genes, 0)
    paths = find_slides([Path(s) for s in slides])
    stems = [slide_out_dir(out_dir, p).name for p in paths]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise DatasetError(f"several slides would write to {Path(out_dir) / clash[0]}: give slides distinct file names")
    split = slide_split(len(paths))
    mine = paths if split == "tiles" else rank_share(paths)
    if not overwrite:
        existing = [slide_out_dir(out_dir, p) for p in mine if slide_out_dir(out_dir, p).exists()]
        if existing:
            raise OutputExistsError(f"{existing[0]} already exists ({len(existing)} slide folder(s) in all); "
                                  "pass --overwrite to replace, or choose another --out")
    report = {"out_dir": str(out_dir), "tile": scale, "resolution_um": scale["tile_um"] * factor, "slides": {}, "failed": {}, "split": split, "helped": {}}
    embed_options = slide_embed_options(embed_options)
    for path in mine:
        try:
            result = _predict_one_slide(
                fitted, model_path, path, slide_out_dir(out_dir, path), scale, um_per_px=um_per_px, stride_um=stride_um,
                min_tissue=min_tissue, genes=genes, n_heatmap_genes=n_heatmap_genes, cache_dir=cache_dir,
                progress=progress, writing=writing, force_um_per_px=force_um_per_px, share_tiles=split == "tiles",
                interval=interval, clip=clip, factor=factor, **embed_options)
            report["helped" if result.get("helper") else "slides"][str(path)] = result
        except (SlideError, DatasetError) as exc:  # this slide's own problem: the others still get their maps
            if len(mine) == 1:
                raise
            warnings.warn(f"skipped {path}: {exc}", stacklevel=2)
            report["failed"][str(path)] = str(exc)
    if "viewer" in writing["outputs"] and report["slides"]:
        index = write_run_index(out_dir)
        report["index"] = str(index) if index else None
    if report["failed"] and not report["slides"]:
        raise SlideError(f"none of the {len(mine)} slides could be predicted; first: {next(iter(report['failed'].values()))}")
    return report


def _predict_one_slide(fitted, model_path, path: Path, final_dir: Path, scale: dict, *, um_per_px, stride_um, min_tissue,
                       genes, n_heatmap_genes, cache_dir, progress, writing: dict, force_um_per_px: bool = False,
                       share_tiles: bool = False, interval=DEFAULT_INTERVAL, clip=True, factor: int = 1,
                       **embed_options) -> dict:
    started = time.perf_counter()
    rank = int(os.environ.get("RANK", 0)) if share_tiles else 0
    if rank and not hasattr(fitted, "feature_meta"):   # a fine-tuned network embeds on the fly: rank 0 alone
        return {"helper": True, "n_tiles": 0}
    slide = open_slide(path, um_per_px, force_um_per_px=force_um_per_px)
    try:
        thumbnail, thumb_scale = slide_thumbnail(slide)
        mask = tissue_mask(thumbnail)
        tile_px = scale["tile_um"] / slide.um_per_px
        if tile_px < MIN_TILE_SLIDE_PX:
            raise DatasetError(f"{path}: tiles of {scale['tile_um']:g} µm are {tile_px:.1f} px at the slide's resolution "
                               f"({slide.um_per_px:g} µm/px), below the {MIN_TILE_SLIDE_PX} px a backbone can see; "
                               "use a model fitted on larger (sub-)tiles or a finer scan")
        stride_px = (stride_um if stride_um else scale["tile_um"]) / slide.um_per_px
        grid = tile_grid(slide.width, slide.height, tile_px, stride_px)
        fraction = tissue_fraction(mask, thumb_scale, grid)
        keep = fraction >= min_tissue
        if not keep.any():
            raise SlideError(f"{path}: no tile has {min_tissue:.0%} tissue ({len(grid)} tiles of {scale['tile_um']:g} µm, "
                             f"tissue found on {mask.mean():.1%} of the thumbnail); lower --min-tissue or check the slide")
        tiles = grid.subset(keep)
        tissue_s = time.perf_counter() - started
        frame, layers, config, cache_files = predict_tiles_with_uncertainty(
            fitted, slide, tiles.centres, tiles.ids(), scale, interval=interval, clip=clip, cache_dir=cache_dir,
            progress=progress, distributed=share_tiles, **embed_options)
        if rank:   # rank 0 writes this slide's outputs from the shared cache
            return {"helper": True, "n_tiles": int(keep.sum())}
        n_subtiles = None
        footprints, footprint_of = bag_footprints(fitted, grid, keep, fraction, frame, writing["outputs"], factor)
        if factor > 1:   # cells of factor x factor sub-tiles: the mean of their predictions
            tiles, bags, cell_fraction, n_subtiles = coarse_cells(grid, keep, fraction, factor)
            ids = tiles.ids()
            frame = pd.DataFrame(aggregate(frame.to_numpy(), bags), index=pd.Index(ids, name=frame.index.name),
                                 columns=frame.columns)
            layers = {name: pd.DataFrame(aggregate(layer.to_numpy(), bags), index=frame.index, columns=frame.columns)
                      for name, layer in layers.items()}
            tile_px, stride_px = tiles.tile_px, tiles.stride_px
            fraction, keep = cell_fraction, np.ones(len(tiles), dtype=bool)
        chosen = _heatmap_genes(frame, genes, n_heatmap_genes)
        obs = pd.DataFrame({"row": tiles.rows, "col": tiles.cols, "tissue_fraction": fraction[keep].astype(np.float32)})
        if n_subtiles is not None:
            obs["n_subtiles"] = n_subtiles.astype(np.int32)
        if footprint_of is not None:
            obs["footprint"] = footprint_of.astype(np.int32)
        provenance = {"model": str(model_path), **model_facts(model_path, fitted), "config": config, "feature_meta": predictor_meta(fitted),
                      "slide": str(Path(path).resolve()), "slide_size_px": [int(slide.width), int(slide.height)],
                      "um_per_px": slide.um_per_px, "um_per_px_source": slide.um_per_px_source,
                      "tile_um": scale["tile_um"], "tile_px_level0": tile_px, "tile_um_per_px": scale["tile_um_per_px"],
                      "tile_patch_px": scale["tile_px"], "tile_size_source": scale["source"],
                      "stride_um": stride_px * slide.um_per_px, "stride_px_level0": stride_px, "min_tissue": min_tissue,
                      "n_grid_tiles": len(grid), "grid_shape": [grid.n_rows, grid.n_cols],
                      "resolution_um": tile_px * slide.um_per_px, "subtile_um": scale["tile_um"],
                      "cells": ("the mean of the predictions of each cell's tissue sub-tiles (n_subtiles)"
                                if factor > 1 else "one model tile each"),
                      "coordinates": "obsm['spatial'] = tile centres (x, y) in level-0 slide pixels",
                      "cache_files": cache_files}
        if writing["gene_sets"]:
            provenance["gene_sets"] = {"method": SCORE_METHOD, "genes": writing["gene_sets"]}
        n_geojson = writing["n_geojson_genes"]
        geojson_genes = None if n_geojson is None else list(dict.fromkeys(_heatmap_genes(frame, None, n_geojson) + (genes or [])))
        slide_map = SlideMap(path.stem, frame, tiles.centres, tile_px, stride_px, thumbnail, thumb_scale, obs, provenance,
                             scores=score_gene_sets(frame, writing["gene_sets"]), heatmap_genes=chosen,
                             geojson_genes=geojson_genes, layers=layers, model=Path(model_path).name,
                             unit=(predictor_meta(fitted) or {}).get("target_unit"), footprints=footprints)
        with atomic_dir(final_dir) as tmp:
            written = write_slide_outputs(slide_map, tmp, writing["outputs"])
        heatmaps = {g: str(final_dir / name) for g, name in written.get("heatmaps", {}).items()
                    if not g.startswith("uncertainty:")}
        uncertainty_maps = {g.split(":", 1)[1]: str(final_dir / name) for g, name in written.get("heatmaps", {}).items()
                            if g.startswith("uncertainty:")}
    finally:
        slide.close()
    seconds = time.perf_counter() - started
    return {"out_dir": str(final_dir), "n_grid_tiles": len(grid), "n_tiles": int(keep.sum()), "n_cells": len(frame),
            "um_per_px": slide.um_per_px, "um_per_px_source": slide.um_per_px_source, "heatmaps": heatmaps,
            "outputs": {name: sorted(files.values()) for name, files in written.items()},
            "uncertainty_maps": uncertainty_maps, "layers": sorted(layers),
            "tissue_seconds": round(tissue_s, 2), "seconds": round(seconds, 1),
            "tiles_per_second": round(int(keep.sum()) / max(seconds, 1e-9), 2)}
