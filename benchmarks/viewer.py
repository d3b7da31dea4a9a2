"""The browser viewer: what writing it costs next to predict-slide, how big it is, and how fast the page is.

Part 1, writing cost and sizes, per slide side (the synthetic gigapixel slides of ``benchmarks.slide_scale``:
a real her2st section repeated, tiled pyramidal JPEG TIFF, 0.5 µm/px): ``predict_slide`` end to end with
its default outputs and an empty cache, then ``hexpr view`` on its folder (read predictions.h5ad, cut the
pyramid by region, write the page and the per-gene files), timed in the same process; the ratio is what
``--outputs ...,viewer`` adds. Sizes: the pyramid (tiles, bytes) and the per-gene files.

Part 2, the page in headless Chromium (/usr/bin/chromium through playwright), timed by the browser itself:
``hexpr-interactive`` (a performance mark set when the slide is open and the first gene is drawn; its
startTime is ms since navigation start) and ``hexpr-gene-switch`` (a performance measure from choosing a
gene to its tiles recoloured, the gene file loaded by a <script> tag), on the 100k px slide's viewer and
on a generated map of ``--tiles`` tiles (default 100,000) x ``--genes`` genes drawn over a thumbnail.

    python -m benchmarks.viewer                                   # 30k and 100k px, tiny model
    python -m benchmarks.viewer --backbone "$MNV2" --patch-px 224 # the README's predict-slide setting
    python -m benchmarks.viewer --sides 30000 --tiles 20000
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._common import HER2ST
from benchmarks.slide_scale import BACKBONE, fit_tiny_model

RESULTS = Path(__file__).parent / "results" / "viewer.json"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_cost(side: int, tile_um: float, backbone: str, patch_px: int, work: Path) -> dict:
    import torch

    from hexpr.workflow import predict_slide, view

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    slide = work / f"synthetic_{side}.tif"
    if not slide.is_file():
        subprocess.run([sys.executable, "-m", "benchmarks.slide_scale", "--build", str(slide), "--one", str(side)], check=True)
    model = fit_tiny_model(work / f"model_{side}", backbone)
    t = time.perf_counter()
    report = predict_slide(model, [slide], work / f"out_{side}", tile_um=tile_um, tile_um_per_px=tile_um / patch_px,
                           cache_dir=work / f"cache_{side}", progress=False, precision="fp32", num_workers=1,
                           n_heatmap_genes=1)
    e2e = time.perf_counter() - t
    slide_dir = Path(report["slides"][str(slide)]["out_dir"])
    t = time.perf_counter()
    written = next(iter(view(slide_dir)["viewers"].values()))
    viewer_s = time.perf_counter() - t
    return {"side_px": side, "tiles": written["n_tiles"], "genes": written["n_genes"], "predict_slide_s": round(e2e, 1),
            "viewer_s": round(viewer_s, 1), "viewer_over_predict_slide": round(viewer_s / e2e, 3),
            "pyramid_tiles": written["pyramid_tiles"], "pyramid_mb": round(written["pyramid_bytes"] / 1e6, 1),
            "gene_kb_each": round(written["gene_bytes_each"] / 1e3, 2), "viewer_mb": round(folder_bytes(slide_dir / "viewer") / 1e6, 1),
            "page": str(slide_dir / "viewer" / "index.html")}


def synthetic_map(n_tiles: int, n_genes: int, work: Path) -> tuple[Path, dict]:
    """A viewer over a thumbnail for a generated square grid of ``n_tiles`` tiles x ``n_genes`` genes
    with interval layers (no slide file: the pyramid is part 1's business)."""
    from hexpr.workflow.outputs.slide_maps import SlideMap
    from hexpr.workflow.outputs.viewer import write_viewer

    side = int(np.ceil(np.sqrt(n_tiles)))
    rows, cols = np.divmod(np.arange(n_tiles), side)
    tile = 256.0
    centres = np.c_[cols * tile + tile / 2, rows * tile + tile / 2]
    rng = np.random.default_rng(0)
    genes = [f"GENE{i:05d}" for i in range(n_genes)]
    base = np.sin(centres[:, :1] / 5000 + np.arange(n_genes) / 7) + np.cos(centres[:, 1:] / 7000)
    pred = pd.DataFrame((base + rng.normal(0, 0.2, base.shape)).astype(np.float32), columns=genes)
    layers = {"lower": pred - 0.5, "upper": pred + 0.7}
    thumb = np.full((2048, 2048, 3), 230, np.uint8)
    obs = pd.DataFrame({"row": rows, "col": cols})
    m = SlideMap("generated", pred, centres, tile, tile, thumb, 2048 / (side * tile), obs,
                 {"um_per_px": 0.5, "grid_shape": [side, side], "slide_size_px": [int(side * tile)] * 2}, layers=layers)
    t = time.perf_counter()
    written = write_viewer(m, work / "generated" / "viewer", pyramid=False)
    return work / "generated" / "viewer" / "index.html", {"write_s": round(time.perf_counter() - t, 1), **written}


def page_timing(page_path: Path, n_switches: int = 10) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        interactive, switches = [], []
        for _ in range(3):                              # three cold opens, a fresh page each
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(Path(page_path).as_uri())
            page.wait_for_function("window.hexprViewer && hexprViewer.ready", timeout=60_000)
            interactive.append(page.evaluate("performance.getEntriesByName('hexpr-interactive')[0].startTime"))
            n_genes = page.evaluate("hexprViewer.data.genes.length")
            for i in range(1, min(n_switches, n_genes - 1) + 1):
                page.evaluate(f"hexprViewer.selectGene(hexprViewer.data.genes[{(i * 7919) % n_genes}])")
                page.wait_for_function(f"hexprViewer.switches.length >= {i + 1}")
            switches += page.evaluate("performance.getEntriesByName('hexpr-gene-switch').slice(1).map(e => e.duration)")
            page.close()
        browser.close()
    return {"interactive_ms_median": round(float(np.median(interactive))), "interactive_ms_max": round(float(np.max(interactive))),
            "gene_switch_ms_median": round(float(np.median(switches))), "gene_switch_ms_max": round(float(np.max(switches))),
            "n_switches": len(switches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default="30000,100000", help="slide sides in px, comma-separated ('' skips part 1)")
    parser.add_argument("--tile-um", type=float, default=448.0)
    parser.add_argument("--backbone", default=BACKBONE)
    parser.add_argument("--patch-px", type=int, default=32)
    parser.add_argument("--tiles", type=int, default=100_000, help="tiles of the generated map of part 2 (0 skips it)")
    parser.add_argument("--genes", type=int, default=200, help="genes of the generated map of part 2")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="viewer-bench-"))
    result = {"machine": f"{os.cpu_count()} CPUs (shared)", "backbone": args.backbone.split(":")[0], "slides": [], "pages": []}
    try:
        sides = [int(s) for s in args.sides.split(",") if s]
        if sides and not HER2ST.is_dir():
            sys.exit(f"{HER2ST} not found: part 1 builds its slides from the shared her2st data (or pass --sides '')")
        for side in sides:
            row = write_cost(side, args.tile_um, args.backbone, args.patch_px, work)
            row.update({f"page_{k}": v for k, v in page_timing(Path(row.pop("page"))).items()})
            result["slides"].append(row)
            print(row, flush=True)
        if args.tiles > 0:
            page, written = synthetic_map(args.tiles, args.genes, work)
            row = {"tiles": written["n_tiles"], "genes": written["n_genes"], "write_s": written["write_s"],
                   "gene_kb_each": round(written["gene_bytes_each"] / 1e3, 1), "slide_js_kb": round(written["slide_js"] / 1e3),
                   "top_js_kb": round(written["top_js"] / 1e3), **page_timing(page)}
            result["pages"].append(row)
            print(row, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for key in ("slides", "pages"):
        if result[key]:
            cols = list(result[key][0])
            print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
            for r in result[key]:
                print("| " + " | ".join(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
