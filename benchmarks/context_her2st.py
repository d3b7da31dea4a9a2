"""Context scales on her2st, leave one section out: the 112 µm patch alone vs with 336 µm and 672 µm
squares around the same spot (``--context-um 336,672``), for ridge, one MLP, a bag of 5 MLPs and
``fit-head --head auto`` (which now also tries context scales).

The 4 shared her2st sections are imported with ``hexpr import`` (112 µm patches at 0.5 µm/px) and
embedded with the shared ImageNet MobileNetV2 at the three fields of view (each context square cut
from the section's JPEG by region, resampled to 224 px; each scale cached once under ``--work``).
Each section is held out in turn and the other three train. Gene panels come from the training
sections only (top ``--panel`` HVG modelled, top-50 HVG/HEG for the scores), as in
``benchmarks/her2st_accuracy.py``. Per held-out section: r_hvg50 (mean Pearson over the top-50
HVG) and the challenge score.

Rows: ridge (alpha on held-out training sections, as ``fit-head`` fits it) and the MLP (head
defaults, seed 0; bag5 = mean of seeds 0-4) on 112 µm, 112 + 336 µm and 112 + 336 + 672 µm, and the
two context rows with k=6 neighbours too; "ridge within slides": ridge with ``within_groups`` (its
coefficients and penalty from the variation within each training section, as ``fit-head
--centre-slides`` fits it); ``auto`` = ``heads.fitting.fit_head(head="auto")`` on the
3 training sections with the feature sets ``fit-head --head auto`` builds on imported data (plain,
k6, c336, c336+672, c336+k6, c336+672+k6; grouped CV = leave one training section out; ridge, ridge
within slides, the bagged mlp and each ridge's blend with it), the winner refit and applied to the
held-out section. ``--tta`` adds the same rows on 8-view TTA features.

    python -m benchmarks.context_her2st --work /tmp/ctx        # keep imports and caches for reruns
    python -m benchmarks.context_her2st --work /tmp/ctx --tta  # also the TTA rows (8x the embedding)
    python -m benchmarks.context_her2st --work /tmp/ctx --tta --stages 2/3/4 \
        --out benchmarks/results/context_her2st_stages.json   # MobileNetV2 with its stages 2-4 pooled too

Prints a table and writes JSON (default benchmarks/results/context_her2st.json).
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
from hexpr.embedder.features import FeatureSet, add_neighbour_context, ensure_features
from hexpr.heads.base import make_head
from hexpr.heads.fitting import fit_head, load_model
from hexpr.heads.metrics import challenge_score, pearson_per_gene, top_genes
from hexpr.heads.sweep import auto_candidates

N_TOP = 50
SCALES = (336.0, 672.0)
VIEWS = {"112": 1, "112+336": 2, "112+336+672": 3}   # leading blocks of the feature matrix


def scores(pred, truth, hvg, heg) -> dict:
    r = pearson_per_gene(pred, truth)
    return {"r_hvg50": float(r[hvg].mean()), "score": float(challenge_score(pred, truth, heg_genes=heg, hvg_genes=hvg)["score"])}


def feature_views(fs, dataset, groups, k) -> dict:
    """Named feature matrices: the leading 1, 2 or 3 blocks (patch, 336 µm, 672 µm), and each with the
    mean of its k nearest spots' features appended ("+k6": neighbour context, as auto builds it)."""
    views = {}
    for name, n in VIEWS.items():
        leading = FeatureSet(fs.ids, fs.X[:, :fs.blocks[n - 1]["stop"]], fs.blocks[:n], fs.tta)
        views[name] = leading.X
        views[f"{name}+k{k}"] = add_neighbour_context(leading, dataset.coords, groups, k).X
    return views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--panel", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=5, help="MLP seeds per bag")
    parser.add_argument("--neighbours", type=int, default=6)
    parser.add_argument("--tta", action="store_true", help="also the rows on TTA features (8 views per square)")
    parser.add_argument("--no-auto", action="store_true", help="skip the auto rows")
    parser.add_argument("--auto-only", action="store_true", help="only the auto rows (e.g. a second run with another --out)")
    parser.add_argument("--auto-heads", default="ridge,mlp", help="the candidate heads auto scores (ridge alone: "
                        "auto's choice of feature set, in seconds instead of hours on 2 shared cores)")
    parser.add_argument("--stages", default="", help="also pool these intermediate stages of the backbone (the spec's "
                        "stages=, e.g. 2/3/4): mid-level features after the model's own")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny MLPs, 60 genes, 2 seeds: checks the script; numbers mean nothing")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "context_her2st.json")
    parser.add_argument("--table-only", action="store_true", help="the table and JSON from the sections a run finished")
    args = parser.parse_args()
    rows_path = args.out.with_suffix(".rows.json")   # finished sections, kept so that a rerun continues
    if args.table_only:
        saved = json.loads(rows_path.read_text())
        write_table(args, saved["results"], saved["chosen"], {}, None)
        return
    warnings.simplefilter("ignore")
    mlp_params = {}
    if args.smoke:
        args.seeds, args.panel = 2, 60
        mlp_params = {"hidden": [16], "epochs": 2}
    work = her2st_workdir(args.work, "context-her2st-")
    started = time.perf_counter()
    dataset = open_her2st(work)
    Y, groups = dataset.targets.to_numpy(), dataset.groups.to_numpy()
    sections = sorted(set(groups))
    print(f"her2st: {len(dataset)} spots, {Y.shape[1]} genes, sections {sections}", flush=True)
    spec = [parse_backbone(backbone_spec(args))]
    k = args.neighbours
    embed_seconds, views = {}, {}
    for tta in (False, True) if args.tta else (False,):
        t = time.perf_counter()
        fs = ensure_features(dataset, spec, work / "cache", tta=tta, context_um=SCALES, progress=False)
        prefix = "TTA " if tta else ""
        embed_seconds[prefix.strip() or "plain"] = round(time.perf_counter() - t, 1)
        padded = {f"{b['context_um']:g}": b["n_padded"] for b in fs.blocks if "context_um" in b}
        views.update({prefix + name: X for name, X in feature_views(fs, dataset, groups, k).items()})
        print(f"embedded {prefix or 'plain '}({embed_seconds[prefix.strip() or 'plain']} s, cached afterwards); "
              f"context squares padded at the image edge: {padded}", flush=True)

    saved = json.loads(rows_path.read_text()) if rows_path.is_file() and not args.smoke else {"results": [], "chosen": {}}
    results, chosen = saved["results"], saved["chosen"]
    for held_out in sections:
        if any(r["held_out"] == held_out for r in results):
            continue
        test, train = groups == held_out, groups != held_out
        panel = np.sort(top_genes(Y[train], args.panel, "variance"))
        y_train, y_test = Y[train][:, panel], Y[test][:, panel]
        hvg, heg = top_genes(y_train, N_TOP, "variance"), top_genes(y_train, N_TOP, "sum")

        def record(row, pred, **extra):
            results.append({"row": row, "held_out": held_out, **scores(pred, y_test, hvg, heg), **extra})

        record("training mean", np.tile(y_train.mean(axis=0), (test.sum(), 1)))
        for prefix in ("", "TTA ") if args.tta else ("",):
            for name in () if args.auto_only else [*VIEWS, *(f"{v}+k{k}" for v in VIEWS if v != "112")]:
                X = views[prefix + name]
                record(f"ridge {prefix}{name}", make_head("ridge").fit(X[train], y_train, groups=groups[train]).predict(X[test]))
                preds = [make_head("mlp", **mlp_params, seed=s, device="cpu").fit(X[train], y_train).predict(X[test])
                         for s in range(args.seeds)]
                record(f"mlp 1 seed {prefix}{name}", preds[0])
                record(f"mlp bag{args.seeds} {prefix}{name}", np.mean(preds, axis=0))
                record(f"ridge within slides {prefix}{name}", make_head("ridge", within_groups=True)
                       .fit(X[train], y_train, groups=groups[train]).predict(X[test]))
            print(f"  {held_out}: {prefix or 'plain '}ridge/mlp rows done ({time.perf_counter() - started:.0f} s)", flush=True)
            if args.no_auto:
                continue
            names = {prefix + "112": "plain", f"{prefix}112+k{k}": f"k{k}", prefix + "112+336": "c336",
                     prefix + "112+336+672": "c336+672", f"{prefix}112+336+k{k}": f"c336+k{k}",
                     f"{prefix}112+336+672+k{k}": f"c336+672+k{k}"}
            heads = args.auto_heads.split(",")
            label = f"auto{' --tta' if prefix else ''} (with context){'' if heads == ['ridge', 'mlp'] else ', ' + '+'.join(heads) + ' candidates'}"
            candidates = [c for c in auto_candidates(list(names.values()), params=mlp_params or None, bag=args.seeds,
                                                     within_slides=True)
                          if c["head"].split(":")[0] in heads or (c["head"] == "bagged" and "mlp" in heads)]
            with tempfile.TemporaryDirectory() as tmp:
                report = fit_head({short: views[long][train] for long, short in names.items()}, y_train, [str(g) for g in panel],
                                  head="auto", folds=len(set(groups[train])), groups=groups[train], params=mlp_params or None,
                                  bag=args.seeds, out_dir=Path(tmp) / "model", feature_meta={}, progress=False,
                                  candidates=candidates)
                long = {v: key for key, v in names.items()}[report["features"]]
                record(label, load_model(Path(tmp) / "model").predict(views[long][test]), chosen=report["auto"]["chosen"])
            chosen.setdefault(label, {})[held_out] = report["auto"]["chosen"]
            print(f"  {held_out}: {label} chose {report['auto']['chosen']} ({time.perf_counter() - started:.0f} s)", flush=True)
        rows_path.parent.mkdir(parents=True, exist_ok=True)
        rows_path.write_text(json.dumps({"results": results, "chosen": chosen}))
    write_table(args, results, chosen, embed_seconds, round(time.perf_counter() - started, 1))


def write_table(args, results, chosen, embed_seconds, seconds) -> None:
    frame = pd.DataFrame(results)
    sections = sorted(set(frame["held_out"]))
    table = frame.pivot_table(index="row", columns="held_out", values="r_hvg50", sort=False)
    table["mean r"] = table[sections].mean(axis=1)
    table["score"] = frame.groupby("row", sort=False)["score"].mean()
    pd.set_option("display.width", 160)
    print(f"\nleave-one-section-out on her2st ({backbone_label(args)}), fields of view around each spot: mean Pearson over the "
          f"top-{N_TOP} HVG of the training sections; challenge score over the top-{args.panel} HVG; {seconds} s in all")
    print(table.round(3).to_string())
    print("auto chose:", json.dumps(chosen))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "backbone": backbone_spec(args),
        "panel": args.panel, "seeds": args.seeds, "neighbours": args.neighbours, "context_um": list(SCALES),
        "table": json.loads(table.reset_index().to_json(orient="records")), "auto_chose": chosen,
        "rows": json.loads(frame.to_json(orient="records")), "embed_seconds": embed_seconds, "seconds": seconds,
        "smoke": bool(args.smoke)}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
