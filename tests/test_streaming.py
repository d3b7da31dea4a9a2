"""Heads fitted from row chunks (heads.streaming, heads.streamed_ridge, heads.chunked_mlp) and the
chunked HDF5 readers/writer of embedder.cache.

The streamed head modules are imported inside the tests, not at collection time: importing them
registers "ridge_streamed"/"mlp_streamed", which must not leak into test_heads' registry check
before heads.base.HEAD_CLASSES lists them.
"""
import importlib
import json
import weakref

import numpy as np
import pytest

from hexpr.embedder.cache import (
    CacheError,
    dataset_shape,
    iter_array_chunks,
    iter_feature_chunks,
    load_aligned,
    read_ids,
    write_feature_file,
)
from hexpr.heads.model_files import load_head, save_head
from hexpr.heads.metrics import pearson_per_gene
from hexpr.heads.ridge import RidgeHead

RIDGE_VARIANTS = [
    {},
    {"alpha_selection": "loo"},
    {"n_components": 8},
    {"fit_intercept": False},
]
UNEVEN = [0, 7, 50, 51, 133, 240]
TINY_MLP = {"hidden": [32], "epochs": 15, "lr": 3e-3, "device": "cpu", "n_threads": 1}


def streaming():
    return importlib.import_module("hexpr.heads.streaming")


def ridge_module():
    return importlib.import_module("hexpr.heads.streamed_ridge")


def mlp_module():
    return importlib.import_module("hexpr.heads.chunked_mlp")


def planted(n=240, d=20, g=15, seed=0, offset=3.0):
    """Features with a non-zero mean (so centring matters) and targets sharing a low-rank signal."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 3))
    X = latent @ rng.standard_normal((3, d)) + 0.5 * rng.standard_normal((n, d)) + offset
    Y = 2.0 + np.tanh(latent) @ rng.standard_normal((3, g)) + 0.3 * rng.standard_normal((n, g))
    Y[:, 0] *= 10.0                       # one dominant gene
    return X.astype(np.float32), Y


def assert_same_predictions(a, b, rtol=1e-9):
    scale = np.abs(a).max()
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


# --------------------------------------------------------------------------------------------
# streamed ridge == in-memory ridge
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", RIDGE_VARIANTS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "gcv")
def test_streamed_ridge_equals_in_memory_ridge(params):
    X, Y = planted()
    X_test, _ = planted(60, seed=1)
    reference = RidgeHead(**params).fit(X, Y)
    source = streaming().ArrayChunks(X, Y, bounds=UNEVEN)
    streamed = ridge_module().StreamedRidgeHead(**params).fit_stream(source)
    assert streamed.n_samples_seen_ == len(X)
    np.testing.assert_array_equal(streamed.alpha_, reference.alpha_)
    np.testing.assert_allclose(streamed.cv_errors_, reference.cv_errors_, rtol=1e-9)
    assert_same_predictions(reference.predict(X_test), streamed.predict(X_test))


def test_chunk_boundaries_do_not_matter_and_fit_streams_in_memory_arrays():
    X, Y = planted(seed=2)
    X_test, _ = planted(50, seed=3)
    S = ridge_module().StreamedRidgeHead
    ArrayChunks = streaming().ArrayChunks
    by_13 = S().fit_stream(ArrayChunks(X, Y, 13))
    by_64 = S().fit_stream(ArrayChunks(X, Y, 64))
    one_shot = S().fit_stream((X[a:b], Y[a:b]) for a, b in zip(UNEVEN[:-1], UNEVEN[1:]))  # a generator
    in_memory = S(chunk_rows=37).fit(X, Y)
    for other in (by_64, one_shot, in_memory):
        assert_same_predictions(by_13.predict(X_test), other.predict(X_test), rtol=1e-10)
    # float32 chunk products: same alphas here, predictions to ~1e-5
    fast = S(precision="float32").fit_stream(ArrayChunks(X, Y, 64))
    assert_same_predictions(by_13.predict(X_test), fast.predict(X_test), rtol=1e-4)


def test_streamed_ridge_options_errors_and_round_trip(tmp_path):
    X, Y = planted(100, seed=4)
    S = ridge_module().StreamedRidgeHead
    with pytest.raises(ValueError, match="re-iterable"):
        S(alpha_selection="loo").fit_stream(iter([(X, Y)]))
    with pytest.raises(ValueError, match="alpha_selection"):
        S(alpha_selection="kfold").fit(X, Y)
    with pytest.raises(ValueError, match="no targets"):
        S().fit_stream([(X, None)])
    with pytest.raises(ValueError, match="20 features, earlier chunks 19"):
        S().fit_stream([(X[:50, :19], Y[:50]), (X[50:], Y[50:])])
    bad = X.copy()
    bad[70, 3] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf \(first at row 20, column 3 of the chunk\)"):
        S().fit_stream(streaming().ArrayChunks(bad, Y, 50))
    head = S().fit(X, Y)
    save_head(head, tmp_path / "r")
    loaded = load_head(tmp_path / "r")
    np.testing.assert_array_equal(loaded.predict(X), head.predict(X))
    assert S.name == "ridge_streamed"


def test_streamed_ridge_from_float16_hdf5_files(tmp_path):
    """write_feature_file (block by block, float16) -> H5Chunks -> same fit as RidgeHead on the
    values read back; targets streamed from their own file, ids checked block by block."""
    X, Y = planted(150, seed=5)
    ids = [f"s{i}" for i in range(len(X))]
    fpath = write_feature_file(tmp_path / "f.h5", ids, (X[a:a + 40] for a in range(0, 150, 40)))
    tpath = write_feature_file(tmp_path / "y.h5", ids, Y, dataset_name="targets", dtype=np.float32)
    assert dataset_shape(fpath) == (150, 20) and dataset_shape(tpath, "targets") == (150, 15)
    X16 = X.astype(np.float16).astype(np.float32)
    Y32 = Y.astype(np.float32)
    blocks = list(iter_array_chunks(fpath, "features", 64))
    assert [(a, b) for a, b, _ in blocks] == [(0, 64), (64, 128), (128, 150)]
    np.testing.assert_array_equal(np.concatenate([blk for _, _, blk in blocks]), X16)
    source = streaming().H5Chunks(fpath, tpath, chunk_rows=32, stop=120)
    assert len(source) == 4 and source.n_rows == 120
    streamed = ridge_module().StreamedRidgeHead().fit_stream(source)
    reference = RidgeHead().fit(X16[:120], Y32[:120])
    assert_same_predictions(reference.predict(X16[120:]), streamed.predict(X16[120:]))
    # rows in another order in the target file: refused, not silently misaligned
    other = write_feature_file(tmp_path / "y2.h5", ids[::-1], Y[::-1], dataset_name="targets")
    with pytest.raises(CacheError, match="different spot ids"):
        ridge_module().StreamedRidgeHead().fit_stream(streaming().H5Chunks(fpath, other, chunk_rows=64))
    with pytest.raises(ValueError, match="149 rows but 150 ids"):
        write_feature_file(tmp_path / "short.h5", ids, X[:149])
    # nothing of the refused file is left: no final file and no temporary beside it, whatever its name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5", "y.h5", "y2.h5"]


# --------------------------------------------------------------------------------------------
# chunked MLP
# --------------------------------------------------------------------------------------------
def spy_source(X, Y, chunk_rows):
    """ArrayChunks that counts the rows of source chunks still alive (weakref on each block)."""
    base = streaming().ArrayChunks

    class Spy(base):
        def __init__(self):
            super().__init__(X, Y, chunk_rows, dtype=np.float32)
            self.alive_rows = self.max_alive_rows = self.reads = 0

        def _release(self, rows):
            self.alive_rows -= rows

        def read_chunk(self, i):
            Xc, Yc = super().read_chunk(i)
            self.reads += 1
            for block in (Xc, Yc):
                weakref.finalize(block, self._release, len(block))
            self.alive_rows += len(Xc) + len(Yc)     # X and Y rows of the same spots count once each
            self.max_alive_rows = max(self.max_alive_rows, self.alive_rows)
            return Xc, Yc

    return Spy()


def test_chunked_mlp_trains_with_bounded_rows_in_memory():
    X, Y = planted(600, seed=6)
    X_test, Y_test = X[500:], Y[500:]
    chunk_rows = 64
    source = spy_source(X[:500], Y[:500], chunk_rows)
    head = mlp_module().ChunkedMLPHead(**TINY_MLP).fit_stream(source)
    # statistics pass + one pass per epoch, never more than one chunk (X and Y blocks) alive
    assert source.reads == len(source) * (1 + TINY_MLP["epochs"])
    assert source.max_alive_rows <= 2 * chunk_rows
    assert source.alive_rows == 0
    assert head.max_rows_in_memory_ <= chunk_rows
    losses = [r["train_loss"] for r in head.history_]
    assert losses[-1] < 0.5 * losses[0]
    r = pearson_per_gene(head.predict(X_test), Y_test).mean()
    assert r > 0.5, f"chunked MLP per-gene r {r:.3f} does not beat the mean head (0)"

    # the streamed ridge holds one chunk at a time too
    ridge_spy = spy_source(X[:500], Y[:500], chunk_rows)
    ridge_module().StreamedRidgeHead().fit_stream(ridge_spy)
    assert ridge_spy.max_alive_rows <= 2 * chunk_rows and ridge_spy.reads == len(ridge_spy)


def test_chunked_mlp_is_deterministic_mixes_chunks_and_round_trips(tmp_path):
    X, Y = planted(300, seed=7)
    M = mlp_module().ChunkedMLPHead
    params = {**TINY_MLP, "epochs": 4, "chunk_rows": 50}
    a = M(**params).fit(X, Y)
    b = M(**params).fit(X, Y)
    np.testing.assert_array_equal(a.predict(X[:20]), b.predict(X[:20]))
    assert "val_score" in a.history_[0]           # internal validation split, as MLPHead
    mixed = M(**{**params, "mix_chunks": 2, "standardize_targets": True, "val_fraction": 0}).fit(X, Y)
    assert mixed.max_rows_in_memory_ == 100 and np.isfinite(mixed.predict(X[:5])).all()
    save_head(a, tmp_path / "m")
    np.testing.assert_array_equal(load_head(tmp_path / "m").predict(X[:20]), a.predict(X[:20]))
    with pytest.raises(ValueError, match="re-iterable"):
        M(**params).fit_stream(iter([(X, Y)]))
    with pytest.raises(ValueError, match="loss must be one of"):
        M(**{**params, "loss": "l7"}).fit(X, Y)
    assert M.name == "mlp_streamed"


# --------------------------------------------------------------------------------------------
# chunked readers of embedding caches
# --------------------------------------------------------------------------------------------
def cache_file(path, ids, X, key):
    attrs = {"key": key, "backbone": json.dumps({"name": key}), "backbone_identity": json.dumps({"id": key})}
    return write_feature_file(path, ids, X, dtype=np.float32, attrs=attrs)


def test_iter_feature_chunks_aligned_by_id_equals_load_aligned(tmp_path):
    rng = np.random.default_rng(8)
    ids = [f"spot{i:03d}" for i in range(200)]
    A = rng.standard_normal((200, 5)).astype(np.float32)
    B = rng.standard_normal((200, 3)).astype(np.float32)
    order = rng.permutation(200)                   # the second cache lists the spots in another order
    pa = cache_file(tmp_path / "a.h5", ids, A, "a")
    pb = cache_file(tmp_path / "b.h5", [ids[i] for i in order], B[order], "b")
    for wanted in ([ids[i] for i in rng.permutation(200)],          # all rows, shuffled: dense reads
                   [ids[i] for i in rng.choice(200, 30, replace=False)],  # a sparse subset
                   ids[:5] + ids[:5]):                               # repeated ids
        expected, _ = load_aligned([pa, pb], wanted)
        chunks = list(iter_feature_chunks([pa, pb], ids=wanted, chunk_rows=16))
        assert all(b - a <= 16 and x.shape == (b - a, 8) for a, b, x in chunks)
        np.testing.assert_array_equal(np.concatenate([x for _, _, x in chunks]), expected)
    # by position: same ids in the same order are required
    by_position = np.concatenate([x for _, _, x in iter_feature_chunks(pa, chunk_rows=64, start=10, stop=150)])
    np.testing.assert_array_equal(by_position, A[10:150])
    with pytest.raises(CacheError, match="different spot ids"):
        list(iter_feature_chunks([pa, pb], chunk_rows=64))
    with pytest.raises(CacheError, match="not in the cache"):
        list(iter_feature_chunks([pa], ids=["nope"]))
    assert read_ids(pb, 0, 3) == [ids[i] for i in order[:3]]
