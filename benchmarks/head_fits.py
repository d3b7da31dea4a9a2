"""Benchmark the heads on synthetic data of the challenge's shape.

    python -m benchmarks.head_fits                 # 6,992 spots x 1,664 features -> 3,467 genes
    python -m benchmarks.head_fits --small         # quick smoke run (seconds)
    python -m benchmarks.head_fits --heads ridge,gbm --skip-sweep --out /tmp/b.json

Per head (each in its own subprocess, so peak memory is the head's own): fit time on all spots,
peak resident memory during that fit, and the cross-validated challenge score (HEG/HVG panels
chosen on training folds) with its ratio to the ``mean`` head. For ``gbm`` it also times
LightGBM on a sample of single genes to estimate the per-gene boosting cost and the speed-up of
boosting principal components instead. Then a 20-config random mlp sweep (``--skip-sweep`` to
leave it out). Results go to JSON (``--out``, default benchmarks/results/heads.json) and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import peak_memory_mib, reset_peak_memory, resident_mib
from hexpr.heads.synthetic import synthetic_expression

REPO = Path(__file__).resolve().parents[1]

FULL_SHAPE = (6992, 1664, 3467)
SMALL_SHAPE = (600, 64, 200)

# parameters of each benchmarked head (defaults unless stated)
HEAD_PARAMS = {
    "mean": {},
    "ridge": {},
    "hest": {},
    "knn": {},
    "bleep": {},
    "mlp": {},
    "gbm": {},
    "ensemble": {"members": ["ridge", "knn"], "n_folds": 3},
}
SMALL_OVERRIDES = {"mlp": {"epochs": 10}, "bleep": {"epochs": 5}, "gbm": {"n_estimators": 50}}
# the sweep screens configs on a training budget (early stopping still applies); refit the winner
# with the full default budget
SWEEP_FIXED_PARAMS = {"epochs": 15, "patience": 3}
GOALS_SECONDS = {"ridge": 15, "mlp": 120, "gbm": 300}
GOAL_SWEEP_SECONDS = 900
GOAL_GBM_SPEEDUP = 50


# --------------------------------------------------------------------------------------------
# memory measurement (Linux): reset the peak, read it back
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# one head, in a child process
# --------------------------------------------------------------------------------------------
def per_gene_gbm_estimate(X, Y, head, n_sample: int, seed: int) -> dict:
    """Time LightGBM on ``n_sample`` single genes (same settings, shared binned data) and
    extrapolate to all genes."""
    from hexpr.heads.base import rng_split
    from hexpr.heads.gbm import binned_datasets, boost_columns, lgb_params

    params = lgb_params(head)
    train, val = rng_split(X.shape[0], head.val_fraction, head.seed)
    start = time.perf_counter()
    train_set, val_set = binned_datasets(X[train].astype(np.float32), X[val].astype(np.float32), params)
    construct = time.perf_counter() - start
    genes = np.random.default_rng(seed).choice(Y.shape[1], size=min(n_sample, Y.shape[1]), replace=False)
    start = time.perf_counter()
    boosters = boost_columns(train_set, val_set, Y[train][:, genes], Y[val][:, genes], params,
                             head.n_estimators, head.early_stopping_rounds)
    per_gene = (time.perf_counter() - start) / len(genes)
    return {"sampled_genes": int(len(genes)), "seconds_per_gene": round(per_gene, 3),
            "dataset_seconds": round(construct, 3),
            "mean_best_iteration": float(np.mean([b.best_iteration or b.current_iteration() for b in boosters])),
            "estimated_total_seconds": round(construct + per_gene * Y.shape[1], 1)}


def run_child(args) -> dict:
    from hexpr.heads.base import registered_heads
    from hexpr.heads.cv import cross_validate, make_folds
    from hexpr.heads.sweep import model_factory

    registered_heads()          # import every head module now, so imports do not count as fit memory
    X = np.load(Path(args.data) / "X.npy")
    Y = np.load(Path(args.data) / "Y.npy")
    params = json.loads(args.params)
    factory = model_factory(args.child, params, "none")
    baseline = resident_mib()
    exact_peak = reset_peak_memory()
    start = time.perf_counter()
    model = factory().fit(X, Y)
    fit_seconds = time.perf_counter() - start
    result = {"head": args.child, "params": params, "fit_seconds": round(fit_seconds, 2),
              "peak_rss_mib": peak_memory_mib(), "rss_before_fit_mib": baseline,
              "peak_is_fit_only": exact_peak}
    folds = make_folds(X.shape[0], args.folds, seed=args.seed)[: args.eval_folds]
    start = time.perf_counter()
    cv = cross_validate(factory, X, Y, folds).report
    result.update({"cv_seconds": round(time.perf_counter() - start, 2), "cv_folds": args.folds,
                   "cv_folds_evaluated": len(folds), "score": cv["model"]["score"],
                   "mean_head_score": cv["mean_head"]["score"], "ratio_to_mean": cv["ratio_to_mean"],
                   "pearson_all_genes": cv["model"]["pearson_all_genes"],
                   "pearson_hvg": cv["model"]["pearson_hvg"], "terms": {
                       k: cv["model"][k] for k in ("mean_corr_cells", "max_corr_genes", "heg_corr", "hvg_corr")}})
    if args.child == "gbm":
        inner = model.head_
        estimate = per_gene_gbm_estimate(X, Y, inner, args.gene_sample, args.seed)
        estimate["pca_gbm_fit_seconds"] = result["fit_seconds"]
        estimate["speedup"] = round(estimate["estimated_total_seconds"] / fit_seconds, 1)
        estimate["n_components"] = inner.target_pca_.n_components_
        estimate["explained_variance_ratio"] = round(inner.explained_variance_ratio_, 4)
        result["per_gene_estimate"] = estimate
    return result


def run_head(name: str, params: dict, data_dir: Path, args) -> dict:
    """Benchmark one head in a fresh interpreter; returns its result (or the error)."""
    out = data_dir / f"{name}.json"
    cmd = [sys.executable, "-m", "benchmarks.head_fits", "--child", name, "--data", str(data_dir),
           "--params", json.dumps(params), "--folds", str(args.folds), "--eval-folds", str(args.eval_folds),
           "--gene-sample", str(args.gene_sample), "--seed", str(args.seed), "--child-out", str(out)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        return {"head": name, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"],
                "wall_seconds": round(time.perf_counter() - start, 1)}
    result = json.loads(out.read_text())
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    return result


def run_mlp_sweep(X, Y, args) -> dict:
    from hexpr.heads.cv import make_folds
    from hexpr.heads.sweep import run_sweep

    folds = make_folds(X.shape[0], args.folds, seed=args.seed)
    fixed = json.loads(args.sweep_params)
    start = time.perf_counter()
    result = run_sweep("mlp", X, Y, folds, n_trials=args.sweep_trials, fixed_params=fixed,
                       seed=args.seed, n_jobs=args.jobs, progress=False)
    seconds = time.perf_counter() - start
    board = result.leaderboard
    return {"trials": int(len(board)), "folds": args.folds, "n_jobs": args.jobs, "fixed_params": fixed,
            "seconds": round(seconds, 1), "best_score": float(board["score"].iloc[0]),
            "best_config": result.best, "failed": int(board["error"].notna().sum()),
            "top": board.drop(columns=["config"]).head(5).to_dict(orient="records")}


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------
def format_table(results: dict) -> str:
    rows = [("head", "fit s", "peak MiB", "+MiB in fit", "CV score", "mean head", "ratio", "r all genes", "goal")]
    for name, r in results["heads"].items():
        if "error" in r:
            rows.append((name, "error", " ".join(r["error"])[:60], "", "", "", "", "", ""))
            continue
        goal = GOALS_SECONDS.get(name)
        verdict = "" if goal is None else f"< {goal} s: {'ok' if r['fit_seconds'] < goal else 'MISSED'}"
        ratio = "-" if r["ratio_to_mean"] is None else f"{r['ratio_to_mean']:.2f}x"
        grown = "-" if r["rss_before_fit_mib"] is None else f"{r['peak_rss_mib'] - r['rss_before_fit_mib']:.0f}"
        rows.append((name, f"{r['fit_seconds']:.1f}", f"{r['peak_rss_mib']:.0f}", grown, f"{r['score']:.4f}",
                     f"{r['mean_head_score']:.4f}", ratio, f"{r['pearson_all_genes']:.4f}", verdict))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    gbm = results["heads"].get("gbm", {}).get("per_gene_estimate")
    if gbm:
        ok = "ok" if gbm["speedup"] >= GOAL_GBM_SPEEDUP else "MISSED"
        lines.append(f"\ngbm: {gbm['n_components']} PCs ({gbm['explained_variance_ratio']:.1%} of target "
                     f"variance) in {gbm['pca_gbm_fit_seconds']:.1f} s; per-gene LightGBM "
                     f"{gbm['seconds_per_gene']:.2f} s/gene x {results['shape'][2]} genes ~ "
                     f"{gbm['estimated_total_seconds']:.0f} s -> speed-up {gbm['speedup']:.0f}x "
                     f"(goal >= {GOAL_GBM_SPEEDUP}x: {ok})")
    sweep = results.get("mlp_sweep")
    if sweep:
        ok = "ok" if sweep["seconds"] < GOAL_SWEEP_SECONDS else "MISSED"
        lines.append(f"mlp sweep: {sweep['trials']} configs x {sweep['folds']}-fold CV on {sweep['n_jobs']} "
                     f"workers in {sweep['seconds']:.0f} s (goal < {GOAL_SWEEP_SECONDS} s: {ok}); best CV "
                     f"score {sweep['best_score']:.4f}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="quick smoke run on a small synthetic set")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "heads.json"))
    p.add_argument("--heads", default=",".join(HEAD_PARAMS), help="comma-separated heads to run")
    p.add_argument("--head-params", default="{}",
                   help='JSON overriding head parameters, e.g. \'{"gbm": {"n_components": 16}}\'')
    p.add_argument("--folds", type=int, default=3, help="K of the K-fold split")
    p.add_argument("--eval-folds", type=int, default=None,
                   help="score only the first N folds (default: all K; the full run uses 1 to save time)")
    p.add_argument("--gene-sample", type=int, default=6, help="genes timed for the per-gene LightGBM estimate")
    p.add_argument("--skip-sweep", action="store_true", help="leave out the 20-config mlp sweep")
    p.add_argument("--sweep-trials", type=int, default=20)
    p.add_argument("--sweep-params", default=json.dumps(SWEEP_FIXED_PARAMS),
                   help="JSON of mlp params fixed in every sweep config (default: a 15-epoch budget)")
    p.add_argument("--jobs", type=int, default=2, help="parallel sweep workers")
    p.add_argument("--seed", type=int, default=0)
    # internal: one head in a child process
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        Path(args.child_out).write_text(json.dumps(run_child(args), default=str))
        return None
    shape = SMALL_SHAPE if args.small else FULL_SHAPE
    if args.eval_folds is None:
        args.eval_folds = args.folds
    X, Y, _ = synthetic_expression(*shape, seed=args.seed)
    names = [h.strip() for h in args.heads.split(",") if h.strip()]
    overrides = json.loads(args.head_params)
    results = {"shape": list(shape), "small": args.small, "folds": args.folds, "eval_folds": args.eval_folds,
               "seed": args.seed, "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(),
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "heads": {}}
    with tempfile.TemporaryDirectory(prefix="hexpr-bench-") as tmp:
        data_dir = Path(tmp)
        np.save(data_dir / "X.npy", X)
        np.save(data_dir / "Y.npy", Y)
        for name in names:
            params = {**HEAD_PARAMS.get(name, {}), **(SMALL_OVERRIDES.get(name, {}) if args.small else {}),
                      **overrides.get(name, {})}
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            results["heads"][name] = run_head(name, params, data_dir, args)
    if not args.skip_sweep:
        print(f"[bench] mlp sweep ({args.sweep_trials} configs) ...", file=sys.stderr, flush=True)
        if args.small:
            args.sweep_params = json.dumps({**json.loads(args.sweep_params), "epochs": 5})
        results["mlp_sweep"] = run_mlp_sweep(X, Y, args)
    results["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(format_table(results))
    print(f"\nwritten {out}")
    return results


if __name__ == "__main__":
    main()
