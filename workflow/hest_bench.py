"""hest-bench: HEST-Bench's protocol on one task folder for any backbone, with its own splits.

For each split: fit each head on the train samples' features and targets, predict the test samples,
Pearson r per gene over the test spots; report each split's mean over the task's 50 genes and the mean
(and std) over splits, as HEST-Bench does.  Targets are HEST-Bench's: log1p of raw counts, no size
factor.  The ``hest`` head is the published probe (StandardScaler, PCA 256, ridge with alpha =
100 / (256 x 50), no intercept, scikit-learn's lsqr solver); any other registered head runs on the same
features, splits and targets.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hexpr.embedder.backbones import BackboneSpec
from hexpr.embedder.cache import DEFAULT_CACHE_DIR
from hexpr.embedder.extract import check_embed_options
from hexpr.embedder.features import ensure_features
from hexpr.embedder.files import write_csv, write_json
from hexpr.embedder.hest_bench import read_task
from hexpr.heads.base import HeadError, fit_with_supported, head_param_names, make_head
from hexpr.heads.metrics import pearson_per_gene

__all__ = ["hest_bench", "PUBLISHED_PARAMS"]

# the published probe's solver (HEST's train_test_reg: Ridge(solver='lsqr', max_iter=1000, fit_intercept=False))
PUBLISHED_PARAMS = {"hest": {"solver": "lsqr", "max_iter": 1000}}


def hest_bench(task: str | Path, specs: list[BackboneSpec], *, heads=("hest",), params: dict | None = None,
               out_dir: str | Path | None = None, cache_dir=DEFAULT_CACHE_DIR, tta: bool = False, seed: int = 0,
               **embed_options) -> dict:
    """Run HEST-Bench's protocol on a task folder; write ``<out_dir>/<task>.json`` and ``.csv``.

    ``params``: {head: {param: value}} on top of :data:`PUBLISHED_PARAMS`.  Returns the report: per
    head, each split's mean Pearson over the task genes, their mean and std, and per-gene values.

    Example::

        >>> report = hexpr.hest_bench("bench_data/IDC", hexpr.backbone_specs(["uni:weights=/models/uni"]),
        ... heads=("hest", "ridge"))
        >>> report["heads"]["hest"]["mean"]
    """
    check_embed_options(**embed_options)
    params = params or {}
    heads = tuple(heads)
    if not heads:
        raise HeadError("give at least one head")
    configs = {h: {**PUBLISHED_PARAMS.get(h, {}), **params.get(h, {})} for h in heads}
    for h, p in configs.items():
        make_head(h, **({"seed": seed} if "seed" in _param_names(h) else {}), **p)     # bad names fail first
    bench = read_task(task)
    dataset = bench.dataset()
    features = ensure_features(dataset, specs, cache_dir, tta=tta, **embed_options)
    Y = bench.targets(dataset.ids)
    sample = np.array([i.split("/", 1)[0] for i in dataset.ids])
    report: dict = {"task": bench.name, "genes": bench.genes, "n_spots": len(dataset.ids),
                    "features": features.meta(), "target": "log1p(raw counts), no size factor (HEST-Bench)",
                    "splits": [{"name": s.name, "train": list(s.train), "test": list(s.test)} for s in bench.splits],
                    "heads": {}}
    rows = []
    for h in heads:
        per_split = []
        for s in bench.splits:
            tr, te = np.isin(sample, s.train), np.isin(sample, s.test)
            if not tr.any() or not te.any():
                raise HeadError(f"{bench.root}: {s.name} has no patches for its {'train' if not tr.any() else 'test'} "
                                f"samples {list(s.train if not tr.any() else s.test)}")
            model = make_head(h, **({"seed": seed} if "seed" in _param_names(h) else {}), **configs[h])
            fit_with_supported(model, features.X[tr], Y[tr], groups=sample[tr])   # ridge: alpha on held-out samples
            r = pearson_per_gene(model.predict(features.X[te]), Y[te])
            per_split.append({"split": s.name, "n_train": int(tr.sum()), "n_test": int(te.sum()),
                              "pearson_mean": float(np.mean(r)), "pearson_per_gene": dict(zip(bench.genes, map(float, r)))})
            rows.append({"head": h, "split": s.name, "n_train": int(tr.sum()), "n_test": int(te.sum()),
                         "pearson_mean": float(np.mean(r))})
        means = [p["pearson_mean"] for p in per_split]
        report["heads"][h] = {"params": configs[h], "splits": per_split, "mean": float(np.mean(means)),
                              "std": float(np.std(means))}
        rows.append({"head": h, "split": "mean", "n_train": "", "n_test": "", "pearson_mean": float(np.mean(means))})
    out = Path(out_dir) if out_dir is not None else Path("hest-bench")
    out.mkdir(parents=True, exist_ok=True)
    report["files"] = {"json": str(out / f"{bench.name}.json"), "csv": str(out / f"{bench.name}.csv")}
    write_csv(out / f"{bench.name}.csv", pd.DataFrame(rows), index=False)
    write_json(out / f"{bench.name}.json", report)
    return report


def _param_names(head: str) -> list[str]:
    return head_param_names(head)
