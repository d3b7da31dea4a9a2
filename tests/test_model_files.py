"""Models on disk without pickle: every head reloads bit-identically, loading never unpickles,
planted pickles never run, tampered files and configs are refused with a clear error."""
import io
import json
import pickle
import shutil

import joblib
import numpy as np
import pytest
import torch

from hexpr.embedder.errors import ModelError
from hexpr.heads.base import HEAD_CLASSES, FeatureReduced, make_head
from hexpr.heads.fitting import FittedModel, fit_head, load_model
from hexpr.heads.model_files import (
    ARRAYS_FILE,
    CONFIG_FILE,
    ESTIMATOR_CLASSES,
    LEGACY_FILE,
    current_module,
    load_head,
    looks_like_pickle,
    pickle_files,
    save_head,
)
from hexpr.heads.synthetic import synthetic_expression
from hexpr.heads.targets import TargetTransformed
from hexpr.heads.uncertainty import predict_uncertain

TORCH = {"device": "cpu", "n_threads": 1}
# every registered head, small; each fitted through fit_head, so the FittedModel (transform, range, calibration) round-trips too
FAST = {
    "mean": {},
    "ridge": {"n_components": 6},
    "hest": {"n_components": 6},
    "mlp": {"hidden": [16], "epochs": 5, **TORCH},
    "gbm": {"n_components": 3, "n_estimators": 20, "min_child_samples": 5},
    "knn": {"k": 5},
    "bleep": {"dim": 8, "epochs": 3, "batch_size": 32, **TORCH},
    "ensemble": {"members": ["ridge", ["gbm", {"n_components": 2, "n_estimators": 10, "min_child_samples": 5}]],
                 "n_folds": 2},
    "ridge_streamed": {"chunk_rows": 32},
    "mlp_streamed": {"hidden": [16], "epochs": 4, "chunk_rows": 32, "standardize_targets": True, **TORCH},
    "bagged": {"head": "mlp", "params": {"hidden": [8], "epochs": 3, **TORCH}, "n_seeds": 2},
}
TRANSFORM = {"mean": "none", "ridge": "log1p+standardize", "mlp": "robust", "gbm": "minmax", "knn": "standardize",
             "bleep": "log1p", "ensemble": "none", "ridge_streamed": "standardize", "mlp_streamed": "none",
             "hest": "none", "bagged": "log1p"}


@pytest.fixture(scope="module")
def data():
    X, Y, _ = synthetic_expression(120, 10, 8, rank=3, n_dominant=2, noise=0.3, seed=3)
    return X, np.abs(Y), [f"G{i}" for i in range(Y.shape[1])]


@pytest.fixture(scope="module")
def fitted(data, tmp_path_factory):
    """{head name: the in-memory FittedModel fit_head saved} and the folder holding their model folders."""
    X, Y, genes = data
    root = tmp_path_factory.mktemp("models")
    kept, save = {}, FittedModel.save

    def keep(self, folder):
        kept[self.config["head"]] = self
        return save(self, folder)

    FittedModel.save = keep
    try:
        for name in HEAD_CLASSES:
            fit_head(X[:96], Y[:96], genes, head=name, params=FAST[name], transform=TRANSFORM[name], folds=2,
                     out_dir=root / name, feature_meta={"n_features": X.shape[1]}, progress=False, n_jobs=1)
    finally:
        FittedModel.save = save
    return kept, root


@pytest.fixture(scope="module")
def fitted_folders(fitted):
    return fitted[1]


def test_every_registered_head_is_covered():
    assert set(FAST) == set(HEAD_CLASSES) == set(TRANSFORM)
    assert set(HEAD_CLASSES.items()) <= set(ESTIMATOR_CLASSES.items())


@pytest.mark.parametrize("name", sorted(HEAD_CLASSES))
def test_a_reloaded_model_predicts_bit_identically(name, data, fitted, monkeypatch):
    X, Y, genes = data
    in_memory, root = fitted
    folder = root / name
    assert not pickle_files(folder)
    assert (folder / ARRAYS_FILE).is_file() and not (folder / LEGACY_FILE).exists()
    # no file the fit wrote is a pickle, and loading never unpickles: every unpickler is booby-trapped
    for trap in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, trap, _explode)
    monkeypatch.setattr(joblib, "load", _explode)
    monkeypatch.setattr(torch, "load", _explode)
    loaded = load_model(folder)
    monkeypatch.undo()
    refit = in_memory[name]
    np.testing.assert_array_equal(loaded.predict(X[96:]), refit.predict(X[96:]))
    a, b = predict_uncertain(loaded, X[96:], interval=0.9), predict_uncertain(refit, X[96:], interval=0.9)
    for part in ("mean", "std", "lower", "upper"):
        assert (getattr(a, part) is None) == (getattr(b, part) is None)
        if getattr(a, part) is not None:
            np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
    assert loaded.genes == genes and loaded.config["head"] == name


def _explode(*args, **kwargs):
    raise AssertionError("a model load unpickled something")


def test_wrapped_heads_and_unfitted_heads_round_trip(data, tmp_path):
    X, Y, _ = data
    model = FeatureReduced(TargetTransformed(make_head("ridge"), "log1p+robust"), n_components=4).fit(X[:96], Y[:96])
    save_head(model, tmp_path / "fr")
    np.testing.assert_array_equal(load_head(tmp_path / "fr").predict(X[96:]), model.predict(X[96:]))
    save_head(make_head("mlp", hidden=(32, 16)), tmp_path / "unfitted")
    assert load_head(tmp_path / "unfitted").get_params() == make_head("mlp", hidden=(32, 16)).get_params()


def _planted(path, marker):
    """Pickle bytes that create ``marker`` when loaded (through ``builtins.exec``, as an attack would)."""
    class Attack:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))
    buffer = io.BytesIO()
    pickle.dump(Attack(), buffer, protocol=4)
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize("where", [CONFIG_FILE, ARRAYS_FILE, "model.json", "weights.bin", "lightgbm/x.txt", LEGACY_FILE])
def test_a_planted_pickle_is_refused_and_never_runs(where, fitted_folders, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(fitted_folders / "gbm", folder)
    marker = tmp_path / "PWNED"
    (folder / where).parent.mkdir(exist_ok=True)
    _planted(folder / where, marker)
    assert looks_like_pickle(folder / where)
    with pytest.raises(ModelError, match="pickle"):
        load_model(folder)
    with pytest.raises(ModelError, match="pickle"):
        load_model(folder, trust_pickle=True)         # a model folder in the new format never loads a pickle
    assert not marker.exists()


def test_an_old_pickled_model_needs_trust_and_its_classes_are_restricted(data, fitted_folders, tmp_path):
    X, _, _ = data
    old = tmp_path / "old"
    old.mkdir()
    model = load_model(fitted_folders / "ridge")
    _write_old_joblib(model, old / LEGACY_FILE)
    with pytest.raises(ModelError, match="runs any code.*--trust-pickle.*convert-model"):
        load_model(old)
    np.testing.assert_array_equal(load_model(old, trust_pickle=True).predict(X[96:]), model.predict(X[96:]))
    # even trusted, an old file may name only hexpr's and its libraries' classes
    marker = tmp_path / "PWNED"
    _planted(old / LEGACY_FILE, marker)
    with pytest.raises(ModelError, match="no hexpr model holds"):
        load_model(old, trust_pickle=True)
    assert not marker.exists()


def _write_old_joblib(model, path):
    """``model`` pickled as hexpr wrote it before the hexpr namespace: classes under heads.*, not hexpr.heads.*
    (protocol 0 names modules as text, so the old paths can be written in)."""
    buffer = io.BytesIO()
    joblib.dump(model, buffer, protocol=0)
    data = buffer.getvalue()
    assert b"chexpr.heads." in data
    path.write_bytes(data.replace(b"chexpr.heads.", b"cheads."))


def test_old_module_paths_map_into_the_namespace():
    assert current_module("heads.ridge") == "hexpr.heads.ridge"
    assert current_module("embedder.backbones") == "hexpr.embedder.backbones"
    assert current_module("numpy.core.multiarray") == "numpy.core.multiarray"


def _edit_config(folder, change):
    config = json.loads((folder / CONFIG_FILE).read_text())
    change(config)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / ARRAYS_FILE).write_bytes((f / ARRAYS_FILE).read_bytes()[:-8] + b"\0" * 8), "checksum mismatch"),
    (lambda f: _edit_config(f, lambda c: c.update(extra_key=1)), "unknown key"),
    (lambda f: _edit_config(f, lambda c: c.update(schema_version=99)), "schema version 99.*pip install -U hexpr"),
    (lambda f: _edit_config(f, lambda c: c["content"]["model"].update({"@estimator": "os_system"})), "does not know"),
    (lambda f: _edit_config(f, lambda c: c["content"]["model"]["params"].update(alhpa=1)), "cannot be rebuilt"),
    (lambda f: _edit_config(f, lambda c: c["content"].update(genes={"@pickle": "x"})), "unknown key"),
    (lambda f: (f / CONFIG_FILE).write_text("{not json"), "not a readable hexpr model config"),
])
def test_tampered_files_and_configs_are_one_clear_error(damage, message, fitted_folders, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(fitted_folders / "ridge", folder)
    damage(folder)
    with pytest.raises(ModelError, match=message):
        load_model(folder)


def test_pickle_detection_reads_big_files_by_their_start(tmp_path):
    joblib.dump({"weights": np.zeros(400_000)}, tmp_path / "big.joblib")            # > 1 MB: judged by its first MB
    torch.save({"w": torch.zeros(10)}, tmp_path / "model.pt")                        # a zip holding data.pkl
    (tmp_path / "trees.txt").write_text("tree\nversion=v4\nnum_class=1\n" * 60_000)   # LightGBM-like text, > 1 MB
    (tmp_path / "table.csv").write_text("ID,G0\n" + "spot,1.0\n" * 10)
    assert looks_like_pickle(tmp_path / "big.joblib") and looks_like_pickle(tmp_path / "model.pt")
    assert not looks_like_pickle(tmp_path / "trees.txt") and not looks_like_pickle(tmp_path / "table.csv")


def test_units_come_from_the_import_records(tmp_path):
    from types import SimpleNamespace

    import anndata as ad

    from hexpr.workflow.model_card import UNKNOWN_UNITS, units_of

    (tmp_path / "st").mkdir()
    adata = ad.AnnData(np.zeros((2, 2), np.float32))
    adata.uns["hexpr_import"] = {"normalization": "log1p_cp10k", "technology": "10x Visium"}
    adata.write_h5ad(tmp_path / "st" / "s1.h5ad")
    units = units_of(SimpleNamespace(source=tmp_path))
    assert units["units"].startswith("log1p(counts per 10,000)") and units["platforms"] == ["10x Visium"]
    assert units_of(SimpleNamespace(source=tmp_path / "elsewhere" / "data.csv"))["units"] == UNKNOWN_UNITS
