"""Whole-slide prediction throughput on the shared her2st C3 image (tiles per second by stage).

Stages, each timed on its own, in tissue tiles per second:
  * tissue: open the slide, thumbnail, tissue mask (saturation + Otsu + morphology), tile grid and
    tissue fraction per tile;
  * read:   cut every tissue tile from the slide and resample it to the model's patch size
            (a JPEG is decoded once, by the thumbnail: that time is in "tissue");
  * model:  the frozen backbone on the read tiles (resize, normalise, forward), no cache;
  * total:  `predict_slide` end to end with an empty embedding cache (tissue, read + embed through
            the DataLoader and cache, head, .h5ad + GeoJSON + heatmaps written).
The head is a ridge on the top-50 HVG fitted on sections C2 + C4 (not timed).

    python -m benchmarks.predict_slide                 # MobileNetV2 (ImageNet), 224 px tiles of 112 µm
    python -m benchmarks.predict_slide --patch-px 64   # faster, coarser

Prints a table and writes JSON (default benchmarks/results/predict_slide.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import HER2ST, MOBILENET_SPEC, peak_memory_mib
from hexpr.embedder.backbones import create_backbone, parse_backbone
from hexpr.embedder.extract import _forward, resolve_precision
from hexpr.embedder.importers import import_dataset
from hexpr.embedder.slides import open_slide, read_square, slide_thumbnail
from hexpr.embedder.tiling import tile_grid, tissue_fraction, tissue_mask
from hexpr.workflow import fit_head, predict_slide

UM_PER_PX = 0.69       # her2st: derived from the 200 µm spot grid (see the data's README)
TILE_UM = 112.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch-px", type=int, default=224, help="tile size given to the model (112 µm / this = µm/px)")
    parser.add_argument("--backbone", default=MOBILENET_SPEC)
    parser.add_argument("--precision", default="fp32", help="fp32 | bf16 | auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--section", default="C3")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all CPUs)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "predict_slide.json")
    parser.add_argument("--picture", type=Path, default=None,
                        help="also draw two genes' maps side by side into this PNG (the README's picture)")
    parser.add_argument("--picture-genes", default="CD24,IGHG1")
    args = parser.parse_args()
    if not HER2ST.is_dir():
        sys.exit(f"{HER2ST} not found: this benchmark needs the shared her2st data")
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    work = Path(tempfile.mkdtemp(prefix="predict-slide-bench-"))
    image = next((HER2ST / "ST-imgs" / args.section).glob("*.jpg"))
    spec = parse_backbone(args.backbone)
    rows = {}

    t = time.perf_counter()
    with open_slide(image, UM_PER_PX) as slide:
        thumbnail, scale = slide_thumbnail(slide)
        mask = tissue_mask(thumbnail)
        grid = tile_grid(slide.width, slide.height, TILE_UM / UM_PER_PX)
        keep = tissue_fraction(mask, scale, grid) >= 0.25
        tiles = grid.subset(keep)
        rows["tissue"] = time.perf_counter() - t

        t = time.perf_counter()
        patches = [read_square(slide, cx, cy, grid.tile_px, args.patch_px)[0] for cx, cy in tiles.centres]
        rows["read"] = time.perf_counter() - t

    device = torch.device("cpu")
    backbone = create_backbone(spec, device)
    dtype = resolve_precision(args.precision, device)
    t = time.perf_counter()
    for start in range(0, len(patches), args.batch_size):
        batch = torch.stack([backbone.preprocess.resize_uint8(np.array(p)) for p in patches[start:start + args.batch_size]])
        _forward(backbone, batch, device, False, dtype)
    rows["model"] = time.perf_counter() - t

    target = TILE_UM / args.patch_px
    import_dataset(HER2ST, work / "train", sample_ids=["C2", "C4"], target_um_per_px=target, progress=False)
    opts = dict(cache_dir=work / "cache", progress=False, precision=args.precision, batch_size=args.batch_size)
    fit_head(work / "train", [spec], head="ridge", genes="hvg:50", folds=2, out_dir=work / "model", n_jobs=1, **opts)
    t = time.perf_counter()
    report = predict_slide(work / "model", [image], work / "maps", um_per_px=UM_PER_PX, **opts)
    rows["total"] = time.perf_counter() - t
    n = int(keep.sum())
    assert report["slides"][str(image)]["n_tiles"] == n

    print(f"\nher2st {args.section}: {image.name}, {n} tissue tiles of {len(grid)} grid tiles ({TILE_UM:g} µm at "
          f"{UM_PER_PX} µm/px, {args.patch_px} px for {spec.label}, {args.precision}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads)")
    print(f"{'stage':<8} {'seconds':>8} {'tiles/s':>8}")
    for stage, seconds in rows.items():
        print(f"{stage:<8} {seconds:>8.1f} {n / seconds:>8.1f}")
    result = {"section": args.section, "image": str(image), "um_per_px": UM_PER_PX, "tile_um": TILE_UM,
              "patch_px": args.patch_px, "backbone": spec.label, "precision": args.precision,
              "batch_size": args.batch_size, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "n_grid_tiles": len(grid), "n_tissue_tiles": n,
              "seconds": {k: round(v, 2) for k, v in rows.items()},
              "tiles_per_second": {k: round(n / v, 1) for k, v in rows.items()}, "peak_memory_mib": peak_memory_mib()}
    if args.picture:
        draw_picture(work / "maps" / image.stem, args.picture, args.picture_genes.split(","))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"peak memory {result['peak_memory_mib']} MiB; wrote {args.out}")


def draw_picture(maps: Path, out_png: Path, genes: list[str]) -> None:
    """Maps of ``genes`` over the thumbnail, side by side, as a small palette PNG."""
    import anndata as ad
    from PIL import Image

    from hexpr.workflow.outputs.plots import plot_tile_map

    a = ad.read_h5ad(maps / "predictions.h5ad")
    meta, spatial = a.uns["hexpr"], next(iter(a.uns["spatial"].values()))
    panels = []
    for gene in genes:
        path = out_png.with_name(f".{out_png.stem}_{gene}.png")
        plot_tile_map(a[:, gene].X.ravel(), a.obsm["spatial"], meta["stride_px_level0"], spatial["images"]["hires"],
                      spatial["scalefactors"]["tissue_hires_scalef"], path, title=f"her2st C3: predicted {gene}",
                      width_in=4.4, height_in=3.6, dpi=80)
        panels.append(Image.open(path).convert("RGB"))
        path.unlink()
    canvas = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out_png, optimize=True)
    print(f"wrote {out_png} ({out_png.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
