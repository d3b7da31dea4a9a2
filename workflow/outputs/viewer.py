"""The browser viewer: a folder that opens from disk (file://) with no server and no network.

``write_viewer(slide_map, folder)`` writes

* ``index.html`` + ``assets/`` (OpenSeadragon, BSD-3, shipped in this package beside this module in
  ``viewer_assets/``; never loaded from a CDN), the page's script and style;
* ``pyramid/<level>/<col>_<row>.jpg``: the slide as a Deep Zoom pyramid (``workflow.outputs.pyramid``),
  or, without one, ``thumbnail.jpg`` alone with a note on the page;
* ``data/slide.js``: geometry, gene names, colour maps; ``data/genes/<i>.js``: one gene's per-tile
  values (and interval bounds or spread), uint16-quantised per array and base64-encoded, loaded when
  the gene is chosen; ``data/scores.js``: gene-set scores; ``data/top.js``: each tile's top genes.

Browsers refuse fetch()/XHR of file:// URLs, so every data file is a script that hands its payload
to ``hexprData(kind, key, payload)`` (defined by ``assets/viewer.js``), injected with a <script> tag.
It reads the SlideMap like the other writers, never the model.
"""
from __future__ import annotations

import base64
import html
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from hexpr.embedder.errors import DataError
from hexpr.embedder.files import atomic_write, write_json
from hexpr.embedder.slides import SlideError, open_slide
from hexpr.workflow.outputs.pyramid import write_pyramid

ASSETS = Path(__file__).with_name("viewer_assets")
PAGE_ASSETS = ("openseadragon.min.js", "LICENSE-openseadragon.txt", "viewer.js", "viewer.css")
COLOUR_MAPS = ("viridis", "magma", "inferno", "plasma", "cividis", "turbo")
TOP_GENES = 5                 # per tile, shown on hover: the genes most above their slide mean (z-score)
QUANT_MAX = 65534             # uint16 levels of a value; 65535 = missing
GENE_CHUNK = 256              # genes quantised at a time (bounded memory for 14k genes x 100k tiles)
VIEWER_DIR = "viewer"
UNITS = "model output (the training targets' scale)"


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()).decode("ascii")


def quantise(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tiles, k) floats -> (uint16 codes (k, tiles), min (k,), max (k,)); value = min + code * (max - min) / QUANT_MAX,
    code 65535 = NaN. A constant column gets codes 0."""
    a = np.asarray(block, np.float64)
    finite = np.isfinite(a)
    lo = np.where(finite.any(0), np.nanmin(np.where(finite, a, np.inf), axis=0), 0.0)
    hi = np.where(finite.any(0), np.nanmax(np.where(finite, a, -np.inf), axis=0), 0.0)
    span = np.where(hi > lo, hi - lo, 1.0)
    codes = np.rint((np.where(finite, a, lo) - lo) / span * QUANT_MAX).astype(np.uint16)
    codes[~finite] = QUANT_MAX + 1
    return codes.T.copy(), lo, hi


def _packed(codes: np.ndarray, lo: float, hi: float) -> list:
    return [float(lo), float(hi), _b64(codes)]


def _js(kind: str, key, payload) -> str:
    return f"hexprData({json.dumps(kind)}, {json.dumps(key)}, {json.dumps(payload, separators=(',', ':'), allow_nan=False)});\n"


def _write_text(path: Path, text: str) -> int:
    path.write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))


def colour_maps() -> dict[str, str]:
    """256-entry RGB look-up tables as hex strings (matplotlib's maps), the page's colour scales."""
    from matplotlib import colormaps

    lut = {}
    for name in COLOUR_MAPS:
        rgb = (np.asarray(colormaps[name](np.linspace(0, 1, 256)))[:, :3] * 255 + 0.5).astype(np.uint8)
        lut[name] = rgb.tobytes().hex()
    return lut


def tile_cells(m) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each tile on the stride grid: obs' row/col, else from the centres."""
    if {"row", "col"} <= set(m.obs.columns):
        return m.obs["row"].to_numpy(np.int64), m.obs["col"].to_numpy(np.int64)
    first = np.asarray(m.centres, float) - m.tile_px / 2
    return (np.rint(first[:, 1] / m.stride_px).astype(np.int64), np.rint(first[:, 0] / m.stride_px).astype(np.int64))


def _spread_layers(layers: dict[str, pd.DataFrame]) -> tuple[tuple[str, ...], str | None]:
    if "lower" in layers and "upper" in layers:
        return ("lower", "upper"), "interval width"
    if "std" in layers:
        return ("std",), "bagged members' std"
    return (), None


def _write_genes(m, data: Path) -> int:
    """data/genes/<i>.js per gene: {"v": [min, max, b64 codes], "lower"/"upper" or "std": ...}; total bytes."""
    folder = data / "genes"
    folder.mkdir(parents=True)
    kinds, _ = _spread_layers(m.layers)
    total = 0
    genes = list(m.predictions.columns)
    for start in range(0, len(genes), GENE_CHUNK):
        chunk = genes[start:start + GENE_CHUNK]
        packs = {"v": quantise(m.predictions[chunk].to_numpy())}
        for kind in kinds:
            packs[kind] = quantise(m.layers[kind][chunk].to_numpy())
        for j in range(len(chunk)):
            payload = {k: _packed(codes[j], lo[j], hi[j]) for k, (codes, lo, hi) in packs.items()}
            total += _write_text(folder / f"{start + j}.js", _js("gene", start + j, payload))
    return total


def top_genes(predictions: pd.DataFrame, k: int = TOP_GENES, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Each tile's ``k`` genes most above their mean over the slide (z-scores), highest first: (indices, z)."""
    x = predictions.to_numpy()
    k = min(k, x.shape[1])
    mean = np.nanmean(x, axis=0) if len(x) else np.zeros(x.shape[1])
    std = np.nanstd(x, axis=0) if len(x) else np.ones(x.shape[1])
    std = np.where(std > 0, std, np.inf)
    idx = np.empty((len(x), k), np.int64)
    zs = np.empty((len(x), k), np.float32)
    for s in range(0, len(x), chunk):
        z = np.nan_to_num((x[s:s + chunk] - mean) / std, nan=-np.inf)
        part = np.argpartition(-z, k - 1, axis=1)[:, :k] if k < z.shape[1] else np.tile(np.arange(z.shape[1]), (len(z), 1))
        order = np.argsort(-np.take_along_axis(z, part, 1), axis=1, kind="stable")
        idx[s:s + chunk] = np.take_along_axis(part, order, 1)
        zs[s:s + chunk] = np.take_along_axis(z, idx[s:s + chunk], 1)
    return idx, zs


def _slide_path(m) -> Path:
    recorded = m.provenance.get("slide")
    if not recorded:
        raise DataError(f"slide map {m.name!r} does not record its slide file; pass the slide to view it over its pyramid, "
                        "or view it over the thumbnail without a pyramid")
    return Path(str(recorded))


def _write_pyramid(m, folder: Path, progress=None):
    path = _slide_path(m)
    if not path.is_file():
        raise SlideError(f"slide file {path} (recorded in the predictions) is not there; pass --slide with its new place, "
                         f"or --no-pyramid to view the maps over the stored thumbnail")
    boxes = np.c_[np.asarray(m.centres, float) - m.tile_px / 2, np.asarray(m.centres, float) + m.tile_px / 2]
    with open_slide(path, um_per_px=float(m.provenance.get("um_per_px") or 1.0), force_um_per_px=True) as slide:
        return write_pyramid(slide, folder / "pyramid", boxes, progress=progress)


def _thumbnail(m, folder: Path) -> dict:
    thumb = np.asarray(m.thumbnail, np.uint8)
    Image.fromarray(thumb).save(folder / "thumbnail.jpg", quality=85)
    return {"file": "thumbnail.jpg", "width": int(thumb.shape[1]), "height": int(thumb.shape[0]),
            "scale": float(m.thumbnail_scale), "bytes": (folder / "thumbnail.jpg").stat().st_size}


def initial_gene(m) -> str:
    if m.heatmap_genes:
        return m.heatmap_genes[0]
    variance = m.predictions.var(axis=0).fillna(0)
    return str(variance.idxmax()) if len(variance) else str(m.predictions.columns[0])


def write_viewer(m, folder: Path, *, pyramid: bool = True, progress=None) -> dict:
    """Write the viewer of SlideMap ``m`` into ``folder`` (created; see the module doc). ``pyramid=False``
    draws the maps over the thumbnail alone (the page says so). ``progress(done, total)`` is called as
    the pyramid's blocks are cut. Returns sizes in bytes and counts."""
    folder = Path(folder)
    (folder / "assets").mkdir(parents=True)
    for name in PAGE_ASSETS:
        shutil.copyfile(ASSETS / name, folder / "assets" / name)
    shutil.copyfile(ASSETS / "index.html", folder / "index.html")
    data = folder / "data"
    data.mkdir()
    thumb = _thumbnail(m, folder)
    pyr = _write_pyramid(m, folder, progress) if pyramid else None
    rows, cols = tile_cells(m)
    n_rows = int(m.provenance.get("grid_shape", [0, 0])[0] or 0) or int(rows.max(initial=-1) + 1)
    n_cols = int(m.provenance.get("grid_shape", [0, 0])[1] or 0) or int(cols.max(initial=-1) + 1)
    n_rows, n_cols = max(n_rows, int(rows.max(initial=-1) + 1)), max(n_cols, int(cols.max(initial=-1) + 1))
    _, spread = _spread_layers(m.layers)
    uncertainty = (m.provenance.get("config") or {}).get("uncertainty") or {}
    genes = [str(g) for g in m.predictions.columns]
    size = m.provenance.get("slide_size_px") or [int(round(m.thumbnail.shape[1] / m.thumbnail_scale)),
                                                 int(round(m.thumbnail.shape[0] / m.thumbnail_scale))]
    um = m.provenance.get("um_per_px")
    note = None if pyr is not None else ("No tile pyramid was written for this slide: the maps are drawn over its "
                                         f"thumbnail ({1 / m.thumbnail_scale:.3g} slide px per screen px at full zoom).")
    meta = {
        "name": m.name, "width": int(size[0]), "height": int(size[1]), "um_per_px": float(um) if um else None,
        "tile_px": float(m.tile_px), "stride_px": float(m.stride_px), "n_rows": n_rows, "n_cols": n_cols,
        "n_tiles": int(len(m.predictions)), "cells": _b64((rows * n_cols + cols).astype(np.int32)),
        "genes": genes, "initial_gene": genes.index(initial_gene(m)) if genes else None, "units": UNITS,
        "spread": spread, "interval": uncertainty.get("interval") if spread == "interval width" else None,
        "scores": [str(s) for s in m.scores.columns], "colour_maps": colour_maps(),
        "pyramid": pyr.describe() if pyr is not None else None, "thumbnail": thumb, "note": note,
    }
    sizes = {"slide_js": _write_text(data / "slide.js", _js("slide", None, meta))}
    sizes["genes_js"] = _write_genes(m, data)
    if m.scores.shape[1]:
        codes, lo, hi = quantise(m.scores.to_numpy())
        sizes["scores_js"] = _write_text(data / "scores.js", _js("scores", None, {
            s: _packed(codes[j], lo[j], hi[j]) for j, s in enumerate(meta["scores"])}))
    idx, z = top_genes(m.predictions)
    sizes["top_js"] = _write_text(data / "top.js", _js("top", None, {
        "k": int(idx.shape[1]), "genes": _b64(idx.astype(np.uint32)), "z": _b64(z.astype(np.float32))}))
    report = {"index": "index.html", "slide": str(m.provenance.get("slide", "")), "n_genes": len(genes),
              "n_tiles": meta["n_tiles"], "pyramid": pyr is not None, "pyramid_tiles": pyr.n_tiles if pyr else 0,
              "pyramid_bytes": pyr.n_bytes if pyr else 0, "thumbnail_bytes": thumb["bytes"],
              "gene_bytes_each": round(sizes["genes_js"] / max(1, len(genes)), 1), **sizes}
    write_json(folder / "viewer.json", report)
    return report


def write_run_index(out_dir: Path, min_slides: int = 2) -> Path | None:
    """``out_dir/index.html``: a thumbnail and a link per slide folder of ``out_dir`` holding a viewer,
    when there are at least ``min_slides`` of them (else nothing, and None)."""
    out_dir = Path(out_dir)
    slides = sorted(p.parent.parent for p in out_dir.glob(f"*/{VIEWER_DIR}/index.html"))
    if len(slides) < min_slides:
        return None
    cards = []
    for s in slides:
        name = html.escape(s.name)
        link = html.escape(f"{s.name}/{VIEWER_DIR}/index.html", quote=True)
        thumb = html.escape(f"{s.name}/{VIEWER_DIR}/thumbnail.jpg", quote=True)
        cards.append(f'<a class="card" href="{link}"><img src="{thumb}" alt="{name}"><span>{name}</span></a>')
    page = INDEX_PAGE.replace("{title}", html.escape(out_dir.resolve().name)).replace("{cards}", "\n".join(cards))
    return atomic_write(out_dir / "index.html", lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


INDEX_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hexpr maps: {title}</title>
<style>
body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}
.grid{display:flex;flex-wrap:wrap;gap:16px}
.card{display:flex;flex-direction:column;align-items:center;width:260px;padding:8px;background:#fff;border:1px solid #ddd;
border-radius:6px;text-decoration:none;color:#222}
.card img{max-width:240px;max-height:240px}
.card span{margin-top:6px;font-weight:600}
</style></head>
<body><h1>Predicted expression: {title}</h1><p>One viewer per slide; click a slide to open it.</p>
<div class="grid">
{cards}
</div></body></html>
"""
