"""Size and write time of each predict-slide output on the shared her2st C3 image, for a model on
every gene.

A ridge head on MobileNetV2 (64 px tiles of 112 µm) is fitted on sections C2 + C4 with all their
genes (not timed); `predict_slide` maps C3 with every output (h5ad, geojson, heatmaps, spatialdata).
Then each writer is timed on its own on that slide's tiles, the GeoJSON both with the default
measurements (the 50 most variable predicted genes) and with every gene.

    python -m benchmarks.slide_outputs

Prints a table and writes JSON (default benchmarks/results/slide_outputs.json).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks._common import HER2ST, MOBILENET_SPEC

UM_PER_PX = 0.69       # her2st: derived from the 200 µm spot grid (see the data's README)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", default="C3")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "slide_outputs.json")
    args = parser.parse_args()
    import anndata as ad
    import pandas as pd
    import torch

    from hexpr.embedder.backbones import parse_backbone
    from hexpr.embedder.importers import import_dataset
    from hexpr.workflow import fit_head, predict_slide
    from hexpr.workflow.outputs.slide_maps import DEFAULT_GEOJSON_GENES, SLIDE_OUTPUTS, SlideMap

    if not HER2ST.is_dir():
        raise SystemExit(f"{HER2ST} not found: this benchmark needs the shared her2st data")
    warnings.simplefilter("ignore")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    work = Path(tempfile.mkdtemp(prefix="slide-outputs-bench-"))
    image = next((HER2ST / "ST-imgs" / args.section).glob("*.jpg"))
    spec = parse_backbone(MOBILENET_SPEC + ",size=64")
    import_dataset(HER2ST, work / "train", sample_ids=["C2", "C4"], target_um_per_px=112.0 / 64, progress=False)
    opts = {"cache_dir": work / "cache", "progress": False, "precision": "fp32"}
    fit_head(work / "train", [spec], head="ridge", folds=2, out_dir=work / "model", n_jobs=1, **opts)
    t = time.perf_counter()
    predict_slide(work / "model", [image], work / "maps", um_per_px=UM_PER_PX, outputs=list(SLIDE_OUTPUTS), **opts)
    total = time.perf_counter() - t

    a = ad.read_h5ad(work / "maps" / image.stem / "predictions.h5ad")
    meta, spatial = a.uns["hexpr"], next(iter(a.uns["spatial"].values()))
    frame = a.to_df()
    top = list(frame.var().sort_values(ascending=False, kind="stable").index[:DEFAULT_GEOJSON_GENES])
    m = SlideMap(image.stem, frame, a.obsm["spatial"], float(meta["tile_px_level0"]), float(meta["stride_px_level0"]),
                 spatial["images"]["hires"], float(spatial["scalefactors"]["tissue_hires_scalef"]),
                 a.obs[["row", "col", "tissue_fraction"]], dict(meta), scores=pd.DataFrame(), heatmap_genes=top[:3])
    rows = {}
    for label, output, geojson_genes in (("h5ad", "h5ad", None), ("geojson (default: 50 genes)", "geojson", top),
                                         ("geojson (all genes)", "geojson", None), ("heatmaps (3 genes)", "heatmaps", None),
                                         ("spatialdata", "spatialdata", None)):
        m.geojson_genes = geojson_genes
        folder = work / "timed" / label.split()[0] / str(len(rows))
        folder.mkdir(parents=True)
        t = time.perf_counter()
        files = SLIDE_OUTPUTS[output].write(m, folder)
        seconds = time.perf_counter() - t
        size = sum(_size(folder / name) for name in files.values())
        rows[label] = {"seconds": round(seconds, 2), "bytes": size, "bytes_per_tile": round(size / a.n_obs)}
    print(f"\nher2st {args.section}: {a.n_obs} tiles x {a.n_vars} genes; predict_slide with every output {total:.1f} s")
    print(f"{'output':<30} {'seconds':>8} {'MB':>8} {'KB/tile':>8}")
    for label, r in rows.items():
        print(f"{label:<30} {r['seconds']:>8.2f} {r['bytes'] / 1e6:>8.2f} {r['bytes_per_tile'] / 1e3:>8.2f}")
    result = {"section": args.section, "image": str(image), "n_tiles": a.n_obs, "n_genes": a.n_vars,
              "predict_slide_seconds_all_outputs": round(total, 1), "cpus": os.cpu_count(), "outputs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
