"""Real-data benchmark on the 4 shared her2st sections: leave-one-section-out, beside the mean head.

For each held-out section, the other three train. Everything gene-related is chosen on the
training sections only: the modelled panel (top --panel HVG, default 1,000) and the top-50 HVG /
HEG panels of the scores. Reported per held-out section:
  * r_hvg50: mean Pearson over the top-50 HVG (the HEST-Benchmark figure);
  * score:  the challenge score over the modelled panel (HEG/HVG terms from training sections).
Configurations: backbones (a) the default pair without pretrained weights and (b) the shared
ImageNet MobileNetV2; heads ridge and mlp; with and without neighbour context (mean embedding of
the k nearest spots of the same section).

    python -m benchmarks.her2st                     # needs ../shared; ~10-20 min on 2 cores
    python -m benchmarks.her2st --quick             # MobileNetV2 + ridge only

Prints a table and writes JSON (default benchmarks/results/her2st.json).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._common import MOBILENET_SPEC, her2st_workdir, open_her2st
from hexpr.embedder.backbones import DEFAULT_BACKBONES, parse_backbone
from hexpr.embedder.features import add_neighbour_context, ensure_features
from hexpr.heads.base import fit_with_supported, make_head
from hexpr.heads.metrics import challenge_score, pearson_per_gene, top_genes

BACKBONE_SETS = {
    "default (random init)": [f"{name}:weights=none" for name in DEFAULT_BACKBONES],
    "MobileNetV2 (ImageNet)": [MOBILENET_SPEC],
}
HEADS = {
    "ridge": {},
    "mlp": {"hidden": [256], "epochs": 60, "dropout": 0.2, "weight_decay": 1e-3, "seed": 0},
}


def leave_one_section_out(X, Y, groups, head, params, panel_size, n_top=50):
    rows = []
    for held_out in sorted(set(groups)):
        test, train = groups == held_out, groups != held_out
        panel = np.sort(top_genes(Y[train], panel_size, "variance"))
        y_train, y_test = Y[train][:, panel], Y[test][:, panel]
        hvg = top_genes(y_train, n_top, "variance")
        heg = top_genes(y_train, n_top, "sum")
        model = fit_with_supported(make_head(head, **params), X[train], y_train, groups=groups[train])
        pred = model.predict(X[test])
        floor = np.tile(y_train.mean(axis=0), (test.sum(), 1))
        for name, p in ((head, pred), ("mean", floor)):
            r = pearson_per_gene(p, y_test)
            s = challenge_score(p, y_test, heg_genes=heg, hvg_genes=hvg)
            rows.append({"held_out": held_out, "head": name, "r_hvg50": float(r[hvg].mean()), "score": s["score"],
                         "mean_corr_cells": s["mean_corr_cells"], "max_corr_genes": s["max_corr_genes"],
                         "heg_corr": s["heg_corr"], "hvg_corr": s["hvg_corr"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--panel", type=int, default=1000, help="genes modelled (top HVG of the training sections)")
    parser.add_argument("--neighbours", type=int, default=6)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="keep imports/caches here (default: temporary)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "her2st.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    work = her2st_workdir(args.work, "her2st-bench-")
    started = time.perf_counter()
    dataset = open_her2st(work)
    Y, groups = dataset.targets.to_numpy(), dataset.groups.to_numpy()
    print(f"her2st: {len(dataset)} spots, {Y.shape[1]} shared genes, sections {sorted(set(groups))}; "
          f"import+open {time.perf_counter() - started:.1f} s")

    backbone_sets = {k: v for k, v in BACKBONE_SETS.items() if not args.quick or "MobileNet" in k}
    heads = {k: v for k, v in HEADS.items() if not args.quick or k == "ridge"}
    results = []
    for set_name, texts in backbone_sets.items():
        t = time.perf_counter()
        features = ensure_features(dataset, [parse_backbone(x) for x in texts], work / "cache", progress=False)
        embed_s = time.perf_counter() - t
        contexts = {"no": features, f"k={args.neighbours}": add_neighbour_context(features, dataset.coords, groups, args.neighbours)}
        for context_name, fs in contexts.items():
            for head, params in heads.items():
                t = time.perf_counter()
                rows = leave_one_section_out(fs.X, Y, groups, head, params, args.panel)
                for row in rows:
                    row.update({"backbones": set_name, "context": context_name, "fit_s": round(time.perf_counter() - t, 1),
                                "embed_s": round(embed_s, 1), "n_features": fs.n_features})
                results.extend(rows)
                model_rows = [r for r in rows if r["head"] == head]
                print(f"  {set_name:<24} context {context_name:<5} {head:<6} mean r_hvg50 "
                      f"{np.mean([r['r_hvg50'] for r in model_rows]):.3f}  score {np.mean([r['score'] for r in model_rows]):.3f}",
                      flush=True)

    frame = pd.DataFrame(results)
    frame = frame.drop_duplicates(subset=["backbones", "context", "head", "held_out"])
    mean_rows = frame[frame["head"] == "mean"].drop_duplicates("held_out")
    table = frame[frame["head"] != "mean"].pivot_table(index=["backbones", "head", "context"], columns="held_out",
                                                         values="r_hvg50")
    table["mean r_hvg50"] = table.mean(axis=1)
    table["mean score"] = frame[frame["head"] != "mean"].groupby(["backbones", "head", "context"])["score"].mean()
    floor = mean_rows.set_index("held_out")["r_hvg50"]
    table.loc[("training mean", "mean", "-"), :] = [*floor.reindex(table.columns[:-2]).to_numpy(), floor.mean(),
                                                      mean_rows["score"].mean()]
    pd.set_option("display.width", 160)
    print("\nleave-one-section-out on her2st: mean Pearson over top-50 HVG (chosen on training sections) per held-out "
          f"section; challenge score over the top-{args.panel} HVG panel")
    print(table.round(3).to_string())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"panel": args.panel, "neighbours": args.neighbours, "rows": results,
                                    "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    print(f"\nwrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
