"""predict-slide on synthetic gigapixel slides built from real her2st tissue: per-stage tiles/s,
end to end as a share of model-only throughput, and peak memory, at two slide sizes.

The slide: a real her2st section (tissue and its glass) cropped to PERIOD_PX and repeated to fill
``side`` x ``side`` px, written with tifffile as a tiled (512 px) JPEG pyramidal TIFF with its scale
(0.5 µm/px); tiles are streamed from an iterator, each distinct tile JPEG-encoded once, so building it
never holds the whole image. Each size runs in its own process (peak RSS of that process and of its
DataLoader workers). The model is tiny on purpose (2 shared CPU cores): resnet18 with random weights
at 32 px behind a ridge head, so the read path is stressed; a real backbone is slower and reading
matters less.

Stages, in tissue tiles per second:
  * tissue: open, thumbnail from a low pyramid level, tissue mask, tile grid;
  * read:   every tissue tile cut by region (from the coarsest fine-enough level) and resampled, one process;
  * model:  the backbone alone on batches of random tiles (no reading);
  * embed:  ``workflow.slides.predict_tiles`` with an empty cache: tiles read by region in DataLoader
    workers overlapped with the model, features cached, the head applied (what the >= 0.9 goal is about);
  * end to end: ``predict_slide`` with an empty cache (tissue, reading in DataLoader workers overlapped
    with the model, cache, head, outputs); "write" = the outputs' share of it.

    python -m benchmarks.slide_scale                       # 30k and 100k px
    python -m benchmarks.slide_scale --sides 30000 --tile-um 448
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks._common import HER2ST

UM_PER_PX = 0.5
TILE = 512
PERIOD_PX = 8192          # the repeated crop of the real section (16 TIFF tiles)
BACKBONE = "resnet18:weights=none,size=32"
RESULTS = Path(__file__).parent / "results" / "slide_scale.json"


def source_crop(section: str = "C3") -> np.ndarray:
    """A PERIOD_PX square of a real section around its tissue (white glass where the image ends)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(next((HER2ST / "ST-imgs" / section).glob("*.jpg"))) as im:
        arr = np.asarray(im.convert("RGB"))
    out = np.full((PERIOD_PX, PERIOD_PX, 3), 240, np.uint8)
    h, w = min(PERIOD_PX, arr.shape[0]), min(PERIOD_PX, arr.shape[1])
    y0, x0 = (arr.shape[0] - h) // 2, (arr.shape[1] - w) // 2
    out[:h, :w] = arr[y0:y0 + h, x0:x0 + w]
    return out


def build_slide(path: Path, side: int) -> None:
    """Tiled pyramidal JPEG TIFF of ``side`` px, streamed tile by tile (levels down to < 2048 px)."""
    import tifffile

    from hexpr.embedder.slides import block_mean

    level = source_crop()
    levels = []
    n = 0
    while True:
        levels.append((level, -(-side // (2 ** n))))
        if -(-side // (2 ** n)) <= 2048:
            break
        level = block_mean(level, 2) if level.shape[0] >= 2 * TILE else np.tile(block_mean(level, 2), (2, 2, 1))
        n += 1

    def tiles(src: np.ndarray, size: int):
        period = src.shape[0]
        reps = np.tile(src, (2, 2, 1)) if period < 2 * TILE else None
        for y in range(0, size, TILE):
            for x in range(0, size, TILE):
                oy, ox = y % period, x % period
                if reps is not None:
                    yield reps[oy:oy + TILE, ox:ox + TILE]
                else:
                    block = np.take(np.take(src, np.arange(oy, oy + TILE) % period, 0), np.arange(ox, ox + TILE) % period, 1)
                    yield block

    res = 1e4 / UM_PER_PX
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i, (src, size) in enumerate(levels):
            tif.write(tiles(src, size), shape=(size, size, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                      compression="jpeg", compressionargs={"level": 85}, resolution=(res * size / side,) * 2, resolutionunit="CENTIMETER",
                      subifds=len(levels) - 1 if i == 0 else None, subfiletype=1 if i else 0, metadata=None)


def fit_tiny_model(work: Path, backbone: str = BACKBONE) -> Path:
    from PIL import Image

    from hexpr.embedder.backbones import parse_backbone
    from hexpr.workflow import fit_head

    rng = np.random.default_rng(0)
    (work / "train" / "img").mkdir(parents=True)
    rows = []
    for i in range(24):
        colour = rng.uniform(0, 255, 3)
        Image.fromarray(np.clip(colour + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)).save(work / "train" / "img" / f"s{i}.png")
        rows.append({"ID": f"s{i}", "path": f"img/s{i}.png", **{f"G{g}": float(colour[g % 3] / 255 + rng.normal(0, .1)) for g in range(8)}})
    import pandas as pd

    pd.DataFrame(rows).to_csv(work / "train" / "train.csv", index=False)
    fit_head(work / "train" / "train.csv", [parse_backbone(backbone)], head="ridge", folds=2, out_dir=work / "model",
             cache_dir=work / "cache", progress=False)
    return work / "model"


def run_one(side: int, tile_um: float, threads: int, workers: int, backbone: str = BACKBONE, patch_px: int = 32) -> dict:
    """Everything for one slide size, in this process."""
    import torch

    from hexpr.embedder.backbones import create_backbone, parse_backbone
    from hexpr.embedder.extract import _forward
    from hexpr.embedder.slides import open_slide, read_square, slide_thumbnail
    from hexpr.embedder.tiling import tile_grid, tissue_fraction, tissue_mask
    from hexpr.workflow import load_predictor, predict_slide
    from hexpr.workflow.slides import predict_tiles

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="slide-scale-"))
    t = time.perf_counter()
    slide_path = work / f"synthetic_{side}.tif"
    # built in its own process: decoding the source section must not count in this process's peak RSS
    subprocess.run([sys.executable, "-m", "benchmarks.slide_scale", "--build", str(slide_path), "--one", str(side)], check=True)
    build_s = time.perf_counter() - t
    model = fit_tiny_model(work, backbone)
    row = {"side_px": side, "file_gb": round(slide_path.stat().st_size / 1e9, 2), "build_s": round(build_s, 1),
           "backbone": backbone.split(":")[0], "tile_um": tile_um, "patch_px": patch_px, "threads": threads,
           "workers": workers}

    t = time.perf_counter()
    with open_slide(slide_path) as slide:
        thumb, scale = slide_thumbnail(slide)
        mask = tissue_mask(thumb)
        grid = tile_grid(slide.width, slide.height, tile_um / UM_PER_PX)
        tiles = grid.subset(tissue_fraction(mask, scale, grid) >= 0.25)
        tissue_s = time.perf_counter() - t
        n = len(tiles)
        t = time.perf_counter()
        for cx, cy in tiles.centres:
            read_square(slide, float(cx), float(cy), grid.tile_px, patch_px)
        read_s = time.perf_counter() - t
    net = create_backbone(parse_backbone(backbone), torch.device("cpu"))
    batch = torch.randint(0, 255, (16, 3, patch_px, patch_px), dtype=torch.uint8)
    _forward(net, batch, torch.device("cpu"), False, None)
    t, done = time.perf_counter(), 0
    started = t
    while done < min(n, 2000) and (done < 64 or time.perf_counter() - started < 60):
        _forward(net, batch, torch.device("cpu"), False, None)
        done += len(batch)
    model_tps = done / (time.perf_counter() - t)
    # the embed stage alone: tiles read by region in a DataLoader worker while the model runs (empty cache)
    fitted = load_predictor(model)
    with open_slide(slide_path) as slide:
        t = time.perf_counter()
        predict_tiles(fitted, slide, tiles.centres, tiles.ids(), {"tile_um": tile_um, "tile_px": patch_px},
                      cache_dir=work / "cache-embed", progress=False, precision="fp32", num_workers=workers)
        embed_s = time.perf_counter() - t
    t = time.perf_counter()
    report = predict_slide(model, [slide_path], work / "out", tile_um=tile_um, tile_um_per_px=tile_um / patch_px,
                           cache_dir=work / "cache", progress=False, precision="fp32", num_workers=workers, n_heatmap_genes=1)
    e2e_s = time.perf_counter() - t
    r = report["slides"][str(slide_path)]
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    row.update({"grid_tiles": r["n_grid_tiles"], "tissue_tiles": n, "tissue_tiles_per_s": round(n / tissue_s, 1),
                "read_tiles_per_s": round(n / read_s, 1), "model_tiles_per_s": round(model_tps, 1),
                "embed_tiles_per_s": round(n / embed_s, 1), "embed_over_model": round(n / embed_s / model_tps, 3),
                "end_to_end_tiles_per_s": round(n / e2e_s, 1), "end_to_end_over_model": round(n / e2e_s / model_tps, 3),
                "end_to_end_s": round(e2e_s, 1), "peak_rss_main_mb": round(self_mb), "peak_rss_worker_mb": round(child_mb)})
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default="30000,100000", help="slide sides in px, comma-separated")
    parser.add_argument("--tile-um", type=float, default=448.0, help="tile side in µm (896 px at 0.5 µm/px)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the model")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader reader workers")
    parser.add_argument("--backbone", default=BACKBONE, help="backbone spec (default: the tiny random resnet18 at 32 px)")
    parser.add_argument("--patch-px", type=int, default=32, help="tile side in model pixels")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--build", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.build:
        build_slide(args.build, args.one)
        return
    if args.one:
        print("ROW " + json.dumps(run_one(args.one, args.tile_um, args.threads, args.workers, args.backbone, args.patch_px)))
        return
    if not HER2ST.is_dir():
        sys.exit(f"{HER2ST} not found: this benchmark needs the shared her2st data")
    rows = []
    for side in (int(s) for s in args.sides.split(",")):
        cmd = [sys.executable, "-m", "benchmarks.slide_scale", "--one", str(side), "--tile-um", str(args.tile_um),
               "--threads", str(args.threads), "--workers", str(args.workers), "--backbone", args.backbone,
               "--patch-px", str(args.patch_px)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        line = [x for x in done.stdout.splitlines() if x.startswith("ROW ")]
        if done.returncode or not line:
            sys.exit(f"side {side} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(line[0][4:]))
        print(rows[-1], flush=True)
    cols = ["side_px", "file_gb", "tissue_tiles", "tissue_tiles_per_s", "read_tiles_per_s", "model_tiles_per_s",
            "end_to_end_tiles_per_s", "end_to_end_over_model", "peak_rss_main_mb", "peak_rss_worker_mb"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"backbone": args.backbone, "um_per_px": UM_PER_PX, "rows": rows,
                                    "machine": f"{os.cpu_count()} CPUs (shared)"}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
