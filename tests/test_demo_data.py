"""Tests for embedder/demo_data.py (synthetic H&E demo dataset in the challenge layout)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hexpr.embedder.demo_data import write_demo_dataset

TINY = dict(n_train=30, n_test=10, n_genes=20, size=64, seed=0, n_groups=3)
# a bit larger (still < 1 s): the signal test needs enough held-out spots to be stable
SIGNAL = dict(n_train=150, n_test=75, n_genes=30, size=48, seed=0, n_groups=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "ds"
    paths = write_demo_dataset(out, **TINY)
    return out, paths


def _pearson_per_gene(pred, truth):
    p = pred - pred.mean(0)
    t = truth - truth.mean(0)
    den = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    return np.where(den > 0, (p * t).sum(0) / np.where(den > 0, den, 1.0), 0.0)


def test_layout_files_and_columns(tiny):
    out, paths = tiny
    for key in ("train_csv", "test_csv", "test_truth_csv", "sample_submission_csv"):
        assert paths[key].parent == out and paths[key].is_file(), key
    assert paths["root"] == out
    assert paths["train_dir"].is_dir() and paths["test_dir"].is_dir()

    train = pd.read_csv(paths["train_csv"])
    test = pd.read_csv(paths["test_csv"])
    truth = pd.read_csv(paths["test_truth_csv"])
    sub = pd.read_csv(paths["sample_submission_csv"])

    assert list(train.columns[:3]) == ["ID", "path", "group"]
    genes = list(train.columns[3:])
    assert len(genes) == TINY["n_genes"] and len(set(genes)) == len(genes)
    assert len(train) == TINY["n_train"] and len(test) == TINY["n_test"]
    assert train["group"].nunique() == TINY["n_groups"]

    # test CSV: no gene columns at all
    assert list(test.columns) == ["ID", "path"]
    # truth and template: same IDs/order as test, gene columns = train genes in order
    assert list(truth.columns) == ["ID"] + genes
    assert list(sub.columns) == ["ID"] + genes
    assert list(truth["ID"]) == list(test["ID"]) == list(sub["ID"])
    assert (sub[genes].to_numpy() == 0).all()

    ids = list(train["ID"]) + list(test["ID"])
    assert len(set(ids)) == len(ids)

    expr = train[genes].to_numpy()
    assert np.issubdtype(expr.dtype, np.floating) and np.isfinite(expr).all()
    assert (expr >= 0).all() and (truth[genes].to_numpy() >= 0).all()
    assert (expr.std(0) > 0).sum() >= len(genes) // 2  # not degenerate
    # a few genes are much more highly expressed than the typical gene
    means = expr.mean(0)
    assert means.max() > 3 * np.median(means)

    for df, sub_dir in ((train, "train"), (test, "test")):
        for sid, rel in zip(df["ID"], df["path"]):
            assert rel == f"{sub_dir}/{sid}.png"
            with Image.open(out / rel) as im:
                assert im.format == "PNG" and im.mode == "RGB"
                assert im.size == (TINY["size"], TINY["size"])


def test_images_look_like_he(tiny):
    out, paths = tiny
    train = pd.read_csv(paths["train_csv"])
    imgs = np.stack([np.asarray(Image.open(out / p), dtype=float) for p in train["path"]])
    r, g, b = imgs[..., 0].mean(), imgs[..., 1].mean(), imgs[..., 2].mean()
    assert r > g and b > g  # pink/purple: green absorbed most by both stains
    assert (imgs.mean(-1) < 128).mean() > 0.005  # some dark (nuclear) pixels


def test_deterministic(tmp_path, tiny):
    out1, _ = tiny
    out2 = tmp_path / "again"
    write_demo_dataset(out2, **TINY)
    files1 = sorted(p.relative_to(out1) for p in out1.rglob("*") if p.is_file())
    files2 = sorted(p.relative_to(out2) for p in out2.rglob("*") if p.is_file())
    assert files1 == files2
    assert len(files1) == 4 + TINY["n_train"] + TINY["n_test"]
    for rel in files1:
        assert (out1 / rel).read_bytes() == (out2 / rel).read_bytes(), rel

    out3 = tmp_path / "other_seed"
    write_demo_dataset(out3, **{**TINY, "seed": 1})
    assert (out3 / "train.csv").read_bytes() != (out1 / "train.csv").read_bytes()


def test_images_carry_signal(tmp_path):
    out = tmp_path / "sig"
    write_demo_dataset(out, **SIGNAL)
    from sklearn.linear_model import Ridge

    train = pd.read_csv(out / "train.csv")
    test = pd.read_csv(out / "test.csv")
    truth = pd.read_csv(out / "test_truth.csv").set_index("ID").loc[test["ID"]]
    genes = list(train.columns[3:])

    def stats(rel_paths):
        rows = []
        for rel in rel_paths:
            a = np.asarray(Image.open(out / rel), dtype=float) / 255.0
            rows.append([*a.mean(axis=(0, 1)), (a.mean(-1) < 0.5).mean()])
        return np.array(rows)

    xtr, xte = stats(train["path"]), stats(test["path"])
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-9
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    y, t = train[genes].to_numpy(), truth[genes].to_numpy()

    def score(labels):
        return _pearson_per_gene(Ridge(alpha=1.0).fit(xtr, labels).predict(xte), t).mean()

    real = score(y)
    rng = np.random.default_rng(0)
    shuffled = np.mean([score(y[rng.permutation(len(y))]) for _ in range(10)])
    assert real > 0.15, real
    assert real - shuffled > 0.12, (real, shuffled)


def test_refuses_non_empty_dir_and_overwrites(tmp_path):
    small = dict(n_train=6, n_test=3, n_genes=5, size=16, n_groups=2)
    out = tmp_path / "ds"
    out.mkdir()  # empty folder is fine
    write_demo_dataset(out, **small)
    (out / "marker.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_demo_dataset(out, **small)
    assert (out / "marker.txt").exists()  # untouched after refusal

    write_demo_dataset(out, **{**small, "n_train": 7}, overwrite=True)
    assert not (out / "marker.txt").exists()
    assert len(pd.read_csv(out / "train.csv")) == 7
    # no temp/trash folders left beside out_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]

    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(FileExistsError):
        write_demo_dataset(f, **small, overwrite=True)


@pytest.mark.parametrize(
    "bad",
    [dict(n_train=0), dict(n_test=0), dict(n_genes=0), dict(size=4), dict(n_groups=50)],
)
def test_rejects_bad_arguments(tmp_path, bad):
    args = {**dict(n_train=6, n_test=3, n_genes=5, size=16, n_groups=2), **bad}
    with pytest.raises(ValueError):
        write_demo_dataset(tmp_path / "ds", **args)
    assert not (tmp_path / "ds").exists()


def test_readable_by_open_dataset(tiny):
    datasets = pytest.importorskip("hexpr.embedder.datasets")
    out, paths = tiny
    train = pd.read_csv(paths["train_csv"])
    genes = list(train.columns[3:])
    ds = datasets.open_dataset(paths["train_csv"])
    assert list(ds.ids) == list(train["ID"])
    assert list(ds.targets.columns) == genes
    img = ds.read_image(0)
    assert img.shape == (TINY["size"], TINY["size"], 3) and img.dtype == np.uint8
    te = datasets.open_dataset(paths["test_csv"])
    assert te.targets is None
    assert list(te.template_genes) == genes
