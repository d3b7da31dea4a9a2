"""Accuracy recipes on her2st, leave one section out: ridge vs MLP, seed bagging, neighbour context,
TTA, and ``fit-head --head auto``.

The 4 shared her2st sections are imported with ``hexpr import`` and embedded once with the shared
ImageNet MobileNetV2, plain and with ``--tta`` (8 dihedral views averaged); both embeddings are
cached under ``--work``, so reruns embed nothing. Each section is held out in turn and the other
three train. Everything gene-related comes from the training sections only: the modelled panel
(top ``--panel`` HVG, default 1,000, as in ``benchmarks/her2st.py``) and the top-50 HVG/HEG panels
of the scores. Per held-out section:
  * r_hvg50: mean Pearson over the top-50 HVG (the HEST-Benchmark figure);
  * score:   the challenge score over the panel (HEG/HVG terms from the training sections).
Rows:
  * ridge: plain features, with k=6 neighbour context, and TTA + k=6; each also "within slides"
    (``-p within_groups=true``: coefficients and penalty from the variation within each training
    section; what ``fit-head --centre-slides`` fits, and an ``auto`` candidate);
  * mlp, one seed (head defaults): plain and TTA + k=6; the figure is seed 0, and ``range`` is the
    spread (max - min) of the 4-section mean r over seeds 0..4;
  * mlp bag5: the mean of 5 seeds (what ``SeedBagged`` / ``fit-head --bag 5`` predicts); ``range``
    over 3 disjoint bags (seeds 0-4, 5-9, 10-14);
  * auto / auto --tta: ``heads.fitting.fit_head(head="auto")`` on the 3 training sections alone, with
    the candidates ``fit-head --head auto`` scores (ridge, ridge within slides and mlp bag5 on plain
    and k6, and each ridge blended with the mlp)
    (grouped CV = leave one training section out), the chosen recipe refit and applied to the
    held-out section; the chosen recipe per section is listed.

    python -m benchmarks.her2st_accuracy                 # needs ../shared; fits ~5 min on 2 idle cores, plus
                                                         # embedding on the first run (TTA: ~20 min)
    python -m benchmarks.her2st_accuracy --work /tmp/h2  # keep imports/caches for reruns
    python -m benchmarks.her2st_accuracy --work /tmp/h2 --stages 2/3/4 \
        --out benchmarks/results/her2st_accuracy_stages.json     # MobileNetV2 with its stages 2-4 pooled too

Prints a table and writes JSON (default benchmarks/results/her2st_accuracy.json).
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

from benchmarks._common import backbone_label, backbone_spec, her2st_workdir, open_her2st
from hexpr.embedder.backbones import parse_backbone
from hexpr.embedder.features import add_neighbour_context, ensure_features
from hexpr.heads.base import make_head
from hexpr.heads.fitting import fit_head, load_model
from hexpr.heads.metrics import challenge_score, pearson_per_gene, top_genes

N_TOP = 50


def scores(pred, truth, hvg, heg) -> dict:
    r = pearson_per_gene(pred, truth)
    s = challenge_score(pred, truth, heg_genes=heg, hvg_genes=hvg)
    return {"r_hvg50": float(r[hvg].mean()), "score": float(s["score"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--panel", type=int, default=1000, help="genes modelled (top HVG of the training sections)")
    parser.add_argument("--neighbours", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=5, help="seeds per bag (and single seeds whose range is shown)")
    parser.add_argument("--bags", type=int, default=3, help="disjoint bags of plain mlp, for the bag range")
    parser.add_argument("--stages", default="", help="also pool these intermediate stages of the backbone (the spec's "
                        "stages=, e.g. 2/3/4): mid-level features after the model's own")
    parser.add_argument("--work", type=Path, default=None, help="keep imports/caches here (default: temporary)")
    parser.add_argument("--smoke", action="store_true", help="check the script quickly: 2 seeds, 2 bags, 60 genes, "
                        "no TTA embedding (plain features stand in for TTA); numbers mean nothing")
    parser.add_argument("--table-only", action="store_true",
                        help="rebuild the table and JSON from the rows a run saved beside --out (OUT.rows.json)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "her2st_accuracy.json")
    args = parser.parse_args()
    rows_path = args.out.with_suffix(".rows.json")
    if args.table_only:
        saved = json.loads(rows_path.read_text())
        write_table(args, saved["results"], saved["chosen"], saved["timings"], saved["embed_seconds"], saved["seconds"])
        return
    warnings.simplefilter("ignore")
    mlp_params = {}  # the mlp head's defaults, as --head auto uses them
    if args.smoke:
        args.seeds, args.bags, args.panel = 2, 2, 60
        mlp_params = {"hidden": [16], "epochs": 2}
    work = her2st_workdir(args.work, "her2st-accuracy-")
    started = time.perf_counter()
    dataset = open_her2st(work)
    Y, groups = dataset.targets.to_numpy(), dataset.groups.to_numpy()
    sections = sorted(set(groups))
    print(f"her2st: {len(dataset)} spots, {Y.shape[1]} shared genes, sections {sections}", flush=True)

    spec = [parse_backbone(backbone_spec(args))]
    embed_seconds, feats = {}, {}
    for tta in (False, True):
        t = time.perf_counter()
        fs = ensure_features(dataset, spec, work / "cache", tta=tta and not args.smoke, progress=False)
        embed_seconds["tta" if tta else "plain"] = round(time.perf_counter() - t, 1)
        k = args.neighbours
        prefix = "TTA" if tta else "plain"
        feats[prefix] = fs.X
        feats[f"{prefix}+k{k}"] = add_neighbour_context(fs, dataset.coords, groups, k).X
    print(f"embedding (cached after the first run): {embed_seconds}", flush=True)
    ctx, tta_ctx = f"plain+k{args.neighbours}", f"TTA+k{args.neighbours}"

    results, timings, chosen = [], {}, {}

    def record(row_name, held_out, pred, truth, hvg, heg, **extra):
        results.append({"row": row_name, "held_out": held_out, **scores(pred, truth, hvg, heg), **extra})

    for held_out in sections:
        test, train = groups == held_out, groups != held_out
        panel = np.sort(top_genes(Y[train], args.panel, "variance"))
        y_train, y_test = Y[train][:, panel], Y[test][:, panel]
        hvg, heg = top_genes(y_train, N_TOP, "variance"), top_genes(y_train, N_TOP, "sum")

        def timed(name, fn):
            t = time.perf_counter()
            out = fn()
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
            return out

        record("training mean", held_out, np.tile(y_train.mean(axis=0), (test.sum(), 1)), y_test, hvg, heg)
        for name, fset in (("ridge plain", "plain"), (f"ridge k{args.neighbours}", ctx), (f"ridge TTA+k{args.neighbours}", tta_ctx)):
            X = feats[fset]
            for within in (False, True):   # ridge within slides: its coefficients from within-section variation
                label = name + ", within slides" * within
                pred = timed(label, lambda: make_head("ridge", within_groups=within)
                             .fit(X[train], y_train, groups=groups[train]).predict(X[test]))
                record(label, held_out, pred, y_test, hvg, heg)

        for fset, n_bags in (("plain", args.bags), (tta_ctx, 1)):
            X = feats[fset]
            label = "plain" if fset == "plain" else fset
            seed_preds = []
            for seed in range(args.seeds * n_bags):
                pred = timed(f"mlp {label} (all seeds)",
                             lambda: make_head("mlp", **mlp_params, seed=seed, device="cpu").fit(X[train], y_train).predict(X[test]))
                seed_preds.append(pred)
                if seed < args.seeds:
                    record(f"mlp 1 seed {label}", held_out, pred, y_test, hvg, heg, seed=seed)
            for b in range(n_bags):
                bag = np.mean(seed_preds[b * args.seeds:(b + 1) * args.seeds], axis=0)
                record(f"mlp bag{args.seeds} {label}", held_out, bag, y_test, hvg, heg, bag=b)
            print(f"  {held_out}: mlp {label} done ({time.perf_counter() - started:.0f} s)", flush=True)

        for name, names in (("auto", {"plain": "plain", ctx: f"k{args.neighbours}"}),
                            ("auto --tta", {"TTA": "plain", tta_ctx: f"k{args.neighbours}"})):
            X_sets = {short: feats[long][train] for long, short in names.items()}
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                report = fit_head(X_sets, y_train, [str(g) for g in panel], head="auto", folds=len(set(groups[train])), groups=groups[train],
                                  params=mlp_params or None, bag=2 if args.smoke else None,
                                  out_dir=Path(tmp) / "model", feature_meta={}, progress=False)
                fitted = load_model(Path(tmp) / "model")
                long = {v: k for k, v in names.items()}[report["features"]]
                pred = fitted.predict(feats[long][test])
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
            record(name, held_out, pred, y_test, hvg, heg, chosen=report["auto"]["chosen"],
                   cv=[{"recipe": c["recipe"], "score": c["score"]} for c in report["auto"]["candidates"]])
            chosen.setdefault(name, {})[held_out] = report["auto"]["chosen"]
        rows_path.parent.mkdir(parents=True, exist_ok=True)
        rows_path.write_text(json.dumps({"results": results, "chosen": chosen, "timings": timings,
                                         "embed_seconds": embed_seconds, "seconds": round(time.perf_counter() - started, 1)}))
        print(f"{held_out} done ({time.perf_counter() - started:.0f} s); auto chose {chosen['auto'][held_out]}, "
              f"auto --tta chose {chosen['auto --tta'][held_out]}", flush=True)

    write_table(args, results, chosen, timings, embed_seconds, round(time.perf_counter() - started, 1))


def write_table(args, results, chosen, timings, embed_seconds, seconds) -> None:
    """Print the table (first seed/bag per row, 4-section means, ranges over seeds/bags) and write the JSON."""
    frame = pd.DataFrame(results)
    sections = sorted(set(frame["held_out"]))
    tta_ctx = f"TTA+k{args.neighbours}"
    first = frame[frame.get("seed", pd.Series(0, index=frame.index)).fillna(0).eq(0)
                  & frame.get("bag", pd.Series(0, index=frame.index)).fillna(0).eq(0)]
    table = first.pivot_table(index="row", columns="held_out", values="r_hvg50", sort=False)
    table["mean r"] = table[sections].mean(axis=1)
    table["score"] = first.groupby("row", sort=False)["score"].mean()

    def spread(rows: pd.DataFrame, by: str):
        if by not in rows or rows[by].nunique() < 2:
            return np.nan
        means = rows.groupby(by)["r_hvg50"].mean()
        return float(means.max() - means.min())

    table["range"] = [spread(frame[frame["row"] == r], "seed" if "1 seed" in r else "bag") for r in table.index]
    order = ["ridge plain", f"ridge k{args.neighbours}", f"ridge TTA+k{args.neighbours}", "ridge plain, within slides",
             f"ridge k{args.neighbours}, within slides", f"ridge TTA+k{args.neighbours}, within slides", "mlp 1 seed plain",
             f"mlp 1 seed {tta_ctx}", f"mlp bag{args.seeds} plain", f"mlp bag{args.seeds} {tta_ctx}", "auto", "auto --tta",
             "training mean"]
    table = table.reindex([r for r in order if r in table.index])
    pd.set_option("display.width", 160)
    print(f"\nleave-one-section-out on her2st ({backbone_label(args)}): mean Pearson over the top-{N_TOP} HVG of the training "
          f"sections per held-out section; challenge score over the top-{args.panel} HVG panel; {seconds} s in all")
    print(table.round(3).to_string())
    print("auto chose:", json.dumps(chosen))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "backbone": backbone_spec(args),
        "panel": args.panel, "neighbours": args.neighbours, "seeds": args.seeds, "bags": args.bags,
        "table": json.loads(table.reset_index().to_json(orient="records")), "auto_chose": chosen,
        "rows": json.loads(frame.to_json(orient="records")), "embed_seconds": embed_seconds,
        "fit_seconds": {k: round(v, 1) for k, v in timings.items()}, "seconds": seconds}, indent=2))
    print(f"\nwrote {args.out} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
