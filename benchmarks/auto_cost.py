"""What `fit-head --head auto` costs against the default ridge on data of the challenge's shape.

    python -m benchmarks.auto_cost                 # 6,992 spots x 1,664 features -> 3,467 genes
    python -m benchmarks.auto_cost --small         # quick smoke run (seconds)

Synthetic data from ``benchmarks/head_fits.py`` (a low-rank signal shared by features and
expression, 3 slides as groups, so CV leaves one slide out), with spot coordinates on a grid per
slide so that auto also tries k=6 neighbour context. Both runs go through
``heads.fitting.fit_head`` exactly as the CLI does after embedding (grouped CV, refit, files
written), one after the other in this process: ridge (the default head) on the plain features,
then auto on {plain, k6} (ridge, ridge within slides, mlp bag5, and each ridge's blend with the
mlp). Prints a table and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import peak_memory_mib
from benchmarks.head_fits import FULL_SHAPE, SMALL_SHAPE, synthetic_expression
from hexpr.embedder.features import FeatureSet, add_neighbour_context
from hexpr.heads.fitting import fit_head

REPO = Path(__file__).resolve().parents[1]

N_SLIDES = 3


def grid_coords(groups: np.ndarray) -> np.ndarray:
    """Spot centres on a square grid (100 px apart), one grid per slide."""
    coords = np.zeros((len(groups), 2))
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        side = int(np.ceil(np.sqrt(len(rows))))
        coords[rows] = np.stack([np.arange(len(rows)) % side, np.arange(len(rows)) // side], axis=1) * 100.0
    return coords


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help=f"shape {SMALL_SHAPE} instead of {FULL_SHAPE}")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "auto_cost.json")
    args = parser.parse_args()
    n_spots, n_features, n_genes = SMALL_SHAPE if args.small else FULL_SHAPE
    X, Y, groups = synthetic_expression(n_spots, n_features, n_genes, groups=N_SLIDES)
    ids = [f"spot{i}" for i in range(n_spots)]
    genes = [f"g{j}" for j in range(n_genes)]
    plain = FeatureSet(ids, X, [{"kind": "synthetic", "start": 0, "stop": n_features}], False)
    context = add_neighbour_context(plain, grid_coords(groups), groups, 6)
    print(f"synthetic: {n_spots} spots x {n_features} features -> {n_genes} genes, {N_SLIDES} slides", flush=True)

    runs = {"ridge (default)": {"head": "ridge", "X": X},
            "auto (ridge / ridge within slides / mlp bag5, plain / k6)": {"head": "auto", "X": {"plain": X, "k6": context.X}}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in runs.items():
            started = time.perf_counter()
            report = fit_head(run["X"], Y, genes, head=run["head"], folds=N_SLIDES, groups=groups,
                              out_dir=Path(tmp) / run["head"], feature_meta={}, ids=ids, progress=False)
            seconds = time.perf_counter() - started
            auto = report.get("auto") or {}
            rows.append({"run": name, "seconds": round(seconds, 1), "cv_score": report["cv"]["score"],
                         "chosen": auto.get("chosen", run["head"]), "candidates": auto.get("candidates")})
            print(f"{name}: {seconds:.1f} s, CV score {report['cv']['score']:.4f}, chosen {rows[-1]['chosen']}", flush=True)
    ratio = rows[1]["seconds"] / rows[0]["seconds"]
    print("\n| run | seconds | CV score | chosen |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['seconds']:.1f} | {r['cv_score']:.4f} | {r['chosen']} |")
    print(f"\nauto / ridge time: {ratio:.1f}x; peak RSS {peak_memory_mib():,.0f} MiB")
    result = {"shape": {"spots": n_spots, "features": n_features, "genes": n_genes, "slides": N_SLIDES},
              "rows": rows, "auto_over_ridge_time": round(ratio, 2), "peak_rss_mib": peak_memory_mib(),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
