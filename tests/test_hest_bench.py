"""HEST-Bench task folders and `hexpr hest-bench`: the published PCA-256 + ridge probe gives the same
per-split Pearson as an independent scikit-learn computation on the same features and targets."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import HER2ST, TINY_BACKBONE, needs_shared
from scipy.stats import pearsonr
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from hexpr import pipeline, workflow
from hexpr.embedder.datasets import open_dataset
from hexpr.embedder.hest_bench import read_task


def write_task(root: Path, samples: dict[str, tuple[np.ndarray, list[str], np.ndarray, list[str]]],
               genes50: list[str], splits: list[tuple[list[str], list[str]]]) -> Path:
    """samples: {id: (img (N,P,P,3) uint8, barcodes, raw counts (N,G), genes)} -> a HEST-Bench task folder."""
    (root / "patches").mkdir(parents=True)
    (root / "adata").mkdir()
    (root / "splits").mkdir()
    for sid, (img, bc, counts, genes) in samples.items():
        with h5py.File(root / "patches" / f"{sid}.h5", "w") as f:
            f["img"] = img
            f["barcode"] = np.array([b.encode() for b in bc]).reshape(-1, 1)
            f["coords"] = np.zeros((len(bc), 2))
        a = ad.AnnData(X=counts.astype(np.float32), obs=pd.DataFrame(index=list(bc)),
                       var=pd.DataFrame(index=list(genes)))
        a.write_h5ad(root / "adata" / f"{sid}.h5ad")
    (root / "var_50genes.json").write_text(json.dumps({"genes": genes50}))
    for i, (train, test) in enumerate(splits):
        for part, ids in (("train", train), ("test", test)):
            pd.DataFrame({"sample_id": ids, "patches_path": [f"patches/{s}.h5" for s in ids],
                          "expr_path": [f"adata/{s}.h5ad" for s in ids]}).to_csv(root / "splits" / f"{part}_{i}.csv",
                                                                                 index=False)
    return root


def independent_pearson(task: Path, features: pd.DataFrame, train: list[str], test: list[str], genes: list[str],
                        seed: int = 0) -> float:
    """HEST-Bench's benchmark.py / train_test_reg, written out with scikit-learn and scipy."""
    def assets(samples):
        X, Y = [], []
        for s in samples:
            with h5py.File(task / "patches" / f"{s}.h5", "r") as f:
                bc = [b.decode() for b in f["barcode"][:, 0]]
            a = ad.read_h5ad(task / "adata" / f"{s}.h5ad")[bc, genes]
            Y.append(np.log1p(np.asarray(a.X, np.float64)))
            X.append(features.loc[[f"{s}/{b}" for b in bc]].to_numpy())
        return np.vstack(X), np.vstack(Y)

    X_tr, Y_tr = assets(train)
    X_te, Y_te = assets(test)
    pipe = [StandardScaler(), PCA(n_components=256, random_state=seed)]
    Z_tr = pipe[1].fit_transform(pipe[0].fit_transform(X_tr))
    Z_te = pipe[1].transform(pipe[0].transform(X_te))
    reg = Ridge(solver="lsqr", alpha=100 / (Z_tr.shape[1] * Y_tr.shape[1]), random_state=seed, fit_intercept=False,
                max_iter=1000)
    pred = reg.fit(Z_tr, Y_tr).predict(Z_te)
    return float(np.mean([pearsonr(Y_te[:, j], pred[:, j])[0] for j in range(Y_te.shape[1])]))


def _synthetic_task(root: Path) -> tuple[Path, list[str]]:
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(70)]
    samples = {}
    for k, sid in enumerate(("S1", "S2", "S3")):
        n = 150
        colour = rng.uniform(40, 220, (n, 3))
        img = np.clip(colour[:, None, None, :] + rng.normal(0, 15, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
        lam = np.exp(0.5 + 2.0 * (colour @ rng.uniform(-1, 1, (3, len(genes)))) / 255.0)
        samples[sid] = (img, [f"bc{k}_{i}" for i in range(n)], rng.poisson(lam), genes)
    genes50 = genes[5:55]
    task = write_task(root / "SYNTH", samples, genes50, [(["S1", "S2"], ["S3"]), (["S2", "S3"], ["S1"])])
    return task, genes50


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    task, genes50 = _synthetic_task(root)
    return task, genes50, root / "cache"


def test_task_folder_is_a_dataset_with_its_own_splits(synth):
    task, genes50, _ = synth
    bench = read_task(task)
    assert [s.name for s in bench.splits] == ["split 0", "split 1"]
    assert bench.splits[0].train == ("S1", "S2") and bench.splits[1].test == ("S1",)
    assert bench.genes == genes50
    ds = open_dataset(task)                  # expression found in adata/, one group per sample
    assert len(ds.ids) == 450 and set(ds.groups) == {"S1", "S2", "S3"}
    assert ds.targets.shape == (450, 70)


def test_hest_bench_matches_an_independent_computation(synth, tmp_path):
    task, genes50, cache = synth
    specs = workflow.backbone_specs([TINY_BACKBONE], None, False)
    report = workflow.hest_bench(task, specs, heads=("hest", "ridge"), out_dir=tmp_path / "out",
                                 cache_dir=cache, progress=False, num_workers=0)
    fs = workflow.embed(task, specs, cache, num_workers=0, progress=False)
    features = pd.DataFrame(fs.X.astype(np.float64), index=fs.ids)
    for split, res in zip(read_task(task).splits, report["heads"]["hest"]["splits"]):
        expect = independent_pearson(task, features, list(split.train), list(split.test), genes50)
        assert res["pearson_mean"] == pytest.approx(expect, abs=0.005)
    ridge = report["heads"]["ridge"]
    assert [s["n_test"] for s in ridge["splits"]] == [150, 150] and np.isfinite(ridge["mean"])
    saved = json.loads((tmp_path / "out" / "SYNTH.json").read_text())
    assert saved["heads"]["ridge"]["mean"] == pytest.approx(report["heads"]["ridge"]["mean"])
    assert set(pd.read_csv(tmp_path / "out" / "SYNTH.csv")["split"]) == {"split 0", "split 1", "mean"}


def test_cli_hest_bench_table_and_errors(synth, tmp_path):
    task, _, cache = synth
    args = ["hest-bench", str(task), "-b", TINY_BACKBONE, "--cache-dir", str(cache), "--out",
            str(tmp_path / "out"), "--quiet", "--workers", "0"]
    r = CliRunner().invoke(pipeline.app, args)
    assert r.exit_code == 0, r.output
    assert "split 0" in r.output and "hest" in r.output and (tmp_path / "out" / "SYNTH.json").is_file()
    broken = tmp_path / "BROKEN"
    shutil.copytree(task, broken)
    (broken / "splits" / "test_1.csv").unlink()
    r = CliRunner().invoke(pipeline.app, [*args[:1], str(broken), *args[2:]])
    assert r.exit_code == 2 and r.output.startswith("Error:") and "test_1.csv" in r.output


@needs_shared
@pytest.mark.slow
def test_hest_bench_on_her2st_matches_an_independent_computation(tmp_path):
    """A task written from the four her2st sections (patches as `hexpr import` cuts them, raw counts),
    leave-one-patient-out splits, the 50 most variable genes."""
    from hexpr.embedder.importers import import_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_dataset(HER2ST, tmp_path / "imp", progress=False)
    samples, logs = {}, []
    for sid in ("B4", "C2", "C3", "C4"):
        a = ad.read_h5ad(tmp_path / "imp" / "st" / f"{sid}.h5ad")
        with h5py.File(tmp_path / "imp" / "patches" / f"{sid}.h5", "r") as f:
            img, bc = f["img"][:], [b.decode() for b in f["barcode"][:, 0]]
        counts = a[bc].layers["counts"].toarray()
        samples[sid] = (img, bc, counts, list(a.var_names))
        logs.append(np.log1p(counts))
    var = np.vstack(logs).var(axis=0)
    genes50 = [samples["B4"][3][j] for j in np.argsort(-var, kind="stable")[:50]]
    task = write_task(tmp_path / "HER2ST", samples, genes50, [(["B4"], ["C2", "C3", "C4"]), (["C2", "C3", "C4"], ["B4"])])
    specs = workflow.backbone_specs([TINY_BACKBONE], None, False)
    report = workflow.hest_bench(task, specs, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    fs = workflow.embed(task, specs, tmp_path / "cache", progress=False)
    features = pd.DataFrame(fs.X.astype(np.float64), index=fs.ids)
    for split, res in zip(read_task(task).splits, report["heads"]["hest"]["splits"]):
        expect = independent_pearson(task, features, list(split.train), list(split.test), genes50)
        assert res["pearson_mean"] == pytest.approx(expect, abs=0.005)
