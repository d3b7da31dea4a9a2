"""The whole pipeline offline on a generated dataset, and the generated dataset on its own."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from hexpr.embedder.backbones import BackboneSpec, resolve_specs
from hexpr.embedder.demo_data import write_demo_dataset
from hexpr.heads.fitting import check_config
from hexpr.workflow.expression_tables import evaluate_tables, read_expression_table
from hexpr.workflow.fit import check_fit_options, fit_head
from hexpr.workflow.options import check_output_folder
from hexpr.workflow.prediction import predict
from hexpr.workflow.scoring import evaluate


def demo(workdir="hexpr-demo", *, n_train: int = 600, n_test: int = 200, n_genes: int = 200, size: int = 224,
         specs: list[BackboneSpec] | None = None, head: str = "ridge", folds: int = 3, seed: int = 0,
         progress: bool = True, **embed_options) -> dict:
    """The whole pipeline offline on a generated dataset: demo-data, embed, fit-head, predict, evaluate.

    Example::

        >>> report = hexpr.demo("hexpr-demo")           # generated data -> embed -> fit -> predict -> score
        >>> report["test"]["score"], report["test_mean_baseline"]
    """
    started = time.perf_counter()
    check_config(head)  # a bad head or option fails before the data is written
    check_fit_options(folds=folds, seed=seed, **embed_options)
    check_output_folder("--workdir", workdir)
    workdir = Path(workdir)
    data_dir = workdir / "data"
    if not (data_dir / "train.csv").is_file():
        write_demo_dataset(data_dir, n_train=n_train, n_test=n_test, n_genes=n_genes, size=size, seed=seed)
    specs = specs or resolve_specs(no_pretrained=True)
    cache_dir = workdir / "cache"
    steps = {}
    fit = fit_head(data_dir / "train.csv", specs, head=head, folds=folds, seed=seed, out_dir=workdir / "model",
                   cache_dir=cache_dir, progress=progress, **embed_options)
    steps["fit"] = fit
    pred = predict(workdir / "model", data_dir / "test.csv", out=workdir / "predictions.csv", cache_dir=cache_dir,
                   progress=progress, **embed_options)
    scores = evaluate(pred["out"], data_dir / "test_truth.csv", out_dir=workdir)
    # the floor: the training-mean profile on the same test spots
    train = read_expression_table(data_dir / "train.csv")
    truth = read_expression_table(data_dir / "test_truth.csv")
    mean_pred = pd.DataFrame(np.tile(train.mean().to_numpy(), (len(truth), 1)), index=truth.index, columns=train.columns)
    baseline, _ = evaluate_tables(mean_pred, truth)
    return {
        "workdir": str(workdir), "head": head, "backbones": [s.name for s in specs],
        "random_init_backbones": [s.name for s in specs if s.is_random_init],
        "cv_score": fit["cv"]["score"], "cv_mean_head_score": fit["mean_head"]["score"],
        "test": scores, "test_mean_baseline": baseline,
        "predictions": pred["out"], "model_dir": fit["out_dir"], "seconds": round(time.perf_counter() - started, 1),
    }
