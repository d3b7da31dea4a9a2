"""Plots of predictions against measured expression: PNG files a person can open.

    plot_pearson_distribution(per_gene, out_png)          histogram + ranked curve of per-gene Pearson r
    plot_scatter(pred, truth, genes, out_png)              predicted vs measured, one panel per gene
    plot_spatial_maps(pred, truth, coords, genes, out_png, thumbnail, thumbnail_scale, ...)
                                                           measured | predicted maps over the slide thumbnail
    make_report_plots(pred_path, truth_path, out_dir)      all of the above from files -> dict of paths

Figures are drawn with matplotlib's object API (``matplotlib.figure.Figure`` rendered by Agg): no
pyplot, no display, no global backend switch.  Each function writes one PNG atomically (temporary
name in the same folder, then rename) and returns its path.  Sizes are fixed by ``figsize * dpi``
(no tight bounding box), so a caller knows the pixel size in advance.

Spatial convention (the importers' one, see embedder/importers/patches.py): a coordinate ``(x, y)``
names full-resolution pixel ``img[y, x]``, whose centre is at continuous position
``(x + 0.5, y + 0.5)``; a thumbnail with ``thumbnail_scale = s`` (thumbnail px per full-res px)
is drawn with thumbnail pixel ``j`` spanning ``[j, j + 1)``, so a spot lies at
``(coords + 0.5) * s`` (:func:`to_thumbnail_xy`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from hexpr.embedder.datasets import TARGET_UNITS, open_dataset
from hexpr.embedder.errors import DataError, MissingInputError
from hexpr.embedder.files import atomic_write, hexpr_version
from hexpr.embedder.gene_names import unknown_gene_message
from hexpr.heads.metrics import N_TOP_DEFAULT, pearson_per_gene
from hexpr.workflow.expression_tables import EvaluationError, align, evaluate_tables, read_expression_table

DPI = 100
SPOT_FILL = 0.8             # drawn spot diameter / nearest-neighbour spot spacing
PANEL_W_IN = 4.6            # spatial map panel (incl. colour bar)
PANEL_H_IN = 4.2
SCATTER_W_IN = 3.3
SCATTER_H_IN = 3.1
MAX_LEGEND_GROUPS = 12
THUMBNAIL_SCALE_KEY = "hexpr_thumbnail_scale"     # PNG text chunk written by the importers


# ----------------------------------------------------------------------------- helpers


def _figure(width_in: float, height_in: float, dpi: int = DPI):
    """A figure with its own Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, out_png: str | Path) -> Path:
    """Render ``fig`` to ``out_png`` atomically (temporary file beside it, then rename)."""
    metadata = {"Software": f"hexpr {hexpr_version()}"}     # PNG text chunk: which hexpr drew it
    return atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=fig.dpi, metadata=metadata))


def figure_pixels(width_in: float, height_in: float, dpi: int = DPI) -> tuple[int, int]:
    """(width, height) in pixels of a PNG written from a figure of that size."""
    return int(round(width_in * dpi)), int(round(height_in * dpi))


def safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "sample"


def group_colours(names: Sequence[str]) -> dict[str, tuple]:
    """A stable colour per group name (tab10 up to 10 groups, tab20 up to 20, then a hue ramp)."""
    from matplotlib import colormaps

    names = list(dict.fromkeys(str(n) for n in names))
    if len(names) <= 10:
        cmap = colormaps["tab10"]
        return {n: cmap(i) for i, n in enumerate(names)}
    if len(names) <= 20:
        cmap = colormaps["tab20"]
        return {n: cmap(i) for i, n in enumerate(names)}
    cmap = colormaps["hsv"]
    return {n: cmap(i / len(names)) for i, n in enumerate(names)}


def to_thumbnail_xy(coords, scale: float | None) -> np.ndarray:
    """Full-resolution pixel coordinates (x=col, y=row) -> continuous thumbnail positions.

    Thumbnail pixel ``j`` spans ``[j, j + 1)``; the pixel that holds spot ``i`` is
    ``floor(to_thumbnail_xy(coords, s)[i])``.  ``scale=None`` means 1 (full-resolution frame).
    """
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    return (xy + 0.5) * (1.0 if scale is None else float(scale))


def spot_spacing(xy: np.ndarray) -> float:
    """Median nearest-neighbour distance between spots (1.0 for fewer than 2 distinct spots)."""
    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    d = d[:, 1]
    d = d[d > 0]
    return float(np.median(d)) if len(d) else 1.0


def read_thumbnail(path: str | Path) -> tuple[np.ndarray, float | None]:
    """(RGB uint8 array, scale from the PNG's ``hexpr_thumbnail_scale`` text chunk or None)."""
    from PIL import Image

    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
        arr = np.asarray(im.convert("RGB"))
    scale = None
    if THUMBNAIL_SCALE_KEY in text:
        try:
            scale = float(text[THUMBNAIL_SCALE_KEY])
        except ValueError:
            scale = None
    return arr, scale


def _robust_range(values: np.ndarray) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return 0.0, 1.0
    lo, hi = np.percentile(v, [1, 99])
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1e-9
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- per-gene Pearson


def plot_pearson_distribution(per_gene: pd.DataFrame, out_png: str | Path, title: str | None = None,
                              n_list: int = 10, dpi: int = DPI) -> Path:
    """Histogram of per-gene Pearson r (all genes, and the top HVGs when ``is_top_hvg`` is given)
    beside the genes ranked by r, with the best genes listed.

    per_gene: DataFrame with ``pearson`` and ``gene`` (or genes as index), optional ``is_top_hvg``
    (as written by workflow.expression_tables.evaluate_tables / ``<pred>.per_gene.csv``).
    """
    if "pearson" not in per_gene.columns:
        raise ValueError(f"per_gene needs a 'pearson' column; found {list(per_gene.columns)[:8]}")
    genes = per_gene["gene"].astype(str).to_numpy() if "gene" in per_gene.columns else per_gene.index.astype(str).to_numpy()
    r = per_gene["pearson"].to_numpy(dtype=np.float64)
    ok = np.isfinite(r)
    genes, r = genes[ok], r[ok]
    if not len(r):
        raise ValueError("per_gene holds no finite Pearson value")
    hvg = per_gene["is_top_hvg"].to_numpy(dtype=bool)[ok] if "is_top_hvg" in per_gene.columns else None
    if hvg is not None and not hvg.any():
        hvg = None

    width, height = 12.0, 4.8
    fig = _figure(width, height, dpi)
    ax_h, ax_r = fig.subplots(1, 2, width_ratios=[1.0, 1.25])
    bins = np.linspace(-1, 1, 41)
    ax_h.hist(r, bins=bins, color="0.6", edgecolor="white", label=f"all genes (n={len(r)}, mean r={r.mean():.3f})")
    ax_h.axvline(r.mean(), color="0.3", ls="--", lw=1.2)
    if hvg is not None:
        ax_h.hist(r[hvg], bins=bins, color="tab:orange", alpha=0.85, edgecolor="white",
                  label=f"top-{int(hvg.sum())} HVG (mean r={r[hvg].mean():.3f})")
        ax_h.axvline(r[hvg].mean(), color="tab:orange", ls="--", lw=1.2)
    n_zero = int((r == 0).sum())
    ax_h.set_xlim(-1, 1)
    ax_h.set_xlabel("Pearson r per gene (predicted vs measured, across spots)")
    ax_h.set_ylabel("number of genes")
    ax_h.set_title("Distribution of per-gene Pearson r" + (f"\n({n_zero} genes at exactly 0: constant)" if n_zero else ""))
    ax_h.legend(loc="upper left", fontsize=9, frameon=False)

    order = np.argsort(-r, kind="stable")
    rank = np.arange(1, len(r) + 1)
    ax_r.plot(rank, r[order], color="0.4", lw=1.5, label="all genes")
    if hvg is not None:
        pos = np.flatnonzero(hvg[order])
        ax_r.scatter(rank[pos], r[order][pos], s=14, color="tab:orange", zorder=3, label="top HVG")
    ax_r.axhline(0, color="0.7", lw=0.8)
    ax_r.set_xlabel("gene rank (best first)")
    ax_r.set_ylabel("Pearson r")
    ax_r.set_ylim(min(-0.05, float(r.min()) - 0.05), max(0.05, float(r.max()) + 0.05))
    if len(r) > 200:
        ax_r.set_xscale("log")
    ax_r.set_title("Genes ranked by Pearson r")
    ax_r.legend(loc="lower left", fontsize=9, frameon=False)
    pool = order[hvg[order]] if hvg is not None else order
    best = pool[:n_list]
    label = "best top-HVG genes" if hvg is not None else "best genes"
    text = label + ":\n" + "\n".join(f"{genes[i]:<12s} {r[i]:+.3f}" for i in best)
    ax_r.text(0.98, 0.97, text, transform=ax_r.transAxes, ha="right", va="top", multialignment="left",
              family="monospace", fontsize=8.5,
              bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.8", alpha=0.9))
    if title:
        fig.suptitle(title, fontsize=13)
    return save_png(fig, out_png)


# ----------------------------------------------------------------------------- scatter


def _check_genes(genes: Sequence[str], frame: pd.DataFrame, name: str) -> list[str]:
    genes = [str(g) for g in genes]
    if not genes:
        raise ValueError("no gene to plot: pass at least one gene name")
    columns = set(frame.columns)
    missing = [g for g in genes if g not in columns]
    if missing:   # a DataError (a ValueError) naming what the user may have meant: HER2 -> ERBB2
        raise DataError(unknown_gene_message("--gene", missing[0], frame.columns, name)
                        + (f" (and {len(missing) - 1} more gene(s) missing: {missing[1:6]})" if len(missing) > 1 else ""))
    return genes


def scatter_layout(n_genes: int, ncols: int = 4) -> tuple[int, int, float, float]:
    """(nrows, ncols, width_in, height_in) of :func:`plot_scatter`'s figure."""
    ncols = max(1, min(ncols, n_genes))
    nrows = math.ceil(n_genes / ncols)
    return nrows, ncols, ncols * SCATTER_W_IN, nrows * SCATTER_H_IN + 0.6


def plot_scatter(pred: pd.DataFrame, truth: pd.DataFrame, genes: Sequence[str], out_png: str | Path,
                 groups: pd.Series | None = None, ncols: int = 4, title: str | None = None, dpi: int = DPI) -> Path:
    """Predicted vs measured per gene (small multiples, Pearson r in each title, dashed y = x).

    pred / truth: DataFrames indexed by spot id, genes as columns; rows are joined by id (every
    truth id must be predicted).  groups: optional Series (index = id) to colour spots by group.
    """
    genes = _check_genes(genes, truth, "truth")
    _check_genes(genes, pred, "predictions")
    p, t = align(pred[genes], truth[genes])
    nrows, ncols, width, height = scatter_layout(len(genes), ncols)
    fig = _figure(width, height, dpi)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    colours = None
    if groups is not None:
        g = groups.reindex(t.index).astype(str).to_numpy()
        names = list(dict.fromkeys(g))
        if len(names) > 1:
            cmap = group_colours(names)
            colours = np.array([cmap[x] for x in g])
    r = pearson_per_gene(p.to_numpy(np.float64), t.to_numpy(np.float64))
    size = float(np.clip(3000 / max(1, len(t)), 2, 25))
    for k, ax in enumerate(axes):
        if k >= len(genes):
            ax.set_visible(False)
            continue
        x, y = t.iloc[:, k].to_numpy(np.float64), p.iloc[:, k].to_numpy(np.float64)
        ax.scatter(x, y, s=size, c=colours if colours is not None else "tab:blue", alpha=0.6, linewidths=0)
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], ls="--", color="0.5", lw=1, label="y = x")
        pad_x = 0.05 * (x.max() - x.min() or 1.0)
        pad_y = 0.05 * (y.max() - y.min() or 1.0)
        ax.set_xlim(x.min() - pad_x, x.max() + pad_x)
        ax.set_ylim(y.min() - pad_y, y.max() + pad_y)
        ax.set_title(f"{genes[k]}   r = {r[k]:.2f}", fontsize=11)
        ax.set_xlabel("measured")
        ax.set_ylabel("predicted")
        ax.tick_params(labelsize=8)
    if colours is not None and len(names) <= MAX_LEGEND_GROUPS:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", ls="", color=cmap[n], label=n) for n in names]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(names), 6), fontsize=9, frameon=False)
    fig.suptitle(title or f"Predicted vs measured expression ({len(t)} spots; dashed: y = x)", fontsize=12)
    return save_png(fig, out_png)


# ----------------------------------------------------------------------------- spatial maps


def draw_spatial_panel(ax, xy: np.ndarray, values: np.ndarray, thumbnail: np.ndarray | None = None,
                       spot_diameter: float | None = None, view: tuple[float, float, float, float] | None = None,
                       cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
                       colorbar: bool = True, cbar_label: str = "expression", title: str | None = None):
    """Spots coloured by ``values`` at display positions ``xy`` (see :func:`to_thumbnail_xy`) over
    ``thumbnail`` drawn with pixel j spanning [j, j+1).  view = (x0, x1, y0, y1) display box.
    Returns the spot collection."""
    from matplotlib.collections import EllipseCollection
    from matplotlib.colors import Normalize

    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    values = np.asarray(values, dtype=np.float64).ravel()
    if len(values) != len(xy):
        raise ValueError(f"{len(values)} values for {len(xy)} spot positions")
    d = spot_diameter if spot_diameter is not None else SPOT_FILL * spot_spacing(xy)
    if view is None:
        view = spatial_view(xy, d)
    x0, x1, y0, y1 = view
    if thumbnail is not None:
        h, w = thumbnail.shape[:2]
        cx0, cy0 = max(0, int(math.floor(x0))), max(0, int(math.floor(y0)))
        cx1, cy1 = min(w, int(math.ceil(x1))), min(h, int(math.ceil(y1)))
        if cx1 > cx0 and cy1 > cy0:   # draw only the visible part (pixel j spans [j, j+1))
            ax.imshow(thumbnail[cy0:cy1, cx0:cx1], extent=(cx0, cx1, cy1, cy0), interpolation="antialiased",
                      zorder=0)
    if vmin is None or vmax is None:
        lo, hi = _robust_range(values)
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    coll = EllipseCollection(np.full(len(xy), d), np.full(len(xy), d), np.zeros(len(xy)), units="xy",
                             offsets=xy, offset_transform=ax.transData, cmap=cmap,
                             norm=Normalize(vmin=vmin, vmax=vmax), edgecolors="none", zorder=2)
    coll.set_array(values)
    ax.add_collection(coll)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)             # image rows grow downwards
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=11)
    if colorbar:
        ax.figure.colorbar(coll, ax=ax, shrink=0.85, label=cbar_label)
    return coll


def spatial_view(xy: np.ndarray, spot_diameter: float) -> tuple[float, float, float, float]:
    """Display box (x0, x1, y0, y1) around the spots with a margin of one spot spacing."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    m = max(spot_diameter / SPOT_FILL, 1.0)
    x0, y0 = xy.min(axis=0) - m
    x1, y1 = xy.max(axis=0) + m
    # square-ish boxes read better; widen the short side up to the long side's half
    cx, cy, wx, wy = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    wx, wy = max(wx, wy / 2), max(wy, wx / 2)
    return cx - wx / 2, cx + wx / 2, cy - wy / 2, cy + wy / 2


def spatial_layout(n_genes: int, with_pred: bool = True) -> tuple[float, float]:
    """(width_in, height_in) of :func:`plot_spatial_maps`'s figure."""
    return (2 if with_pred else 1) * PANEL_W_IN, n_genes * PANEL_H_IN + 0.5


def plot_spatial_maps(pred: pd.DataFrame | None, truth: pd.DataFrame, coords, genes: Sequence[str], out_png: str | Path,
                      thumbnail: np.ndarray | str | Path | None = None, thumbnail_scale: float | None = None,
                      groups: pd.Series | None = None, sample: str | None = None, shared_scale: bool = False,
                      truth_label: str = "measured", pred_label: str = "predicted", title: str | None = None,
                      dpi: int = DPI, unit: str | None = None) -> Path:
    """Measured | predicted spatial maps, one row per gene, over the slide thumbnail.

    truth: DataFrame indexed by spot id.  coords: (N, 2) full-resolution pixel centres (x=col,
    y=row) in ``truth`` row order, or a DataFrame indexed by id with two columns (x, y).
    pred: DataFrame indexed by id (joined by id; None draws the measured maps only).
    thumbnail: RGB array or PNG path (its scale is read from the PNG when thumbnail_scale is
    None); without one the spots are drawn in full-resolution pixel space on white.
    groups / sample: coordinates only make sense within one slide; when ``groups`` holds several
    values, ``sample`` picks the spots of one of them (else ValueError).
    Colour ranges are per panel (1st-99th percentile) unless ``shared_scale`` (the measured range).
    unit: what the values measure, on each colour bar (default: "the truth table's units").
    """
    unit = unit or "the truth table's units"
    genes = _check_genes(genes, truth, "truth")
    if isinstance(coords, pd.DataFrame):
        missing = truth.index.difference(coords.index)
        if len(missing):
            raise ValueError(f"coords lack {len(missing)} spot ids of truth, e.g. {list(missing[:3])}")
        xy_full = coords.loc[truth.index].iloc[:, :2].to_numpy(np.float64)
    else:
        xy_full = np.asarray(coords, dtype=np.float64)
        if xy_full.ndim != 2 or xy_full.shape[1] < 2 or len(xy_full) != len(truth):
            raise ValueError(f"coords must be ({len(truth)}, 2) in truth row order; got shape {xy_full.shape}")
        xy_full = xy_full[:, :2]
    keep = np.ones(len(truth), bool)
    if groups is not None:
        g = groups.reindex(truth.index).astype(str)
        names = list(dict.fromkeys(g))
        if sample is None and len(names) > 1:
            raise ValueError(f"truth spans {len(names)} groups ({names[:5]}); spot coordinates belong to one slide: "
                             "pass sample=<group> (make_report_plots writes one figure per sample)")
        if sample is not None:
            keep = (g == str(sample)).to_numpy()
            if not keep.any():
                raise ValueError(f"no spot of sample {sample!r}; groups are {names[:10]}")
    truth = truth.loc[keep, genes]
    xy_full = xy_full[keep]
    ok = np.isfinite(xy_full).all(axis=1)
    truth, xy_full = truth.loc[ok], xy_full[ok]
    if truth.empty:
        raise ValueError("no spot with finite coordinates to draw")
    if pred is not None:
        _check_genes(genes, pred, "predictions")
        pred, truth = align(pred[genes], truth)

    thumb = None
    if thumbnail is not None:
        if isinstance(thumbnail, (str, Path)):
            thumb, png_scale = read_thumbnail(thumbnail)
            thumbnail_scale = png_scale if thumbnail_scale is None else thumbnail_scale
        else:
            thumb = np.asarray(thumbnail)
        if thumbnail_scale is None:
            raise ValueError("a thumbnail needs thumbnail_scale (thumbnail px per full-resolution px)")
    scale = float(thumbnail_scale) if thumb is not None else 1.0
    xy = to_thumbnail_xy(xy_full, scale)
    d = SPOT_FILL * spot_spacing(xy)
    view = spatial_view(xy, d)

    ncols = 2 if pred is not None else 1
    width, height = spatial_layout(len(genes), pred is not None)
    fig = _figure(width, height, dpi)
    axes = np.asarray(fig.subplots(len(genes), ncols, squeeze=False))
    r = pearson_per_gene(pred.to_numpy(np.float64), truth.to_numpy(np.float64)) if pred is not None and len(truth) > 1 else None
    for k, gene in enumerate(genes):
        tv = truth[gene].to_numpy(np.float64)
        lo, hi = _robust_range(tv)
        draw_spatial_panel(axes[k, 0], xy, tv, thumb, d, view, vmin=lo, vmax=hi,
                           cbar_label=f"{gene} {truth_label} ({unit})", title=f"{gene}: {truth_label}")
        if pred is not None:
            pv = pred[gene].to_numpy(np.float64)
            plo, phi = (lo, hi) if shared_scale else _robust_range(pv)
            rt = f"  (r = {r[k]:.2f})" if r is not None else ""
            draw_spatial_panel(axes[k, 1], xy, pv, thumb, d, view, vmin=plo, vmax=phi,
                               cbar_label=f"{gene} {pred_label} ({unit})", title=f"{gene}: {pred_label}{rt}")
    head = title or (f"{sample + ': ' if sample is not None else ''}{truth_label}"
                     + (f" vs {pred_label}" if pred is not None else "") + f" ({len(truth)} spots)")
    scale_note = "shared colour scale" if shared_scale else "own colour scale per panel (1st-99th percentile)"
    fig.suptitle(f"{head}\n{scale_note}" + ("" if thumb is not None else "; no slide thumbnail"), fontsize=12)
    return save_png(fig, out_png)


# ----------------------------------------------------------------------------- from files


@dataclass
class SpatialSample:
    """Spots of one slide: ids, full-res coordinates, and the slide thumbnail when known."""

    name: str
    ids: list[str]
    coords: np.ndarray
    thumbnail: Path | None = None
    thumbnail_scale: float | None = None


@dataclass
class TruthSource:
    targets: pd.DataFrame
    groups: pd.Series | None
    samples: list[SpatialSample]
    unit: str | None = None       # what the values measure, when the source records it (hexpr import)


def _thumbnail_from_record(record: dict, bases: Sequence[Path]) -> tuple[Path | None, float | None]:
    rel, scale = record.get("thumbnail"), record.get("thumbnail_scale")
    if isinstance(rel, bytes):
        rel = rel.decode()
    if not rel or scale is None:
        return None, None
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        return None, None
    for base in bases:
        p = Path(base) / str(rel)
        if p.is_file():
            return p, scale
    return None, None


def _thumbnail_beside(folder: Path, sample: str) -> tuple[Path | None, float | None]:
    p = folder / "thumbnails" / f"{sample}.png"
    if p.is_file():
        from PIL import Image

        with Image.open(p) as im:
            s = (getattr(im, "text", {}) or {}).get(THUMBNAIL_SCALE_KEY)
        if s is not None:
            return p, float(s)
    return None, None


def _read_h5ad_truth(path: Path) -> TruthSource:
    import anndata

    adata = anndata.read_h5ad(path)
    matrix = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    ids = [str(i) for i in adata.obs_names]
    targets = pd.DataFrame(np.asarray(matrix, np.float64), index=pd.Index(ids, name="ID"),
                           columns=adata.var_names.astype(str))
    groups = pd.Series(adata.obs["group"].astype(str).to_numpy(), index=targets.index, name="group") \
        if "group" in adata.obs.columns else None
    samples: list[SpatialSample] = []
    if "spatial" in adata.obsm:
        coords = np.asarray(adata.obsm["spatial"], np.float64)[:, :2]
        prov = adata.uns.get("hexpr_import", {}) if adata.uns is not None else {}
        prov = dict(prov) if isinstance(prov, dict) else {}
        names = list(dict.fromkeys(groups)) if groups is not None else [str(prov.get("sample_id") or path.stem)]
        for name in names:
            sel = (groups == name).to_numpy() if groups is not None else np.ones(len(ids), bool)
            thumb, scale = (_thumbnail_from_record(prov, [path.parent.parent, path.parent]) if len(names) == 1
                            else (None, None))
            samples.append(SpatialSample(name, [ids[i] for i in np.flatnonzero(sel)], coords[sel], thumb, scale))
    record = adata.uns.get("hexpr_import") if adata.uns is not None else None
    unit = TARGET_UNITS.get(str(record.get("normalization"))) if isinstance(record, dict) else None
    return TruthSource(targets, groups, samples, unit)


def _read_plain_csv(path: Path) -> TruthSource:
    frame = pd.read_csv(path, dtype={"ID": str, "group": str})
    if "ID" not in frame.columns:
        raise ValueError(f"{path}: needs an 'ID' column (found {list(frame.columns)[:5]})")
    frame = frame.set_index("ID")
    groups = frame.pop("group").astype(str) if "group" in frame.columns else None
    xy = frame[["x", "y"]].to_numpy(np.float64) if {"x", "y"} <= set(frame.columns) else None
    frame = frame.drop(columns=[c for c in ("x", "y") if c in frame.columns])
    numeric = frame.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() & frame.notna()
    if bad.to_numpy().any():
        r, c = np.argwhere(bad.to_numpy())[0]
        raise ValueError(f"{path}, line {r + 2}, column {frame.columns[c]!r}: {frame.iat[r, c]!r} is not a number")
    targets = numeric.astype(np.float64)
    samples = _csv_samples(path, list(targets.index), groups, xy)
    return TruthSource(targets, groups, samples)


def _csv_samples(path: Path, ids: list[str], groups: pd.Series | None, xy: np.ndarray | None) -> list[SpatialSample]:
    if xy is None:
        return []
    names = list(dict.fromkeys(groups.astype(str))) if groups is not None else [path.stem]
    out = []
    for name in names:
        sel = (groups.astype(str) == name).to_numpy() if groups is not None else np.ones(len(ids), bool)
        thumb, scale = _thumbnail_beside(path.parent, name)
        out.append(SpatialSample(name, [ids[i] for i in np.flatnonzero(sel)], xy[sel], thumb, scale))
    return out


def load_truth(path: str | Path) -> TruthSource:
    """Expression, groups and per-slide spot coordinates (+ thumbnails) of a truth source.

    Accepts an .h5ad (obsm['spatial'], uns['hexpr_import'] thumbnail), a CSV table (ID, genes,
    optional group / x / y), a challenge CSV dataset or a HEST .h5 / folder (embedder.datasets;
    the thumbnail from the patch file attrs).  Images are not read.
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path} does not exist")
    if path.suffix.lower() == ".h5ad":
        return _read_h5ad_truth(path)
    if path.suffix.lower() == ".csv":
        header = pd.read_csv(path, nrows=0).columns
        if "path" not in header:
            return _read_plain_csv(path)
    dataset = open_dataset(path)
    if dataset.targets is None:
        raise DataError(f"{path} holds no expression values")
    samples: list[SpatialSample] = []
    if dataset.coords is not None:
        rows = getattr(dataset, "rows", None)
        files = getattr(dataset, "patch_files", None)
        if rows is not None and files is not None:      # HEST: one slide per patch file
            import h5py

            for fi, pf in enumerate(files):
                sel = np.flatnonzero(rows[:, 0] == fi)
                if not len(sel):
                    continue
                with h5py.File(pf, "r") as f:
                    attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
                thumb, scale = _thumbnail_from_record(attrs, [pf.parent.parent, pf.parent])
                samples.append(SpatialSample(pf.stem, [dataset.ids[i] for i in sel], dataset.coords[sel], thumb, scale))
        else:
            samples = _csv_samples(path, list(dataset.ids), dataset.groups, dataset.coords)
    return TruthSource(dataset.targets, dataset.groups, samples, dataset.target_unit)


def choose_genes(per_gene: pd.DataFrame, n_genes: int = 4) -> list[str]:
    """Top ``n_genes`` by Pearson among the top HVGs (``is_top_hvg``), else among all genes."""
    frame = per_gene
    if "is_top_hvg" in frame.columns and frame["is_top_hvg"].any():
        frame = frame[frame["is_top_hvg"].astype(bool)]
    frame = frame.sort_values("pearson", ascending=False, kind="stable")
    return [str(g) for g in frame["gene"].head(n_genes)]


def make_report_plots(pred_path: str | Path, truth_path: str | Path, out_dir: str | Path,
                      genes: Sequence[str] | None = None, n_genes: int = 4, n_top: int = N_TOP_DEFAULT,
                      spatial: bool = True, dpi: int = DPI) -> dict:
    """Write the report figures for one prediction table and return their paths.

    pred_path: predictions (CSV ID + genes, or .h5ad).  truth_path: CSV table, dataset (challenge
    CSV, HEST .h5 / folder) or .h5ad.  Rows are joined by id; only ids present in both are used
    (spots of the truth without prediction are left out, and counted in ``notes``).
    genes: genes for the scatter / spatial maps; default the ``n_genes`` best (Pearson) among the
    top-``n_top`` HVG of the truth.  Writes into ``out_dir``:
      pearson_distribution.png, scatter.png, spatial_<sample>.png (one per slide with coordinates).
    Returns {"pearson_distribution": path, "scatter": path, "spatial_maps": {sample: path},
             "genes": [...], "n_spots": int, "n_genes": int, "notes": [...]} (paths as str).
    """
    out_dir = Path(out_dir)
    pred = read_expression_table(pred_path)
    pred.index = pred.index.astype(str)
    source = load_truth(truth_path)
    truth = source.targets
    notes: list[str] = []
    common = truth.index.intersection(pred.index)
    if not len(common):
        raise EvaluationError(f"no spot id is shared by {pred_path} (e.g. {list(pred.index[:3])}) and {truth_path} "
                              f"(e.g. {list(truth.index[:3])}); predictions and truth are joined by id")
    if len(common) < len(truth):
        notes.append(f"{len(truth) - len(common)} of {len(truth)} truth spots have no prediction and are left out")
    truth = truth.loc[common]
    pred_genes = set(pred.columns)
    shared_genes = [g for g in truth.columns if g in pred_genes]
    if not shared_genes:
        raise EvaluationError(f"{pred_path} and {truth_path} share no gene column")
    if len(shared_genes) < truth.shape[1]:
        notes.append(f"{truth.shape[1] - len(shared_genes)} truth genes are not predicted and are left out")
    truth = truth[shared_genes]
    _, per_gene = evaluate_tables(pred, truth, n_top=n_top, pred_name=str(pred_path), truth_name=str(truth_path))
    if genes is None:
        genes = choose_genes(per_gene, n_genes)
    else:
        genes = _check_genes(genes, truth, str(truth_path))
    groups = source.groups.reindex(truth.index) if source.groups is not None else None

    out: dict = {"genes": list(genes), "n_spots": int(len(truth)), "n_genes": int(truth.shape[1])}
    out["pearson_distribution"] = str(plot_pearson_distribution(
        per_gene, out_dir / "pearson_distribution.png", dpi=dpi,
        title=f"{Path(pred_path).name} vs {Path(truth_path).name}: {len(truth)} spots, {truth.shape[1]} genes"))
    use_groups = groups if groups is not None and groups.nunique() <= MAX_LEGEND_GROUPS else None
    out["scatter"] = str(plot_scatter(pred, truth, genes, out_dir / "scatter.png", groups=use_groups, dpi=dpi))
    out["spatial_maps"] = {}
    if spatial:
        if not source.samples:
            notes.append(f"no spot coordinates in {truth_path}: spatial maps skipped")
        common_set = set(truth.index)
        for s in source.samples:
            keep = [i for i, sid in enumerate(s.ids) if sid in common_set]
            if not keep:
                continue
            ids = [s.ids[i] for i in keep]
            coords = pd.DataFrame(s.coords[keep], index=pd.Index(ids))
            thumb = s.thumbnail
            if thumb is None:
                notes.append(f"{s.name}: no slide thumbnail found; spots drawn on white")
            path = plot_spatial_maps(pred, truth.loc[ids], coords, genes, out_dir / f"spatial_{safe_filename(s.name)}.png",
                                     thumbnail=thumb, thumbnail_scale=s.thumbnail_scale, sample=None, dpi=dpi, unit=source.unit,
                                     title=f"{s.name}: measured vs predicted ({len(ids)} spots)")
            out["spatial_maps"][s.name] = str(path)
    out["notes"] = notes
    return out


# ----------------------------------------------------------------------------- whole-slide tile maps

TILE_MAP_W_IN = 6.0
TILE_MAP_H_IN = 5.0


def tile_raster(values: np.ndarray, centres: np.ndarray, cell_px: float) -> tuple[np.ndarray, tuple[float, float]]:
    """Tile values on a regular grid of ``cell_px`` (NaN where no tile) and the level-0 position of
    the raster's top-left corner: cell (r, c) spans ``corner + [c, c+1) * cell_px`` horizontally."""
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    origin = centres.min(axis=0)
    cols = np.rint((centres[:, 0] - origin[0]) / cell_px).astype(int)
    rows = np.rint((centres[:, 1] - origin[1]) / cell_px).astype(int)
    raster = np.full((rows.max() + 1, cols.max() + 1), np.nan)
    raster[rows, cols] = np.asarray(values, dtype=np.float64)
    return raster, (float(origin[0] - cell_px / 2), float(origin[1] - cell_px / 2))


def plot_tile_map(values, centres, cell_px: float, thumbnail: np.ndarray, thumbnail_scale: float,
                  out_png: str | Path, title: str | None = None, cmap: str = "viridis", alpha: float = 0.8,
                  width_in: float = TILE_MAP_W_IN, height_in: float = TILE_MAP_H_IN, dpi: int = DPI,
                  cbar_label: str = "predicted expression") -> Path:
    """A value of each tile as a heatmap over the slide thumbnail (one gene, one PNG); ``cbar_label``
    says what the colours show and in which unit.

    ``centres`` are tile centres in level-0 pixels, ``cell_px`` the tile stride in level-0 pixels,
    ``thumbnail_scale`` thumbnail px per level-0 px. The view is the tiles' bounding box plus a margin.
    """
    from matplotlib.colors import Normalize

    values = np.asarray(values, dtype=np.float64).ravel()
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    if len(values) != len(centres) or not len(values):
        raise ValueError(f"{len(values)} values for {len(centres)} tile centres")
    raster, (left, top) = tile_raster(values, centres, cell_px)
    s = float(thumbnail_scale)
    l, t = left * s, top * s
    r, b = l + raster.shape[1] * cell_px * s, t + raster.shape[0] * cell_px * s
    margin = 2 * cell_px * s
    h, w = thumbnail.shape[:2]
    x0, x1 = max(0.0, l - margin), min(float(w), r + margin)
    y0, y1 = max(0.0, t - margin), min(float(h), b + margin)
    fig = _figure(width_in, height_in, dpi)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(thumbnail, extent=(0, w, h, 0), interpolation="antialiased", zorder=0)
    lo, hi = _robust_range(values)
    im = ax.imshow(np.ma.masked_invalid(raster), extent=(l, r, b, t), cmap=cmap, norm=Normalize(lo, hi),
                   alpha=alpha, interpolation="nearest", zorder=1)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=11)
    fig.colorbar(im, ax=ax, shrink=0.85, label=cbar_label)
    return save_png(fig, out_png)
