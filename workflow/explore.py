"""Look at a training set before fitting anything: numbers and exploratory figures.

    summarize(targets, groups) -> dict        spots, genes, groups, value ranges, constant genes,
                                              outlier spots, fraction of zeros, raw counts or not
    inspect_dataset(path, out_dir) -> dict    summary.json + embedding.png, gene_stats.png,
                                              heatmap.png, spot_qc.png (+ spatial_qc.png when the
                                              data has spot coordinates)

Works from the expression table only (plus slide thumbnails written by the importers when
present): patch images are never read.  Raw counts are analysed as log1p of counts per 10k
(the importers' default normalisation); other values as they are.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from hexpr.embedder.files import write_json
from hexpr.heads.metrics import top_genes
from hexpr.workflow.options import WHOLE_POSITIVE, check_choice, check_option, check_output_folder
from hexpr.workflow.outputs.plots import (
    DPI,
    SPOT_FILL,
    _figure,
    draw_spatial_panel,
    group_colours,
    load_truth,
    read_thumbnail,
    save_png,
    spatial_view,
    spot_spacing,
    to_thumbnail_xy,
)

Z_THRESHOLD = 3.0            # |robust z| above this flags a spot
MAD_TO_SD = 1.4826           # MAD of a normal distribution -> its standard deviation
N_PCA_GENES = 2000           # most variable genes fed to the 2-D embedding
MAX_GROUPS_NAMED = 20        # legends / labels beyond this many groups are left out
MAX_SPATIAL_SAMPLES = 12
SINGLE_THREAD_BELOW = 2000       # spots; the 2-D embedding runs on one thread below this
_QUANTILES = {"min": 0.0, "q01": 0.01, "q05": 0.05, "q25": 0.25, "median": 0.5, "q75": 0.75, "q95": 0.95,
              "q99": 0.99, "max": 1.0}


# ----------------------------------------------------------------------------- numbers


def _quantiles(values) -> dict:
    v = np.asarray(values, dtype=np.float64).ravel()
    if not len(v):
        return {k: None for k in _QUANTILES}
    q = np.quantile(v, list(_QUANTILES.values()))
    return {k: float(x) for k, x in zip(_QUANTILES, q)}


def value_kind(values: np.ndarray, max_check: int = 2_000_000) -> dict:
    """Guess what the values are: 'raw_counts' (non-negative integers), 'log_normalised'
    (non-negative, non-integer, max <= 20: log1p of normalised counts), 'normalised' (non-negative,
    non-integer, larger values: e.g. counts per million) or 'scaled' (negative values present:
    centred / z-scored).  Returns {"kind", "reason"}."""
    x = np.asarray(values, dtype=np.float64)
    flat = x.ravel()
    if flat.size > max_check:   # a reproducible sample is enough to tell
        flat = flat[np.random.default_rng(0).choice(flat.size, max_check, replace=False)]
    if not flat.size:
        return {"kind": "empty", "reason": "no values"}
    n_neg = int((flat < 0).sum())
    if n_neg:
        return {"kind": "scaled", "reason": f"{n_neg / flat.size:.1%} of values are negative (centred or z-scored?)"}
    integral = bool(np.all(np.abs(flat - np.round(flat)) < 1e-6))
    mx = float(flat.max())
    if integral:
        return {"kind": "raw_counts", "reason": f"all values are non-negative integers (max {mx:g})"}
    if mx <= 20:
        return {"kind": "log_normalised", "reason": f"non-negative, non-integer values with max {mx:.3g} "
                                                    "(the range of log1p of normalised counts)"}
    return {"kind": "normalised", "reason": f"non-negative, non-integer values up to {mx:.3g} (normalised, not log?)"}


def log1p_cp10k(counts: np.ndarray) -> np.ndarray:
    """log1p of counts per 10k (library size = the spot's total over the given genes)."""
    counts = np.asarray(counts, dtype=np.float64)
    lib = counts.sum(axis=1, keepdims=True)
    scale = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p(counts * scale)


def analysis_values(targets: pd.DataFrame, kind: str | None = None) -> tuple[np.ndarray, str]:
    """Values for embeddings / HVGs: log1p cp10k of raw counts, else the values as given."""
    x = targets.to_numpy(np.float64)
    kind = kind or value_kind(x)["kind"]
    if kind == "raw_counts":
        return log1p_cp10k(x), "log1p(counts per 10k)"
    return x, "values as given"


def robust_z(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(z, centre, scale): z = (v - median) / (1.4826 MAD); a zero MAD falls back to the mean
    absolute deviation (x 1.2533); all-equal values give z = 0."""
    v = np.asarray(values, dtype=np.float64)
    med = float(np.median(v))
    scale = MAD_TO_SD * float(np.median(np.abs(v - med)))
    if scale <= 0:
        scale = 1.2533 * float(np.mean(np.abs(v - med)))
    if scale <= 0:
        return np.zeros_like(v), med, 0.0
    return (v - med) / scale, med, scale


def _spot_totals(x: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, str]:
    total = x.sum(axis=1)
    if kind == "raw_counts":
        return total, np.log1p(total), "log1p(library size = total counts per spot)"
    return total, total, "total expression per spot (sum over genes)"


def summarize(targets: pd.DataFrame, groups: pd.Series | None = None, z_threshold: float = Z_THRESHOLD,
              n_top: int = 50, n_list: int = 10) -> dict:
    """Numbers describing an expression table (spots x genes, index = spot ids).

    groups: optional Series (index = ids), e.g. slide / patient.  Outlier spots are those whose
    total (log1p of the library size for raw counts, else the sum of values) is more than
    ``z_threshold`` robust z-scores (median / 1.4826 MAD) from the median of their group (of all
    spots without groups, or in groups of fewer than 5 spots).  Returns a JSON-ready dict.
    """
    return _summarize(targets, groups, z_threshold, n_top, n_list)[0]


def _summarize(targets: pd.DataFrame, groups: pd.Series | None, z_threshold: float, n_top: int,
               n_list: int = 10) -> tuple[dict, np.ndarray]:
    if targets is None or targets.empty:
        raise ValueError("no expression values to summarise (empty table)")
    x = targets.to_numpy(np.float64)
    if not np.isfinite(x).all():
        r, c = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"NaN/inf expression at spot {targets.index[r]!r}, gene {targets.columns[c]!r} "
                         f"({int((~np.isfinite(x)).sum())} cells)")
    n, g = x.shape
    ids = targets.index.astype(str)
    genes = targets.columns.astype(str)
    kind = value_kind(x)
    out: dict = {"n_spots": int(n), "n_genes": int(g)}

    group_arr = None
    if groups is not None:
        group_arr = groups.reindex(targets.index).astype(str).to_numpy()
        counts = pd.Series(group_arr).value_counts(sort=False)
        counts = counts.loc[list(dict.fromkeys(group_arr))]
        out["groups"] = {"n_groups": int(len(counts)), "counts": {str(k): int(v) for k, v in counts.items()},
                         "min_spots": int(counts.min()), "max_spots": int(counts.max())}
    else:
        out["groups"] = None

    zeros = x == 0
    out["values"] = {
        "kind": kind["kind"], "kind_reason": kind["reason"],
        "mean": float(x.mean()), **_quantiles(x),
        "fraction_zeros": float(zeros.mean()),
    }

    # genes
    ptp = x.max(axis=0) - x.min(axis=0)
    tol = 1e-12 * np.maximum(1.0, np.abs(x).max(axis=0))
    const = ptp <= tol
    all_zero = const & (np.abs(x).max(axis=0) == 0)
    out["constant_genes"] = {"n": int(const.sum()), "n_all_zero": int(all_zero.sum()),
                             "names": [str(v) for v in genes[const]]}
    vals, basis = analysis_values(targets, kind["kind"])
    mean, var = vals.mean(axis=0), vals.var(axis=0)
    k = min(n_top, g)
    hvg = top_genes(vals, k, "variance")
    heg = top_genes(vals, k, "sum")
    out["per_gene"] = {
        "basis": basis,
        "mean": _quantiles(mean), "variance": _quantiles(var),
        "fraction_zeros": _quantiles(zeros.mean(axis=0)),
        "n_top": int(k),
        "top_hvg": [str(v) for v in genes[hvg[:n_list]]],
        "top_heg": [str(v) for v in genes[heg[:n_list]]],
    }

    # spots
    total, stat, stat_name = _spot_totals(x, kind["kind"])
    detected = (x > 0).sum(axis=1)
    out["per_spot"] = {"total": _quantiles(total), "genes_detected": _quantiles(detected),
                       "n_all_zero_spots": int((total == 0).sum() if kind["kind"] != "scaled" else 0)}
    z = np.zeros(n)
    within = "all spots"
    centres: dict = {}
    if group_arr is not None and pd.Series(group_arr).value_counts().min() >= 5:
        within = "group"
        for name in dict.fromkeys(group_arr):
            sel = group_arr == name
            z[sel], c, s = robust_z(stat[sel])
            centres[str(name)] = {"median": c, "scale": s}
    else:
        z, c, s = robust_z(stat)
        centres["all"] = {"median": c, "scale": s}
    low, high = z < -z_threshold, z > z_threshold
    flagged = low | high
    order = np.argsort(-np.abs(z[flagged]), kind="stable")
    out["outlier_spots"] = {
        "n": int(flagged.sum()), "n_low": int(low.sum()), "n_high": int(high.sum()),
        "ids": [str(v) for v in ids[flagged][order]],
        "z": [float(v) for v in z[flagged][order]],
        "statistic": stat_name, "z_threshold": float(z_threshold), "within": within, "centre_scale": centres,
    }
    if group_arr is not None:
        per = pd.Series(group_arr[flagged]).value_counts()
        out["outlier_spots"]["by_group"] = {str(k): int(v) for k, v in per.items()}
    return out, z


# ----------------------------------------------------------------------------- figures


def embed_2d(values: np.ndarray, method: str = "pca", seed: int = 0, n_genes: int = N_PCA_GENES) -> tuple[np.ndarray, dict]:
    """2-D map of spots from their expression: PCA (centred, top-variance genes) or t-SNE on PCA-50.

    Below SINGLE_THREAD_BELOW spots this runs on one BLAS / OpenMP thread: it then takes well
    under a second, while several threads on busy shared cores can make it 50x slower.
    """
    if len(values) < SINGLE_THREAD_BELOW:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):
            return _embed_2d(values, method, seed, n_genes)
    return _embed_2d(values, method, seed, n_genes)


def _embed_2d(values: np.ndarray, method: str, seed: int, n_genes: int) -> tuple[np.ndarray, dict]:
    from sklearn.decomposition import PCA

    if method not in ("pca", "tsne"):
        raise ValueError(f"method={method!r}; use 'pca' or 'tsne'")
    n = values.shape[0]
    if n < 3:
        raise ValueError(f"a 2-D map needs at least 3 spots, got {n}")
    var = values.var(axis=0)
    cols = np.argsort(-var, kind="stable")[:min(n_genes, int((var > 0).sum()) or values.shape[1])]
    x = values[:, cols] - values[:, cols].mean(axis=0)
    n_comp = max(2, min(50, n - 1, len(cols)))
    if len(cols) < 2:
        x = np.c_[x, np.zeros((n, 2 - len(cols)))]
        n_comp = 2
    pca = PCA(n_components=n_comp, random_state=seed)
    pcs = pca.fit_transform(x)
    info = {"method": method, "n_genes": int(len(cols)), "explained_variance_ratio": [float(v) for v in pca.explained_variance_ratio_[:2]]}
    if method == "pca":
        return pcs[:, :2], info
    from sklearn.manifold import TSNE

    if n < 5:
        raise ValueError(f"t-SNE needs at least 5 spots, got {n}")
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(pcs)
    info.update(perplexity=perplexity, n_pcs=int(n_comp))
    return emb, info


def plot_embedding(emb: np.ndarray, info: dict, groups: np.ndarray | None, out_png: Path, outliers: np.ndarray | None = None,
                   basis: str = "", dpi: int = DPI) -> Path:
    fig = _figure(8.0, 6.5, dpi)
    ax = fig.subplots()
    size = float(np.clip(4000 / max(1, len(emb)), 3, 40))
    if groups is not None:
        names = list(dict.fromkeys(groups))
        cmap = group_colours(names)
        for name in names:
            sel = groups == name
            ax.scatter(emb[sel, 0], emb[sel, 1], s=size, color=cmap[name], alpha=0.75, linewidths=0,
                       label=f"{name} ({int(sel.sum())})")
        if len(names) <= MAX_GROUPS_NAMED:
            ax.legend(title="group (spots)", fontsize=8, title_fontsize=9, loc="best", markerscale=max(1.0, 20 / size),
                      frameon=True, framealpha=0.8)
    else:
        ax.scatter(emb[:, 0], emb[:, 1], s=size, color="tab:blue", alpha=0.75, linewidths=0)
    if outliers is not None and outliers.any():
        ax.scatter(emb[outliers, 0], emb[outliers, 1], s=size * 3, facecolors="none", edgecolors="red", linewidths=1.2,
                   label="outlier spot")
        if groups is None or len(set(groups)) <= MAX_GROUPS_NAMED:
            ax.legend(fontsize=8, loc="best", frameon=True, framealpha=0.8)
    if info["method"] == "pca":
        ev = info["explained_variance_ratio"]
        ax.set_xlabel(f"PC1 ({ev[0]:.1%} of variance)")
        ax.set_ylabel(f"PC2 ({ev[1]:.1%} of variance)" if len(ev) > 1 else "PC2")
        what = "PCA"
    else:
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        what = f"t-SNE (perplexity {info['perplexity']:.0f}, on {info['n_pcs']} PCs)"
    ax.set_title(f"{what} of spot expression, coloured by group\n{len(emb)} spots, {info['n_genes']} most variable "
                 f"genes, {basis}", fontsize=11)
    return save_png(fig, out_png)


def plot_gene_stats(values: np.ndarray, genes: np.ndarray, hvg: np.ndarray, heg: np.ndarray, out_png: Path,
                    basis: str = "", n_label: int = 10, dpi: int = DPI) -> Path:
    """Histograms of gene means and variances (log10) + mean-variance scatter, top HVG / HEG highlighted."""
    mean, var = values.mean(axis=0), values.var(axis=0)
    fig = _figure(16.0, 5.0, dpi)
    ax_m, ax_v, ax_s = fig.subplots(1, 3, width_ratios=[1, 1, 1.4])
    pos_m, pos_v = mean > 0, var > 0
    for ax, v, pos, what in ((ax_m, mean, pos_m, "mean"), (ax_v, var, pos_v, "variance")):
        if pos.any():
            ax.hist(np.log10(v[pos]), bins=50, color="0.55", edgecolor="white")
        ax.set_xlabel(f"log10 gene {what}")
        ax.set_ylabel("number of genes")
        n0 = int((~pos).sum())
        ax.set_title(f"Gene {what}s ({int(pos.sum())} genes" + (f"; {n0} at 0 not shown)" if n0 else ")"), fontsize=11)
    both = pos_m & pos_v
    ax_s.scatter(mean[both], var[both], s=4, color="0.65", alpha=0.6, linewidths=0, label="all genes", rasterized=True)
    in_hvg = np.zeros(len(mean), bool)
    in_hvg[hvg] = True
    in_heg = np.zeros(len(mean), bool)
    in_heg[heg] = True
    for sel, colour, label in ((in_heg & ~in_hvg & both, "tab:blue", f"top-{len(heg)} HEG (sum)"),
                               (in_hvg & ~in_heg & both, "tab:orange", f"top-{len(hvg)} HVG (variance)"),
                               (in_hvg & in_heg & both, "tab:purple", "in both")):
        if sel.any():
            ax_s.scatter(mean[sel], var[sel], s=18, color=colour, linewidths=0, label=label, zorder=3)
    listed = "most variable (variance):\n" + "\n".join(f"{str(genes[i]):<10s} {var[i]:>9.3g}" for i in hvg[:n_label])
    ax_s.text(0.98, 0.03, listed, transform=ax_s.transAxes, ha="right", va="bottom", multialignment="left",
              family="monospace", fontsize=7.5,
              bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.8", alpha=0.9))
    if both.any():
        ax_s.set_xscale("log")
        ax_s.set_yscale("log")
    ax_s.set_xlabel("gene mean across spots")
    ax_s.set_ylabel("gene variance across spots")
    ax_s.set_title("Mean-variance relation of the genes", fontsize=11)
    ax_s.legend(fontsize=8, loc="upper left", markerscale=1.5)
    fig.suptitle(f"Gene statistics ({basis}; {values.shape[0]} spots)", fontsize=12)
    return save_png(fig, out_png)


def heatmap_layout(n_genes: int) -> tuple[float, float]:
    """(width_in, height_in) of the heatmap figure."""
    return 13.0, max(4.5, 0.17 * n_genes + 2.2)


def plot_heatmap(values: np.ndarray, genes: np.ndarray, gene_idx: np.ndarray, groups: np.ndarray | None,
                 out_png: Path, basis: str = "", dpi: int = DPI) -> Path:
    """Top genes (rows, clustered) x spots (columns, ordered by group), z-scored per gene."""
    from matplotlib.colors import ListedColormap

    gene_idx = np.asarray(gene_idx, dtype=int)
    sub = values[:, gene_idx]
    sd = sub.std(axis=0)
    zmat = np.divide(sub - sub.mean(axis=0), sd, out=np.zeros_like(sub), where=sd > 0)
    zmat = np.clip(zmat, -3, 3)
    n = len(values)
    if groups is not None:
        names = list(dict.fromkeys(groups))
        code = np.array([names.index(v) for v in groups])
        spot_order = np.lexsort((-sub.sum(axis=1), code))
    else:
        names, code = [], None
        spot_order = np.argsort(-sub.sum(axis=1), kind="stable")
    gene_order = np.arange(len(gene_idx))
    if len(gene_idx) >= 3 and (sd > 0).all():
        from scipy.cluster.hierarchy import leaves_list, linkage

        gene_order = leaves_list(linkage(zmat.T, method="average", metric="correlation"))
    mat = zmat[spot_order][:, gene_order].T                         # genes x spots
    width, height = heatmap_layout(len(gene_idx))
    fig = _figure(width, height, dpi)
    if code is not None:
        ax_g, ax_h = fig.subplots(2, 1, height_ratios=[0.5, max(4.0, 0.17 * len(gene_idx))], sharex=True)
        cmap = group_colours(names)
        strip = code[spot_order][None, :]
        ax_g.imshow(strip, aspect="auto", interpolation="nearest",
                    cmap=ListedColormap([cmap[nm] for nm in names]), vmin=-0.5, vmax=len(names) - 0.5,
                    extent=(0, n, 1, 0))
        ax_g.set_yticks([])
        ax_g.set_title(f"Top {len(gene_idx)} most variable genes x {n} spots (spots ordered by group; "
                       f"values z-scored per gene, {basis})", fontsize=11)
        if len(names) <= MAX_GROUPS_NAMED:
            bounds = np.r_[0, np.cumsum([int((code == i).sum()) for i in range(len(names))])]
            for i, nm in enumerate(names):
                if bounds[i + 1] - bounds[i] >= 0.03 * n or len(names) <= 6:
                    ax_g.text((bounds[i] + bounds[i + 1]) / 2, 0.5, nm, ha="center", va="center", fontsize=8,
                              color="white", fontweight="bold", clip_on=True)
            for b in bounds[1:-1]:
                ax_h.axvline(b, color="black", lw=0.8)
    else:
        ax_h = fig.subplots()
        ax_h.set_title(f"Top {len(gene_idx)} most variable genes x {n} spots (no groups; values z-scored per gene, "
                       f"{basis})", fontsize=11)
    im = ax_h.imshow(mat, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-3, vmax=3,
                     extent=(0, n, len(gene_idx), 0))
    ax_h.set_yticks(np.arange(len(gene_idx)) + 0.5)
    ax_h.set_yticklabels([str(genes[gene_idx[i]]) for i in gene_order], fontsize=min(9.0, max(4.0, 420 / len(gene_idx))))
    ax_h.set_xlabel("spots")
    ax_h.set_xticks([])
    fig.colorbar(im, ax=ax_h, shrink=0.6, label="z-score per gene (clipped at ±3)")
    return save_png(fig, out_png)


def plot_spot_qc(summary: dict, stat: np.ndarray, z: np.ndarray, groups: np.ndarray | None, out_png: Path,
                 dpi: int = DPI) -> Path:
    """Per-group distribution of the spot total with the outliers in red, and spots per group."""
    thr = summary["outlier_spots"]["z_threshold"]
    names = list(dict.fromkeys(groups)) if groups is not None else ["all spots"]
    code = np.array([names.index(v) for v in groups]) if groups is not None else np.zeros(len(stat), int)
    fig = _figure(13.0, 5.0, dpi)
    ax_s, ax_b = fig.subplots(1, 2, width_ratios=[2.2, 1])
    rng = np.random.default_rng(0)
    jitter = rng.uniform(-0.3, 0.3, len(stat))
    bad = np.abs(z) > thr
    ax_s.boxplot([stat[code == i] for i in range(len(names))], positions=np.arange(len(names)), widths=0.6,
                 showfliers=False, medianprops=dict(color="black"))
    ax_s.scatter(code[~bad] + jitter[~bad], stat[~bad], s=6, color="0.5", alpha=0.6, linewidths=0, label="spot")
    ax_s.scatter(code[bad] + jitter[bad], stat[bad], s=22, color="red", linewidths=0,
                 label=f"outlier (|robust z| > {thr:g}): {int(bad.sum())}")
    show_names = len(names) <= MAX_GROUPS_NAMED
    ax_s.set_xticks(np.arange(len(names)))
    ax_s.set_xticklabels(names if show_names else [""] * len(names), rotation=45 if len(names) > 6 else 0, ha="right"
                         if len(names) > 6 else "center", fontsize=8)
    ax_s.set_ylabel(summary["outlier_spots"]["statistic"])
    ax_s.set_title(f"Spot totals per group; outliers judged within {summary['outlier_spots']['within']}", fontsize=11)
    ax_s.legend(fontsize=8, loc="best")
    counts = [int((code == i).sum()) for i in range(len(names))]
    ax_b.barh(np.arange(len(names)), counts, color=[group_colours(names)[n] for n in names])
    ax_b.set_yticks(np.arange(len(names)))
    ax_b.set_yticklabels(names if show_names else [""] * len(names), fontsize=8)
    ax_b.invert_yaxis()
    ax_b.set_xlabel("spots")
    ax_b.set_title(f"Spots per group ({len(stat)} in all)", fontsize=11)
    for i, c in enumerate(counts):
        if show_names:
            ax_b.text(c, i, f" {c}", va="center", fontsize=8)
    return save_png(fig, out_png)


def plot_spatial_qc(samples, stat: pd.Series, z: pd.Series, threshold: float, stat_name: str, out_png: Path,
                    dpi: int = DPI) -> Path:
    """One panel per slide: spot total over the thumbnail, outlier spots ringed in red."""
    from matplotlib.collections import EllipseCollection

    ncols = min(4, len(samples))
    nrows = math.ceil(len(samples) / ncols)
    fig = _figure(4.6 * ncols, 4.3 * nrows + 0.5, dpi)
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, s in zip(axes, samples):
        thumb, scale = (None, None)
        if s.thumbnail is not None:
            thumb, png_scale = read_thumbnail(s.thumbnail)
            scale = s.thumbnail_scale if s.thumbnail_scale is not None else png_scale
            if scale is None:
                thumb = None
        xy = to_thumbnail_xy(s.coords, scale if thumb is not None else None)
        d = SPOT_FILL * spot_spacing(xy)
        view = spatial_view(xy, d)
        draw_spatial_panel(ax, xy, stat.loc[s.ids].to_numpy(), thumb, d, view, cmap="magma",
                           cbar_label="log1p(library size)" if stat_name.startswith("log1p") else "total expression",
                           title=f"{s.name} ({len(s.ids)} spots)" + ("" if thumb is not None else ", no thumbnail"))
        bad = np.abs(z.loc[s.ids].to_numpy()) > threshold
        if bad.any():
            ring = EllipseCollection(np.full(bad.sum(), d * 1.5), np.full(bad.sum(), d * 1.5), np.zeros(bad.sum()),
                                     units="xy", offsets=xy[bad], offset_transform=ax.transData, facecolors="none",
                                     edgecolors="red", linewidths=1.5, zorder=3)
            ax.add_collection(ring)
    for ax in axes[len(samples):]:
        ax.set_visible(False)
    fig.suptitle("Spot totals on the slide\noutlier spots ringed in red", fontsize=12)
    return save_png(fig, out_png)


MAP_METHODS = ("pca", "tsne")


def inspect_dataset(path: str | Path, out_dir: str | Path, n_top: int = 50, method: str = "pca",
                    z_threshold: float = Z_THRESHOLD, seed: int = 0, dpi: int = DPI) -> dict:
    """Summary JSON and exploratory PNGs of a dataset's expression (no image is read).

    path: challenge CSV dataset, CSV table (ID, genes, optional group / x / y), HEST .h5 / folder
    or .h5ad.  Writes into out_dir: summary.json, embedding.png (PCA or t-SNE, by group),
    gene_stats.png, heatmap.png (top-``n_top`` HVG), spot_qc.png and, with spot coordinates,
    spatial_qc.png.  Returns {"summary": dict, "files": {name: path}, "notes": [...]}.
    Example::

        >>> summary = hexpr.inspect_dataset("demo/train.csv", "inspect-out")
        >>> sorted(summary)                          # files, notes, summary
    """
    check_choice("--method", method, MAP_METHODS)
    check_option("--n-top", n_top, WHOLE_POSITIVE)
    check_output_folder("--out", out_dir)
    source = load_truth(path)
    targets = source.targets
    targets.index = targets.index.astype(str)
    groups = source.groups.reindex(targets.index).astype(str) if source.groups is not None else None
    out_dir = Path(out_dir)
    summary, z = _summarize(targets, groups, z_threshold, n_top)
    summary["source"] = str(path)
    notes: list[str] = []
    files: dict[str, str] = {}

    vals, basis = analysis_values(targets, summary["values"]["kind"])
    genes = targets.columns.astype(str).to_numpy()
    garr = groups.to_numpy() if groups is not None else None
    k = min(n_top, len(genes))
    hvg = top_genes(vals, k, "variance")
    heg = top_genes(vals, k, "sum")
    nonconst = np.flatnonzero(vals.var(axis=0) > 0)
    hvg_heat = hvg[np.isin(hvg, nonconst)]
    outliers = np.abs(z) > z_threshold

    try:
        emb, info = embed_2d(vals, method, seed)
        summary["embedding"] = info
        files["embedding"] = str(plot_embedding(emb, info, garr, out_dir / "embedding.png", outliers, basis, dpi))
    except ValueError as e:
        notes.append(f"embedding skipped: {e}")
    files["gene_stats"] = str(plot_gene_stats(vals, genes, hvg, heg, out_dir / "gene_stats.png", basis, dpi=dpi))
    if len(hvg_heat):
        files["heatmap"] = str(plot_heatmap(vals, genes, hvg_heat, garr, out_dir / "heatmap.png", basis, dpi))
    else:
        notes.append("heatmap skipped: every gene is constant")
    _, stat, stat_name = _spot_totals(targets.to_numpy(np.float64), summary["values"]["kind"])
    files["spot_qc"] = str(plot_spot_qc(summary, stat, z, garr, out_dir / "spot_qc.png", dpi))
    samples = [s for s in source.samples if s.ids]
    if samples:
        if len(samples) > MAX_SPATIAL_SAMPLES:
            notes.append(f"spatial_qc shows the first {MAX_SPATIAL_SAMPLES} of {len(samples)} slides")
            samples = samples[:MAX_SPATIAL_SAMPLES]
        files["spatial_qc"] = str(plot_spatial_qc(samples, pd.Series(stat, index=targets.index),
                                                  pd.Series(z, index=targets.index), z_threshold, stat_name,
                                                  out_dir / "spatial_qc.png", dpi))
    else:
        notes.append("no spot coordinates: spatial_qc skipped")
    summary["notes"] = notes
    files["summary_json"] = str(write_json(out_dir / "summary.json", summary))
    return {"summary": summary, "files": files, "notes": notes}
