"""Visium HD import at full size: a synthetic 6.5 x 6.5 mm capture area of 8 µm bins pooled into tiles.

    python -m benchmarks.visium_hd_import [--work DIR] [--tile-um 112] [--genes 18000] [--nnz-per-bin 80]
    python -m benchmarks.visium_hd_import --work DIR --tradeoff-only     # genes per tile at several tile sizes

Writes a Space Ranger-like ``outs/`` (binned_outputs/square_008um: 812 x 812 = 659,344 in-tissue bins,
18,000 genes, sparse counts with about ``--nnz-per-bin`` genes detected per bin, written barcode
chunk by barcode chunk) and a 13,200 px square tiled JPEG TIFF at 0.5 µm/px, then imports it with
``tile_um`` tiles and 112 µm patches, stage by stage in this process (peak RSS reset before each
stage), and once end to end as ``python -m hexpr import`` in a child process.  Prints a table and
writes ``benchmarks/results/visium_hd_import.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile

from benchmarks._common import REPO, peak_memory_mib, reset_peak_memory

SIDE_UM, BIN_UM, MPP, MARGIN_PX = 6500.0, 8, 0.5, 100


def write_sample(root: Path, n_genes: int, nnz_per_bin: int, side_um: float = SIDE_UM,
                 seed: int = 0) -> tuple[Path, Path, dict]:
    rng = np.random.default_rng(seed)
    n_side = int(side_um // BIN_UM)
    level = root / "outs" / "binned_outputs" / "square_008um"
    (level / "spatial").mkdir(parents=True, exist_ok=True)
    rr, cc = np.divmod(np.arange(n_side * n_side), n_side)
    barcodes = [f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(rr, cc)]
    x = (cc + 0.5) * BIN_UM / MPP + MARGIN_PX
    y = (rr + 0.5) * BIN_UM / MPP + MARGIN_PX
    pq.write_table(pa.table({"barcode": pa.array(barcodes, pa.string()), "in_tissue": pa.array(np.ones(len(rr), np.int32)),
                             "array_row": pa.array(rr.astype(np.int32)), "array_col": pa.array(cc.astype(np.int32)),
                             "pxl_row_in_fullres": pa.array(y), "pxl_col_in_fullres": pa.array(x)}),
                   level / "spatial" / "tissue_positions.parquet")
    (level / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"microns_per_pixel": MPP, "bin_size_um": float(BIN_UM), "spot_diameter_fullres": BIN_UM / MPP}))
    popularity = 1.0 / np.arange(1, n_genes + 1) ** 0.8          # a few genes are common, most are rare
    cdf = np.cumsum(popularity / popularity.sum())
    nnz_total = 0
    with h5py.File(level / "filtered_feature_bc_matrix.h5", "w") as f:
        g = f.create_group("matrix")
        data = g.create_dataset("data", (0,), np.int32, maxshape=(None,), chunks=(1 << 20,))
        idx = g.create_dataset("indices", (0,), np.int64, maxshape=(None,), chunks=(1 << 20,))
        indptr = [np.zeros(1, np.int64)]
        for start in range(0, len(rr), 50_000):
            n = min(50_000, len(rr) - start)
            k = rng.poisson(nnz_per_bin, n)
            genes = np.searchsorted(cdf, rng.uniform(0, 1, int(k.sum())))
            owner = np.repeat(np.arange(n), k)
            key = np.unique(owner.astype(np.int64) * n_genes + genes, return_counts=True)
            bins, gcol = np.divmod(key[0], n_genes)
            m = len(bins)
            data.resize((nnz_total + m,))
            idx.resize((nnz_total + m,))
            data[nnz_total:] = key[1].astype(np.int32)
            idx[nnz_total:] = gcol
            indptr.append(nnz_total + np.cumsum(np.bincount(bins, minlength=n)))
            nnz_total += m
        g["indptr"] = np.concatenate(indptr)
        g["shape"] = np.array([n_genes, len(rr)], np.int32)
        g["barcodes"] = np.array([b.encode() for b in barcodes])
        ft = g.create_group("features")
        ft["name"] = np.array([f"GENE{i}".encode() for i in range(n_genes)])
        ft["id"] = np.array([f"ENSG{i:06d}".encode() for i in range(n_genes)])
        ft["feature_type"] = np.array([b"Gene Expression"] * n_genes)
    side_px = int(side_um / MPP) + 2 * MARGIN_PX
    image = root / "he.tif"
    tile = rng.integers(120, 230, (512, 512, 3), dtype=np.uint8)

    def tiles():
        for ty in range(0, side_px, 512):
            for tx in range(0, side_px, 512):
                yield np.roll(tile, (ty // 7 + tx // 11) % 512, axis=0)

    tifffile.imwrite(image, tiles(), shape=(side_px, side_px, 3), dtype=np.uint8, tile=(512, 512),
                     compression="jpeg", photometric="rgb", metadata=None)
    return root / "outs", image, {"n_bins": len(rr), "n_genes": n_genes, "nnz": int(nnz_total),
                                  "image_px": side_px, "matrix_mb": round((level / "filtered_feature_bc_matrix.h5").stat().st_size / 2**20, 1)}


def run_stages(outs: Path, image: Path, out: Path, tile_um: float) -> list[dict]:
    from hexpr.embedder.importers.run import run_import
    from hexpr.embedder.importers.sample import SampleSpec
    from hexpr.embedder.importers.visium_hd import load_visium_hd

    rows = []
    reset_peak_memory()
    t, c = time.perf_counter(), time.process_time()
    data = load_visium_hd(outs, tile_um=tile_um, image=image, sample_id="hd")
    rows.append({"stage": "load: read positions, pool bins into tiles, tile centres",
                 "seconds": round(time.perf_counter() - t, 2), "cpu_seconds": round(time.process_time() - c, 2),
                 "peak_rss_mib": peak_memory_mib(), "detail": data.provenance["seconds"]})
    reset_peak_memory()
    t, c = time.perf_counter(), time.process_time()
    spec = SampleSpec(sample_id="hd", kind="visium_hd", genes=data.genes, load=lambda: data)
    res = run_import([spec], out, kind="visium_hd", patch_um=112.0, progress=False)
    rows.append({"stage": f"cut {res['n_patches']} patches, normalise, write", "seconds": round(time.perf_counter() - t, 2),
                 "cpu_seconds": round(time.process_time() - c, 2), "peak_rss_mib": peak_memory_mib()})
    return rows


def tile_size_tradeoff(outs: Path, sizes=(8, 16, 32, 56, 112, 224)) -> list[dict]:
    """Per tile size: tiles, median counts and median genes detected per tile (the bins pooled as the
    importer pools them, no patches cut)."""
    from hexpr.embedder.importers.tenx_h5 import TenxH5
    from hexpr.embedder.importers.tiles import TileGrid, TileSums

    m = TenxH5.open(outs / "binned_outputs" / "square_008um" / "filtered_feature_bc_matrix.h5")
    pos = pq.read_table(outs / "binned_outputs" / "square_008um" / "spatial" / "tissue_positions.parquet")
    row, col = pos.column("array_row").to_numpy(), pos.column("array_col").to_numpy()
    rows = []
    for size in sizes:
        k = size // BIN_UM
        grid = TileGrid.from_indices(row // k, col // k)
        sums = TileSums(grid.n_tiles, m.n_features)
        for a, b, chunk in m.row_chunks():
            sums.add(chunk, grid.key[a:b])
        counts = sums.result()
        rows.append({"tile_um": size, "tiles": grid.n_tiles,
                     "median_counts": float(np.median(np.asarray(counts.sum(axis=1)).ravel())),
                     "median_genes_detected": float(np.median(np.diff(counts.indptr)))})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--tile-um", type=float, default=112.0)
    ap.add_argument("--genes", type=int, default=18000)
    ap.add_argument("--nnz-per-bin", type=int, default=80)
    ap.add_argument("--side-um", type=float, default=SIDE_UM, help="capture area side (µm); 6500 is full size")
    ap.add_argument("--tradeoff-only", action="store_true", help="only the tile-size table (sample reused from --work)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="hexpr-hd-"))
    t = time.perf_counter()
    done = work / "sample" / "info.json"
    if done.is_file():           # a sample this script wrote before in --work: reused
        info = json.loads(done.read_text())
        outs, image = work / "sample" / "outs", work / "sample" / "he.tif"
    else:
        outs, image, info = write_sample(work / "sample", args.genes, args.nnz_per_bin, args.side_um)
        info["write_seconds"] = round(time.perf_counter() - t, 1)
        done.write_text(json.dumps(info))
    if args.tradeoff_only:
        trade = tile_size_tradeoff(outs)
        print("\n| tile µm | tiles | median counts per tile | median genes detected per tile |\n|---|---|---|---|")
        for r in trade:
            print(f"| {r['tile_um']} | {r['tiles']:,} | {r['median_counts']:,.0f} | {r['median_genes_detected']:,.0f} |")
        dest = REPO / "benchmarks" / "results" / "visium_hd_tile_sizes.json"
        dest.write_text(json.dumps({"sample": info, "rows": trade}, indent=2))
        print(f"wrote {dest}")
        return
    for d in ("staged", "e2e"):
        shutil.rmtree(work / d, ignore_errors=True)
    print(f"synthetic sample: {info}", flush=True)
    rows = run_stages(outs, image, work / "staged", args.tile_um)
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "hexpr", "import", str(outs), "--out", str(work / "e2e"), "--image", str(image),
           "--tile-um", str(args.tile_um), "--quiet"]
    timer = shutil.which("time") and Path("/usr/bin/time").is_file()
    rss_file = work / "e2e_rss.txt"
    if timer:       # GNU time: the child's own peak RSS (KiB), written to a file
        cmd = ["/usr/bin/time", "-f", "%M %U %S", "-o", str(rss_file), *cmd]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    if timer:
        kib, user, system = rss_file.read_text().split()[-3:]
        peak, cpu = round(int(kib) / 1024, 1), round(float(user) + float(system), 2)
    else:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak, cpu = round(usage.ru_maxrss / 1024, 1), round(usage.ru_utime + usage.ru_stime, 2)
    e2e = {"stage": "end to end: python -m hexpr import (child process)", "seconds": round(time.perf_counter() - t, 2),
           "cpu_seconds": cpu, "peak_rss_mib": peak}
    rows.append(e2e)
    print("\n| stage | wall s | CPU s | peak RSS (MiB) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['seconds']} | {r['cpu_seconds']} | {r['peak_rss_mib']:,} |")
    print(f"\nload detail: {rows[0]['detail']}")
    result = {"load_average_after": [round(v, 2) for v in os.getloadavg()], "sample": info, "tile_um": args.tile_um, "patch_um": 112.0, "stages": rows}
    if args.side_um != SIDE_UM:
        print("not full size: results not written")
        return
    dest = REPO / "benchmarks" / "results" / "visium_hd_import.json"
    dest.write_text(json.dumps(result, indent=2))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
