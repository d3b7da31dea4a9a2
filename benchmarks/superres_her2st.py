"""Super-resolution on her2st: learn from pooled pseudo-spots, predict single spots (leave one section out).

The 4 shared her2st sections are imported three times with ``hexpr import``: single spots, and
with ``--pool-spots 2`` and ``--pool-spots 3`` (k x k neighbouring spots of the 200 µm grid summed
into one pseudo-spot; its member spots' 112 µm patches are its sub-tiles). The patches are the
same images in all three, so they are embedded once (MobileNetV2, ImageNet) and the pooled
datasets take their sub-tiles' features by id.

For each held-out section, the other three train, and every figure is the mean Pearson over the
top-50 HVG of the training sections' single spots, on the held-out section's measured single
spots (the modelled panel: the top --panel HVG of the training single spots):
  * (a) single:      the head fitted on the training sections' single spots;
  * (b) super-res:   the head fitted on the pooled pseudo-spots (bags), predicting each held-out
                     spot from its own patch;
  * (c) broadcast:   the same pooled model's prediction for each held-out pseudo-spot (the mean of
                     its members' predictions, i.e. what a spot-level model at the pooled
                     resolution gives) copied to every member spot;
  * training mean:   r = 0 by construction.
Heads: ridge (fitted on each bag's mean feature, exact; alpha on held-out training sections, as
``fit-head`` fits it) and the MLP with the bag loss; the ridge rows again with a 336 µm context
square around each sub-tile appended to its features (``--context-um 336``), all in one run.

    python -m benchmarks.superres_her2st                       # ~10 min on 2 CPU cores
    python -m benchmarks.superres_her2st --picture docs/superres_her2st.png

Prints a table and writes JSON (default benchmarks/results/superres_her2st.json).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._common import HER2ST, MOBILENET_SPEC, her2st_workdir, open_her2st
from hexpr.embedder.backbones import parse_backbone
from hexpr.embedder.datasets import open_dataset
from hexpr.embedder.features import ensure_features
from hexpr.embedder.importers import import_dataset
from hexpr.heads.bags import Bags, aggregate, fit_on_bags
from hexpr.heads.base import fit_with_supported, make_head
from hexpr.heads.metrics import pearson_per_gene, top_genes

HEADS = {
    "ridge": ("ridge", {}),
    "mlp (bag loss)": ("mlp", {"hidden": [256], "epochs": 60, "dropout": 0.2, "weight_decay": 1e-3, "batch_size": 32,
                               "seed": 0}),
}
POOLS = (2, 3)
CONTEXT_UM = (336.0,)   # the ridge rows again with a 336 µm square around each sub-tile (--context-um 336)


def pooled_dataset(work: Path, k: int):
    folder = work / f"her2st_pool{k}"
    if not (folder / "patches").is_dir():
        import_dataset(HER2ST, folder, pool_spots=k, progress=False)
    return open_dataset(folder)


def score(pred, truth, genes) -> float:
    return float(pearson_per_gene(pred, truth)[genes].mean())


def run_section(held_out, single, X, pools, args, heads, exactness) -> list[dict]:
    groups = single.groups.to_numpy()
    test, train = groups == held_out, groups != held_out
    Y = single.targets.to_numpy()
    panel = np.sort(top_genes(Y[train], args.panel, "variance"))
    hvg = top_genes(Y[train][:, panel], 50, "variance")
    y_test = Y[test][:, panel]
    test_ids = [single.ids[i] for i in np.flatnonzero(test)]
    rows = []
    for head_label, (head, params) in heads.items():
        t = time.perf_counter()
        model = fit_with_supported(make_head(head, **params), X[train], Y[train][:, panel], groups=groups[train])
        rows.append({"held_out": held_out, "head": head_label, "pool": 1, "method": "(a) single spots",
                     "r_hvg50": score(model.predict(X[test]), y_test, hvg), "fit_s": round(time.perf_counter() - t, 2)})
        for k, (pooled, bags, X_pool) in pools.items():
            obs_groups = pooled.observation_groups().to_numpy()
            obs_train, obs_test = np.flatnonzero(obs_groups != held_out), np.flatnonzero(obs_groups == held_out)
            rows_train, bags_train = bags.subset(obs_train)
            rows_test, bags_test = bags.subset(obs_test)
            Y_pool = pooled.targets[single.targets.columns[panel]].to_numpy()
            t = time.perf_counter()
            model = fit_on_bags(make_head(head, **params), X_pool[rows_train], Y_pool[obs_train], bags_train,
                                groups=obs_groups[obs_train])
            fit_s = round(time.perf_counter() - t, 2)
            sub = model.predict(X[test])                                       # (b) each spot on its own
            region = aggregate(model.predict(X_pool[rows_test]), bags_test)    # (c) per pseudo-spot ...
            broadcast_by_id = dict(zip([pooled.ids[r] for r in rows_test], region[bags_test.index]))
            broadcast = np.stack([broadcast_by_id[i] for i in test_ids])        # ... on every member spot
            if head == "ridge":
                exactness.append(float(np.abs(region - model.predict(bags_test.mean(X_pool[rows_test]))).max()))
            rows.append({"held_out": held_out, "head": head_label, "pool": k, "method": "(b) super-resolved",
                         "r_hvg50": score(sub, y_test, hvg), "fit_s": fit_s})
            rows.append({"held_out": held_out, "head": head_label, "pool": k, "method": "(c) broadcast",
                         "r_hvg50": score(broadcast, y_test, hvg), "fit_s": fit_s})
            if args.picture is not None and held_out == args.picture_section and k == 2 and head_label == "ridge":
                truth_pool = pooled.targets[single.targets.columns[panel]].to_numpy()[obs_test]
                pooled_by_id = dict(zip([pooled.ids[r] for r in rows_test], truth_pool[bags_test.index]))
                args.picture_data = {"coords": single.coords[test], "genes": single.targets.columns[panel],
                                     "measured": y_test, "pooled": np.stack([pooled_by_id[i] for i in test_ids]),
                                     "superres": sub, "broadcast": broadcast, "hvg": hvg,
                                     "r": pearson_per_gene(sub, y_test)}
    rows.append({"held_out": held_out, "head": "training mean", "pool": 1, "method": "training mean", "r_hvg50": 0.0,
                 "fit_s": 0.0})
    return rows


def draw_picture(data: dict, section: str, out: Path, thumbnail=None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hexpr.workflow.outputs.plots import draw_spatial_panel

    hvg = data["hvg"]
    best = hvg[int(np.argmax(data["r"][hvg]))]
    gene = str(data["genes"][best])
    panels = [("measured (single spots)", data["measured"]), ("measured, 2x2-pooled", data["pooled"]),
              ("predicted from 2x2-pooled training:\nregion broadcast (c)", data["broadcast"]),
              ("predicted from 2x2-pooled training:\nsuper-resolved (b)", data["superres"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4))
    xy = np.asarray(data["coords"], dtype=np.float64)
    for ax, (title, values) in zip(axes, panels):
        v = values[:, best]
        lo, hi = np.percentile(v, [2, 98])
        draw_spatial_panel(ax, xy, v, vmin=lo, vmax=max(hi, lo + 1e-9), colorbar=False, title=title)
    fig.suptitle(f"her2st section {section} (held out), {gene}: log1p CP10k; each panel scaled to its own 2-98 % range",
                 fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return gene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--panel", type=int, default=1000, help="genes modelled (top HVG of the training single spots)")
    parser.add_argument("--work", type=Path, default=None, help="keep imports/caches here (default: temporary)")
    parser.add_argument("--heads", default=",".join(HEADS), help="comma-separated: " + ", ".join(HEADS))
    parser.add_argument("--picture", type=Path, default=None, help="draw the maps of one held-out section into this PNG")
    parser.add_argument("--picture-section", default="C3")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "superres_her2st.json")
    args = parser.parse_args()
    args.picture_data = None
    warnings.simplefilter("ignore")
    heads = {k: HEADS[k] for k in args.heads.split(",")}
    work = her2st_workdir(args.work, "superres-bench-")
    started = time.perf_counter()
    single = open_her2st(work)
    runs = []   # (X of the single spots, the pooled datasets with their X, heads): plain, then with context
    for context in ((), CONTEXT_UM):
        features = ensure_features(single, [parse_backbone(MOBILENET_SPEC)], work / "cache", context_um=context,
                                   progress=False)
        X = features.X.astype(np.float64)
        position = {sid: i for i, sid in enumerate(features.ids)}
        pools = {}
        for k in POOLS:
            pooled = pooled_dataset(work, k)
            bags = Bags.from_index(pooled.bag_index, len(pooled.targets))
            pools[k] = (pooled, bags, X[[position[i] for i in pooled.ids]])
            if not context:
                print(f"pool {k}x{k}: {bags.n_obs} pseudo-spots over {bags.n_patches} spots (mean {bags.sizes.mean():.2f} "
                      f"a pseudo-spot); same patches as the single-spot import: "
                      f"{pooled.fingerprint() == single.fingerprint()}", flush=True)
        run_heads = heads if not context else {f"{label} + {context[0]:g} µm context": spec for label, spec in heads.items()
                                                if spec[0] == "ridge"}
        runs.append((X, pools, run_heads))
    heads = {label: spec for _, _, run_heads in runs for label, spec in run_heads.items()}
    print(f"import + embed: {time.perf_counter() - started:.0f} s", flush=True)

    rows, exactness = [], []
    for held_out in sorted(set(single.groups)):
        for X, pools, run_heads in runs:
            rows += [r for r in run_section(held_out, single, X, pools, args, run_heads, exactness)
                     if r["head"] != "training mean" or X is runs[0][0]]
        print(f"  held out {held_out}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    frame = pd.DataFrame(rows)
    table = frame.pivot_table(index=["head", "pool", "method"], columns="held_out", values="r_hvg50")
    table["mean r"] = table.mean(axis=1)
    single_r = {head: table.loc[(head, 1, "(a) single spots"), "mean r"] for head in heads}
    table["x (a)"] = [row["mean r"] / single_r[head] if head in single_r else np.nan
                      for (head, _, _), row in table.iterrows()]
    pd.set_option("display.width", 160)
    print("\nleave-one-section-out on her2st, MobileNetV2: mean Pearson over the training top-50 HVG on the held-out "
          "section's single spots (pool 1 = trained on single spots)")
    print(table.round(3).to_string())
    print(f"\nridge: max |mean of sub-tile predictions - prediction of the mean feature| = {max(exactness):.2e}")
    result = {"panel": args.panel, "backbone": MOBILENET_SPEC.split(":")[0], "rows": rows,
              "ridge_aggregation_max_abs_diff": max(exactness), "seconds": round(time.perf_counter() - started, 1)}
    if args.picture is not None and args.picture_data is not None:
        result["picture_gene"] = draw_picture(args.picture_data, args.picture_section, args.picture)
        print(f"wrote {args.picture} ({result['picture_gene']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
