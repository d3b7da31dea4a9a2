"""Every registered head is a scikit-learn regressor: sklearn's estimator checks, and the heads
inside Pipeline, GridSearchCV and cross_val_predict.

Small, fast hyper-parameters (torch heads on one thread, few epochs); the checks fit each head
many times on sklearn's own small data sets (often one target: a head then predicts 1-D).
"""
import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from hexpr.heads import HEADS, make_head
from hexpr.heads.metrics import pearson_per_gene
from hexpr.heads.synthetic import synthetic_expression

TORCH = {"device": "cpu", "n_threads": 1}
MLP = {"hidden": [16], "epochs": 30, "lr": 1e-2, "val_fraction": 0.0, **TORCH}
SMALL = {
    "mean": {},
    "ridge": {},
    "hest": {"n_components": 10},
    "mlp": MLP,
    "gbm": {"n_components": 2, "n_estimators": 30, "min_child_samples": 5, "feature_fraction": 1.0},
    "knn": {"k": 5},
    "bleep": {"dim": 8, "epochs": 5, "batch_size": 64, "lr": 1e-2, **TORCH},
    "ensemble": {"members": ["ridge", "knn"], "n_folds": 2},
    "ridge_streamed": {"chunk_rows": 64},
    "mlp_streamed": {**MLP, "chunk_rows": 64},
    "bagged": {"head": "mlp", "params": {**MLP, "epochs": 10}, "n_seeds": 2},
}

FLOAT32_BATCHING = ("float32 torch network: a row's prediction can change in its last float32 bit with the rows "
                    "it is batched with or their order (BLAS blocking differs between CPUs and thread counts), "
                    "beyond the check's 1e-7 tolerance")
# every check that predicts the same rows in other batches: a torch head can fail either on some CPU
TORCH_BATCHING = {"check_methods_subset_invariance": FLOAT32_BATCHING,
                  "check_methods_sample_order_invariance": FLOAT32_BATCHING}
# head name -> {check name: why the head cannot pass it}; heads not listed pass every check
EXPECTED_FAILURES = {
    "hest": {"check_non_transformer_estimators_n_iter":
             "max_iter is used only by Ridge's iterative solvers (lsqr, sag, ...); the default direct "
             "'cholesky' solve runs no iterations, so n_iter_ is None"},
    "mlp": TORCH_BATCHING, "mlp_streamed": TORCH_BATCHING, "bleep": TORCH_BATCHING, "bagged": TORCH_BATCHING,
}


def small_heads():
    assert set(SMALL) == set(HEADS), "give every registered head small settings here"
    return [make_head(name, **SMALL[name]) for name in sorted(SMALL)]


def expected_failed_checks(head) -> dict[str, str]:
    return EXPECTED_FAILURES.get(head.name, {})


@parametrize_with_checks(small_heads(), expected_failed_checks=expected_failed_checks)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def data():
    X, Y, _ = synthetic_expression(240, 12, 20, rank=3, n_dominant=2, noise=0.3, seed=7)
    return X, Y


@pytest.mark.parametrize("name", ["ridge", "mlp"])
def test_head_in_a_pipeline_behind_a_scaler(name, data):
    X, Y = data
    pipe = make_pipeline(StandardScaler(), make_head(name, **SMALL[name])).fit(X[:180], Y[:180])
    pred = pipe.predict(X[180:])
    assert pred.shape == (60, Y.shape[1])
    assert pearson_per_gene(pred, Y[180:]).mean() > 0.4   # the mean head scores 0
    assert pipe.score(X[180:], Y[180:]) > 0.0          # RegressorMixin.score: R^2 over genes


def test_grid_search_over_a_head_hyper_parameter(data):
    X, Y = data
    search = GridSearchCV(make_head("knn"), {"k": [1, 15]}, cv=KFold(3, shuffle=True, random_state=0)).fit(X, Y)
    assert set(search.cv_results_["param_k"]) == {1, 15}
    assert search.best_params_ == {"k": 15}             # averaging neighbours beats copying one
    assert search.best_estimator_.k == 15 and search.predict(X).shape == Y.shape


def test_cross_val_predict_gives_out_of_fold_predictions(data):
    X, Y = data
    oof = cross_val_predict(make_head("ridge"), X, Y, cv=4)
    assert oof.shape == Y.shape
    assert pearson_per_gene(oof, Y).mean() > 0.4
    in_sample = make_head("ridge").fit(X, Y).predict(X)
    assert not np.allclose(oof, in_sample)              # held-out rows were not seen by their model


def test_fit_leaves_hyper_parameters_alone_and_predict_before_fit_is_clear(data):
    X, Y = data
    head = make_head("mlp", **{**SMALL["mlp"], "hidden": "16"})
    before = head.get_params()
    with pytest.raises(NotFittedError, match="MLPHead is not fitted yet"):
        head.predict(X)
    head.fit(X, Y)
    assert head.get_params() == before


def test_one_dimensional_target_gives_one_dimensional_predictions(data):
    X, Y = data
    pred = make_head("ridge").fit(X, Y[:, 0]).predict(X)
    assert pred.shape == (X.shape[0],)
    np.testing.assert_allclose(pred, make_head("ridge").fit(X, Y[:, :1]).predict(X)[:, 0])
