import numpy as np
import pytest
import torch
from test_heads import synthetic_expression

from hexpr.heads.model_files import load_head, save_head
from hexpr.heads import TargetTransformed, make_head
from hexpr.heads.cv import score_with_panels, training_panels
from hexpr.heads.metrics import pearson_per_gene
from hexpr.heads.mlp import LOSSES, MLPHead

SMALL = {"hidden": [16], "epochs": 6, "device": "cpu", "batch_size": 32, "n_threads": 1}


@pytest.fixture(scope="module")
def data():
    X, Y, _ = synthetic_expression(160, 10, 15, rank=3, n_dominant=2, noise=0.3, seed=3)
    return X[:120], Y[:120], X[120:], Y[120:]


def test_same_seed_same_model_and_global_rng_untouched(data):
    X, Y, X_test, _ = data
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = make_head("mlp", seed=5, **SMALL).fit(X, Y).predict(X_test)
    after = torch.rand(3)
    b = make_head("mlp", seed=5, **SMALL).fit(X, Y).predict(X_test)
    c = make_head("mlp", seed=6, **SMALL).fit(X, Y).predict(X_test)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert torch.equal(before, after)      # fitting did not consume the caller's RNG


def test_same_seed_same_model_with_two_threads(data):
    X, Y, X_test, _ = data
    a = make_head("mlp", seed=1, **{**SMALL, "n_threads": 2}).fit(X, Y).predict(X_test)
    b = make_head("mlp", seed=1, **{**SMALL, "n_threads": 2}).fit(X, Y).predict(X_test)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains(loss, data):
    X, Y, X_test, Y_test = data
    head = make_head("mlp", loss=loss, **{**SMALL, "epochs": 10, "lr": 1e-2}).fit(X, Y)
    assert np.isfinite(head.predict(X_test)).all()
    assert pearson_per_gene(head.predict(X_test), Y_test).mean() > 0.3
    assert all(np.isfinite(r["train_loss"]) for r in head.history_)


def test_early_stopping_keeps_best_validation_epoch(data):
    X, Y, _, _ = data
    head = make_head("mlp", patience=2, **{**SMALL, "epochs": 40, "lr": 1e-2}).fit(X, Y)
    scores = [r["val_score"] for r in head.history_]
    assert head.best_val_score_ == pytest.approx(max(scores))
    assert head.best_epoch_ == int(np.argmax(scores)) + 1
    assert len(head.history_) <= 40


def test_given_validation_data_is_used(data):
    X, Y, X_test, Y_test = data
    head = TargetTransformed(make_head("mlp", **SMALL), "standardize")
    head.fit(X, Y, X_val=X_test, Y_val=Y_test)
    inner = head.head_
    assert len(inner.history_) >= 1 and "val_score" in inner.history_[0]
    assert inner.features_.mean_.shape == (X.shape[1],)


def test_validation_score_is_the_challenge_score_in_target_scale(data):
    X, Y, X_test, Y_test = data
    model = TargetTransformed(make_head("mlp", **SMALL), "log1p").fit(X, Y, X_val=X_test, Y_val=Y_test)
    terms = score_with_panels(model.predict(X_test), Y_test, training_panels(Y, 50))
    raw = (terms["mean_corr_cells"] + terms["max_corr_genes"] + terms["heg_corr"] + terms["hvg_corr"]) / 4
    assert model.head_.best_val_score_ == pytest.approx(raw, abs=1e-6)


def test_no_validation_runs_all_epochs(data):
    X, Y, _, _ = data
    head = make_head("mlp", val_fraction=0, **SMALL).fit(X, Y)
    assert len(head.history_) == SMALL["epochs"] and head.best_val_score_ is None


def test_bad_options_are_clear_errors(data):
    X, Y, _, _ = data
    with pytest.raises(ValueError, match="loss must be one of 'mse'"):
        make_head("mlp", loss="l7", **SMALL).fit(X, Y)
    with pytest.raises(ValueError, match="pearson_axis"):
        make_head("mlp", pearson_axis="diag", **SMALL).fit(X, Y)
    with pytest.raises(ValueError, match="epochs=0 is not accepted"):  # a head built directly is checked by fit
        MLPHead(epochs=0).fit(X, Y)


def test_saved_mlp_holds_torch_state_and_predicts_identically(data, tmp_path):
    X, Y, X_test, _ = data
    head = make_head("mlp", hidden="16,8", **{k: v for k, v in SMALL.items() if k != "hidden"}).fit(X, Y)
    state = head.__getstate__()
    assert "net_" not in state and set(state["_torch_state"]) == {"net_"}
    save_head(head, tmp_path / "mlp")
    loaded = load_head(tmp_path / "mlp")
    np.testing.assert_array_equal(loaded.predict(X_test), head.predict(X_test))
