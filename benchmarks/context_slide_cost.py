"""predict-slide cost of context scales: end-to-end time and peak memory without context and with one
or two context scales, side by side in one run on the synthetic her2st slide of ``benchmarks.slide_scale``.

The slide: ``benchmarks.slide_scale.build_slide`` (a real her2st crop repeated to ``--side`` px, tiled
JPEG pyramid, 0.5 µm/px). The models: ridge heads on the tiny random resnet18 at 32 px (as in the
gigapixel benchmark, so that reading is stressed), fitted on a small her2st-like section cut from the
same crop and imported with ``hexpr import`` (legacy-ST layout, 200 µm spot grid), so the section
records its source image: one model without context, one with ``--context-um`` 3x the tile, one with
3x and 6x. Each predict-slide runs in its own process with an empty cache (peak RSS of that process
and of its DataLoader workers).

    python -m benchmarks.context_slide_cost                  # 30k px slide, 448 µm tiles
    python -m benchmarks.context_slide_cost --side 20000

Prints a table and writes JSON (default benchmarks/results/context_slide_cost.json).
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
from benchmarks.slide_scale import BACKBONE, UM_PER_PX, source_crop

RESULTS = Path(__file__).parent / "results" / "context_slide_cost.json"
PITCH_UM = 200.0
SECTION_PX = 6144


def write_section(root: Path) -> Path:
    """A her2st-like folder: a SECTION_PX crop of the slide's tissue, 25 spots every 200 µm mid-section, counts tied to colour."""
    import pandas as pd
    from PIL import Image

    crop = source_crop()[:SECTION_PX, :SECTION_PX]
    for d in ("ST-cnts", "ST-spotfiles", "ST-imgs/S1"):
        (root / d).mkdir(parents=True)
    Image.fromarray(crop).save(root / "ST-imgs" / "S1" / "HE.png")
    pitch = PITCH_UM / UM_PER_PX
    centre = SECTION_PX / pitch / 2            # a 5 x 5 grid of spots mid-section (enough to fit; few wide squares to cut)
    ax, ay = np.meshgrid(np.arange(int(centre) - 2, int(centre) + 3), np.arange(int(centre) - 2, int(centre) + 3))
    ax, ay = ax.ravel(), ay.ravel()
    px, py = ax * pitch, ay * pitch
    pd.DataFrame({"x": ax, "y": ay, "new_x": ax, "new_y": ay, "pixel_x": px, "pixel_y": py, "selected": 1}).to_csv(
        root / "ST-spotfiles" / "S1_selection.tsv", sep="\t", index=False)
    colour = np.array([crop[int(y) - 50:int(y) + 50, int(x) - 50:int(x) + 50].mean(axis=(0, 1)) for x, y in zip(px, py)])
    rng = np.random.default_rng(0)
    counts = rng.poisson(np.column_stack([colour[:, g % 3] / 20 for g in range(8)]))
    pd.DataFrame(counts, index=[f"{a}x{b}" for a, b in zip(ax, ay)], columns=[f"G{g}" for g in range(8)]).to_csv(
        root / "ST-cnts" / "S1.tsv.gz", sep="\t")
    return root


def fit_models(work: Path, tile_um: float, patch_px: int) -> dict:
    from hexpr.embedder.backbones import parse_backbone
    from hexpr.embedder.importers import import_dataset
    from hexpr.workflow import fit_head

    raw = write_section(work / "raw")
    import_dataset(raw, work / "data", patch_um=tile_um, target_um_per_px=tile_um / patch_px, progress=False)
    models = {}
    for name, context in (("none", ()), ("3x", (3 * tile_um,)), ("3x+6x", (3 * tile_um, 6 * tile_um))):
        fit_head(work / "data", [parse_backbone(BACKBONE)], head="ridge", folds=2, out_dir=work / f"model_{name}",
                 cache_dir=work / "cache", context_um=context, progress=False)
        models[name] = work / f"model_{name}"
    return models


def run_one(model: Path, slide: Path, workers: int, threads: int) -> dict:
    import torch

    from hexpr.workflow import predict_slide

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="context-slide-"))
    t = time.perf_counter()
    report = predict_slide(model, [slide], work / "out", cache_dir=work / "cache", progress=False, precision="fp32",
                           num_workers=workers, n_heatmap_genes=1, outputs="h5ad")
    seconds = time.perf_counter() - t
    r = report["slides"][str(slide)]
    return {"tiles": r["n_tiles"], "end_to_end_s": round(seconds, 1), "tiles_per_s": round(r["n_tiles"] / seconds, 1),
            "peak_rss_main_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_rss_worker_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=30000)
    parser.add_argument("--tile-um", type=float, default=448.0)
    parser.add_argument("--patch-px", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(run_one(Path(args.one[0]), Path(args.one[1]), args.workers, args.threads)))
        return
    if not HER2ST.is_dir():
        sys.exit(f"{HER2ST} not found: this benchmark needs the shared her2st data")
    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="context-slide-cost-"))
    slide = work / f"synthetic_{args.side}.tif"
    subprocess.run([sys.executable, "-m", "benchmarks.slide_scale", "--build", str(slide), "--one", str(args.side)], check=True)
    models = fit_models(work, args.tile_um, args.patch_px)
    rows = {}
    for name, model in models.items():
        cmd = [sys.executable, "-m", "benchmarks.context_slide_cost", "--one", str(model), str(slide),
               "--workers", str(args.workers), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        line = [x for x in done.stdout.splitlines() if x.startswith("ROW ")]
        if done.returncode or not line:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        rows[name] = json.loads(line[0][4:])
        print(name, rows[name], flush=True)
    base = rows["none"]
    cols = ["tiles", "end_to_end_s", "tiles_per_s", "peak_rss_main_mb", "peak_rss_worker_mb"]
    print(f"\npredict-slide on a {args.side:,} px slide, {args.tile_um:g} µm tiles at {args.patch_px} px, {BACKBONE}")
    print("| context | " + " | ".join(cols) + " | time / none | peak RSS / none |\n|" + "---|" * (len(cols) + 3))
    for name, r in rows.items():
        ratio = r["end_to_end_s"] / base["end_to_end_s"]
        mem = (r["peak_rss_main_mb"] + r["peak_rss_worker_mb"]) / (base["peak_rss_main_mb"] + base["peak_rss_worker_mb"])
        r.update(time_ratio=round(ratio, 2), rss_ratio=round(mem, 2))
        print(f"| {name} | " + " | ".join(str(r[c]) for c in cols) + f" | {ratio:.2f} | {mem:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"side_px": args.side, "tile_um": args.tile_um, "patch_px": args.patch_px,
                                    "backbone": BACKBONE, "context_um": {"3x": [3 * args.tile_um],
                                                                         "3x+6x": [3 * args.tile_um, 6 * args.tile_um]},
                                    "rows": rows, "machine": f"{os.cpu_count()} CPUs (shared)"}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
