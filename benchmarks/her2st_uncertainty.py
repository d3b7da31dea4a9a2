"""Calibrated uncertainty on her2st, leave one section out: do 90 % conformal intervals cover 90 %
of a new section's measured values, and does the bagged members' spread point at the larger errors?

The 4 shared her2st sections are imported and embedded once with the shared ImageNet MobileNetV2
(cached under ``--work``; a rerun embeds nothing). Each section is held out in turn; the other three
train through ``heads.fitting.fit_head`` exactly as ``hexpr fit-head`` does: grouped CV with one fold
per training section gives the out-of-fold residuals the conformal quantiles are calibrated on (so
each residual comes from a model that never saw that section, as the held-out one will be), then the
head is refit on all three. The held-out section is predicted with
``heads.uncertainty.predict_uncertain`` (clipped to the training range, intervals at ``--interval``).
Genes: the top ``--panel`` HVG of the training sections are modelled; everything is reported on
the top-50 HVG of the training sections.
Rows:
  * mlp bag5: ``--head mlp --bag 5`` (head defaults); intervals normalised by the members' spread;
  * ridge:    ``--head ridge``; plain per-gene absolute-residual intervals (no members, no spread).
Columns per held-out section:
  * coverage: share of (spot, gene) measured values inside the interval (nominal ``--interval``);
  * width:    mean interval width (log-expression units);
  * spearman: Spearman between per-spot spread (mean std over the 50 genes) and per-spot absolute
    error (mean over the 50 genes) -- mlp only;
  * neg_raw:  share of raw (unclipped) predictions below zero; clipped predictions have none.

    python -m benchmarks.her2st_uncertainty --work /tmp/h2u   # ~10 min on 2 shared cores, plus the
                                                              # embedding on the first run (a few min)

Prints a table and writes JSON (default benchmarks/results/her2st_uncertainty.json).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from benchmarks._common import MOBILENET_SPEC, her2st_workdir, open_her2st
from hexpr.embedder.backbones import parse_backbone
from hexpr.embedder.features import ensure_features
from hexpr.heads.fitting import fit_head, load_model
from hexpr.heads.metrics import top_genes
from hexpr.heads.uncertainty import predict_uncertain

N_TOP = 50


def evaluate(fitted, X_test, y_test, genes50: np.ndarray, interval: float) -> dict:
    """Coverage, width, spread-error Spearman and raw negatives of ``fitted`` on the held-out section."""
    result = predict_uncertain(fitted, X_test, interval=interval)
    raw = fitted.predict(X_test)
    y, lower, upper = y_test[:, genes50], result.lower[:, genes50], result.upper[:, genes50]
    covered = (y >= lower) & (y <= upper)
    error = np.abs(y - result.mean[:, genes50]).mean(axis=1)
    row = {"coverage": float(covered.mean()), "coverage_gene_min": float(covered.mean(axis=0).min()),
           "coverage_gene_max": float(covered.mean(axis=0).max()), "width": float((upper - lower).mean()),
           "spearman": float("nan"), "neg_raw": float((raw < 0).mean()), "min_raw": float(raw.min()),
           "neg_clipped": float((result.mean < 0).mean()), "level_used": result.level}
    if result.std is not None:
        row["spearman"] = float(spearmanr(result.std[:, genes50].mean(axis=1), error).statistic)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--panel", type=int, default=1000, help="genes modelled (top HVG of the training sections)")
    parser.add_argument("--seeds", type=int, default=5, help="mlp seeds per bag")
    parser.add_argument("--interval", type=float, default=0.9, help="nominal coverage of the intervals")
    parser.add_argument("--work", type=Path, default=None, help="keep the import and embedding cache here (default: temporary)")
    parser.add_argument("--smoke", action="store_true", help="check the script quickly: 2 seeds, 60 genes, tiny mlp; "
                        "numbers mean nothing")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "her2st_uncertainty.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    mlp_params = {"device": "cpu"}
    if args.smoke:
        args.seeds, args.panel = 2, 60
        mlp_params = {"hidden": [16], "epochs": 2, "device": "cpu"}
    work = her2st_workdir(args.work, "her2st-uncertainty-")
    started = time.perf_counter()
    dataset = open_her2st(work)
    Y, groups = dataset.targets.to_numpy(), dataset.groups.to_numpy()
    sections = sorted(set(groups))
    t = time.perf_counter()
    X = ensure_features(dataset, [parse_backbone(MOBILENET_SPEC)], work / "cache", progress=False).X
    embed_seconds = round(time.perf_counter() - t, 1)
    print(f"her2st: {len(dataset)} spots, {Y.shape[1]} shared genes, sections {sections}; embedding "
          f"{embed_seconds} s (cached after the first run)", flush=True)

    recipes = {f"mlp bag{args.seeds}": {"head": "mlp", "params": mlp_params, "bag": args.seeds},
               "ridge": {"head": "ridge", "params": None, "bag": None}}
    rows = []
    for held_out in sections:
        test, train = groups == held_out, groups != held_out
        panel = np.sort(top_genes(Y[train], args.panel, "variance"))
        y_train, y_test = Y[train][:, panel], Y[test][:, panel]
        genes50 = top_genes(y_train, N_TOP, "variance")
        for name, recipe in recipes.items():
            t = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                fit_head(X[train], y_train, [str(g) for g in dataset.targets.columns[panel]], head=recipe["head"],
                         params=recipe["params"], bag=recipe["bag"], folds=len(set(groups[train])), groups=groups[train],
                         out_dir=Path(tmp) / "model", feature_meta={}, progress=False, n_jobs=1)
                fitted = load_model(Path(tmp) / "model")
            row = {"row": name, "held_out": held_out, "n_test_spots": int(test.sum()),
                   **evaluate(fitted, X[test], y_test, genes50, args.interval), "seconds": round(time.perf_counter() - t, 1)}
            rows.append(row)
            print(f"  {held_out} {name}: coverage {row['coverage']:.3f}, width {row['width']:.3f}, "
                  f"spearman {row['spearman']:.3f} ({row['seconds']} s)", flush=True)
    write_table(args, rows, embed_seconds, round(time.perf_counter() - started, 1))


def write_table(args, rows: list[dict], embed_seconds: float, seconds: float) -> None:
    frame = pd.DataFrame(rows)
    sections = sorted(set(frame["held_out"]))
    tables = {}
    for metric in ("coverage", "spearman", "width", "neg_raw"):
        table = frame.pivot_table(index="row", columns="held_out", values=metric, sort=False, dropna=False)
        table["mean"] = table[sections].mean(axis=1)
        tables[metric] = table
    pd.set_option("display.width", 160)
    print(f"\nleave-one-section-out on her2st (MobileNetV2), nominal {args.interval:.0%} conformal intervals, "
          f"top-{N_TOP} HVG of the training sections; {seconds:.0f} s in all")
    for metric, table in tables.items():
        print(f"\n{metric}")
        print(table.round(3).to_string())
    mean_cov = tables["coverage"]["mean"]
    band = (args.interval - 0.05, args.interval + 0.05)
    checks = {"coverage_in_band": {r: bool(band[0] <= v <= band[1]) for r, v in mean_cov.items()},
              "spearman_positive": {r: bool(v > 0) for r, v in tables["spearman"]["mean"].items() if not np.isnan(v)}}
    print("\nchecks:", json.dumps(checks))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "interval": args.interval, "panel": args.panel, "seeds": args.seeds, "n_top": N_TOP, "smoke": args.smoke,
        "tables": {m: json.loads(t.reset_index().to_json(orient="records")) for m, t in tables.items()},
        "checks": checks, "rows": json.loads(frame.to_json(orient="records")), "embed_seconds": embed_seconds,
        "seconds": seconds}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
