
import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from hexpr.heads import HEADS, FeatureReduced, TargetTransformed, default_search_space, make_head
from hexpr.heads.base import HEAD_CLASSES
from hexpr.heads.ensemble import simplex_weights
from hexpr.heads.metrics import pearson_per_gene
from hexpr.heads.model_files import load_head, save_head
from hexpr.heads.ridge import RidgeHead
from hexpr.heads.synthetic import synthetic_expression

# small settings; torch heads on one thread (tiny tensors run far faster than on two busy cores)
FAST = {
    "mean": {},
    "ridge": {},
    "hest": {"n_components": 8},
    "mlp": {"hidden": [32], "epochs": 40, "lr": 3e-3, "device": "cpu", "n_threads": 1},
    "gbm": {"n_components": 4, "n_estimators": 60, "min_child_samples": 5},
    "knn": {"k": 10},
    "bleep": {"dim": 16, "epochs": 12, "batch_size": 90, "lr": 1e-2, "device": "cpu", "n_threads": 1},
    "ensemble": {"members": ["ridge", "knn"], "n_folds": 2},
    "ridge_streamed": {},
    "mlp_streamed": {"hidden": [32], "epochs": 40, "lr": 3e-3, "device": "cpu", "n_threads": 1, "chunk_rows": 64},
}


@pytest.fixture(scope="module")
def planted():
    X, Y, _ = synthetic_expression(240, 12, 20, rank=3, n_dominant=2, noise=0.3, seed=7)
    return X[:180], Y[:180], X[180:], Y[180:]


def test_registry_lists_every_head_with_its_class():
    assert set(FAST) <= set(HEAD_CLASSES)
    assert set(HEADS) == set(HEAD_CLASSES)          # make_head can load every registered head lazily
    for name, where in HEAD_CLASSES.items():
        assert f"{HEADS[name].__module__}:{HEADS[name].__qualname__}" == where
        assert HEADS[name].name == name == make_head(name).name
    for name in HEADS:
        assert isinstance(default_search_space(name), dict)
    assert FeatureReduced.name == ""                 # a head class that is not in the table


def test_unknown_head_and_parameter_are_clear_errors():
    with pytest.raises(ValueError, match="unknown head 'svm'"):
        make_head("svm")
    with pytest.raises(ValueError, match="no parameter.*alhpa"):
        make_head("ridge", alhpa=3)


@pytest.mark.parametrize("name", sorted(FAST))
def test_head_recovers_planted_signal_and_round_trips(name, planted, tmp_path):
    X, Y, X_test, Y_test = planted
    head = make_head(name, **FAST[name]).fit(X, Y)
    pred = head.predict(X_test)
    assert pred.shape == Y_test.shape and np.isfinite(pred).all()
    r = pearson_per_gene(pred, Y_test).mean()
    if name == "mean":
        assert r == 0.0
    else:
        assert r > 0.4, f"{name} mean per-gene r {r:.3f} too close to the mean head (0)"
    save_head(head, tmp_path / name)
    loaded = load_head(tmp_path / name)
    np.testing.assert_array_equal(loaded.predict(X_test), pred)
    with pytest.raises(ValueError, match="X has 11 features, but .* is expecting 12 .* fitted on 12 features but X has 11"):
        loaded.predict(X_test[:, :11])


def test_unfitted_head_refuses_to_predict():
    with pytest.raises(NotFittedError, match="not fitted"):
        make_head("ridge").predict(np.zeros((2, 3)))
    with pytest.raises(RuntimeError, match="not fitted"):    # also a hexpr ModelError
        make_head("mlp").predict(np.zeros((2, 3)))


def test_ridge_loo_matches_brute_force(planted):
    X, Y, _, _ = planted
    X, Y = X[:40], Y[:40, :3]
    alphas = [0.1, 10.0, 1000.0]
    head = RidgeHead(alphas=alphas, alpha_selection="loo").fit(X, Y)
    brute = np.zeros((len(alphas), Y.shape[1]))
    for i in range(len(X)):
        keep = np.arange(len(X)) != i
        for a, alpha in enumerate(alphas):
            # the same standardization as the head, fitted on all rows (the closed form's assumption)
            Z = head.features_.transform(X)
            ridge = Ridge(alpha=alpha).fit(Z[keep], Y[keep])
            brute[a] += (ridge.predict(Z[i:i + 1])[0] - Y[i]) ** 2 / len(X)
    np.testing.assert_allclose(head.cv_errors_, brute.min(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(head.alpha_, np.asarray(alphas)[brute.argmin(axis=0)])


def test_ridge_per_gene_alpha_adapts_to_noise():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 10))
    signal = X @ rng.standard_normal(10)
    Y = np.column_stack([signal, signal + 20 * rng.standard_normal(200)])
    head = make_head("ridge").fit(X, Y)
    assert head.alpha_[0] < head.alpha_[1]


def test_ridge_coefficients_equal_sklearn_at_chosen_alpha(planted):
    X, Y, X_test, _ = planted
    head = make_head("ridge").fit(X, Y)
    Z = head.features_.transform(X)
    for g in (0, 5):
        ref = Ridge(alpha=head.alpha_[g]).fit(Z, Y[:, g])
        np.testing.assert_allclose(head.predict(X_test)[:, g],
                                   ref.predict(head.features_.transform(X_test)), rtol=1e-8, atol=1e-8)


def test_hest_recipe_matches_sklearn_pipeline(planted):
    X, Y, X_test, _ = planted
    X, X_test = X.astype(np.float64), X_test.astype(np.float64)
    head = make_head("hest", n_components=8, solver="svd").fit(X, Y)
    scaler = StandardScaler().fit(X)
    pca = PCA(8).fit(scaler.transform(X))
    alpha = 100 / (8 * Y.shape[1])
    assert head.alpha_ == pytest.approx(alpha)
    ridge = Ridge(alpha=alpha, fit_intercept=False, solver="svd").fit(pca.transform(scaler.transform(X)), Y)
    ref = ridge.predict(pca.transform(scaler.transform(X_test)))
    # the recipe has no intercept; the head centres the targets and adds the mean back
    np.testing.assert_allclose(head.predict(X_test) - Y.mean(axis=0), ref, rtol=1e-8, atol=1e-8)


def test_feature_reduced_wraps_any_head(planted, tmp_path):
    X, Y, X_test, Y_test = planted
    model = FeatureReduced(make_head("knn", k=10), n_components=5).fit(X, Y)
    assert model.step_.n_output_ == 5
    assert pearson_per_gene(model.predict(X_test), Y_test).mean() > 0.3
    save_head(model, tmp_path / "fr")
    np.testing.assert_array_equal(load_head(tmp_path / "fr").predict(X_test), model.predict(X_test))


def test_transforms_compose_with_every_trained_head(planted):
    X, Y, X_test, Y_test = planted
    for name in ("ridge", "knn", "gbm"):
        model = TargetTransformed(make_head(name, **FAST[name]), "log1p+minmax").fit(X, Y)
        pred = model.predict(X_test)
        assert pearson_per_gene(pred, Y_test).mean() > 0.4
        assert abs(pred.mean() - Y_test.mean()) < 0.5 * Y_test.std()   # back in input scale


def test_simplex_weights_pick_the_useful_member():
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((50, 4))
    good, bad = Y + 0.1 * rng.standard_normal(Y.shape), rng.standard_normal(Y.shape)
    w = simplex_weights([bad, good], Y)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0) and w[1] > 0.9


def test_ensemble_weights_are_a_convex_combination(planted):
    X, Y, _, _ = planted
    model = make_head("ensemble", members=["mean", ("ridge", {})], n_folds=2).fit(X, Y)
    assert model.weights_.min() >= 0 and model.weights_.sum() == pytest.approx(1.0)
    assert model.weights_[1] > model.weights_[0]
    groups = np.repeat(np.arange(3), 60)
    assert make_head("ensemble", n_folds=5).fit(X, Y, groups=groups).weights_.sum() == pytest.approx(1.0)


def test_every_head_parameter_declares_what_it_accepts_and_defaults_pass():
    from hexpr.heads.base import registered_heads
    from hexpr.heads.params import param_problems

    for name, cls in registered_heads().items():
        defaults = cls().get_params(deep=False)
        assert set(defaults) == set(cls.param_constraints), name
        assert param_problems(name, cls.param_constraints, defaults) == [], name


def test_feature_pca_seed_drives_the_randomized_solver(planted):
    from hexpr.heads.base import FeaturePCA

    X = planted[0]
    exact = FeaturePCA(3).fit(X)
    assert not exact.uses_seed
    np.testing.assert_array_equal(FeaturePCA(3, seed=1).fit(X).components_, exact.components_)
    fast = {s: FeaturePCA(3, seed=s, svd_solver="randomized").fit(X) for s in (0, 1)}
    assert fast[0].uses_seed
    # the same leading axes as the exact solve (planted rank 3), up to the solver's tolerance
    np.testing.assert_allclose(np.abs(np.sum(fast[0].components_ * exact.components_, axis=0)), 1.0, atol=1e-6)
    np.testing.assert_array_equal(FeaturePCA(3, seed=0, svd_solver="randomized").fit(X).components_,
                                  fast[0].components_)
    with pytest.raises(ValueError, match="svd_solver must be"):
        FeaturePCA(3, svd_solver="arpack").fit(X)


def test_seed_changes_fit_decides_what_bagging_accepts():
    assert not make_head("ridge").seed_changes_fit() and not make_head("ridge_streamed").seed_changes_fit()
    assert not make_head("hest").seed_changes_fit() and make_head("hest", solver="saga").seed_changes_fit()
    assert make_head("mlp").seed_changes_fit() and not make_head("knn").seed_changes_fit()
    from hexpr.heads.bagging import check_baggable

    with pytest.raises(ValueError, match="head='ridge' is not accepted"):
        make_head("bagged", head="ridge")
    with pytest.raises(ValueError, match="deterministic"):
        check_baggable("hest", {"n_components": 4}, 2)
    check_baggable("hest", {"solver": "saga"}, 2)       # sag/saga shuffle with the seed


def _section_data(seed=0, n_groups=4, clusters=15, dup=4, n_features=60):
    """Sections of neighbouring spots: each cluster of ``dup`` spots shares (almost) its features and
    its expression noise, as neighbouring spots of one section do. Leaving one spot out keeps its
    neighbours in the fit (so memorising the noise looks good); leaving a section out does not."""
    rng = np.random.default_rng(seed)
    n = n_groups * clusters
    cluster_X = rng.standard_normal((n, n_features))
    W = np.zeros((n_features, 6))
    W[:5] = rng.standard_normal((5, 6))
    cluster_Y = cluster_X @ W + 2.0 * rng.standard_normal((n, 6))
    cluster = np.repeat(np.arange(n), dup)
    X = cluster_X[cluster] + 0.1 * rng.standard_normal((len(cluster), n_features))
    Y = cluster_Y[cluster] + 0.1 * rng.standard_normal((len(cluster), 6))
    return X, Y, cluster // clusters


def test_ridge_grouped_alpha_is_gcv_moved_by_the_shift_held_out_sections_prefer():
    X, Y, groups = _section_data()
    alphas = list(np.logspace(-1, 5, 7))
    head = RidgeHead(alphas=alphas, alpha_selection="grouped").fit(X, Y, groups=groups)
    gcv = RidgeHead(alphas=alphas, alpha_selection="gcv").fit(X, Y)
    position = {a: i for i, a in enumerate(alphas)}
    # brute force: in each fold, each gene's GCV alpha on the other sections (RidgeHead "gcv"), moved by
    # k grid steps, scored with scikit-learn's Ridge on the held-out section
    brute = {}
    for k in range(-len(alphas) + 1, len(alphas)):
        total = 0.0
        for g in np.unique(groups):
            train, test = groups != g, groups == g
            fold_alphas = RidgeHead(alphas=alphas, alpha_selection="gcv").fit(X[train], Y[train]).alpha_
            scaler = StandardScaler().fit(X[train])   # the feature step is refitted on each fold's training rows
            for gene, alpha in enumerate(fold_alphas):
                moved = alphas[int(np.clip(position[alpha] + k, 0, len(alphas) - 1))]
                ridge = Ridge(alpha=moved).fit(scaler.transform(X[train]), Y[train][:, gene])
                total += float(((ridge.predict(scaler.transform(X[test])) - Y[test][:, gene]) ** 2).sum())
        brute[k] = total / len(X)
    best = min(brute, key=lambda k: (brute[k], abs(k)))
    assert head.alpha_selection_ == "grouped" and head.alpha_shift_ == best > 0   # more shrinkage than GCV
    assert head.shift_errors_.sum() == pytest.approx(brute[best], rel=1e-6)
    expected = [alphas[int(np.clip(position[a] + best, 0, len(alphas) - 1))] for a in gcv.alpha_]
    np.testing.assert_allclose(head.alpha_, expected)


def test_ridge_grouped_alpha_generalises_to_a_new_section_better_than_gcv():
    X, Y, groups = _section_data(n_groups=5)
    train, test = groups != 4, groups == 4
    grouped = make_head("ridge").fit(X[train], Y[train], groups=groups[train])   # "auto" with groups
    gcv = make_head("ridge", alpha_selection="gcv").fit(X[train], Y[train])
    assert grouped.alpha_selection_ == "grouped" and gcv.alpha_selection_ == "gcv"
    assert grouped.alpha_shift_ > 0 and (grouped.alpha_ > gcv.alpha_).all()   # within-section errors favour too little shrinkage
    err = {name: float(((h.predict(X[test]) - Y[test]) ** 2).mean()) for name, h in (("grouped", grouped), ("gcv", gcv))}
    assert err["grouped"] < err["gcv"]


def test_ridge_auto_alpha_without_groups_is_gcv(planted):
    X, Y, X_test, _ = planted
    auto = make_head("ridge").fit(X, Y)
    one_group = make_head("ridge").fit(X, Y, groups=np.zeros(len(X)))
    gcv = make_head("ridge", alpha_selection="gcv").fit(X, Y)
    assert auto.alpha_selection_ == one_group.alpha_selection_ == "gcv"
    np.testing.assert_array_equal(auto.predict(X_test), gcv.predict(X_test))
    np.testing.assert_array_equal(one_group.predict(X_test), gcv.predict(X_test))


def test_ridge_grouped_alpha_bad_groups(planted):
    X, Y, _, _ = planted
    with pytest.raises(ValueError, match="at least two labels"):
        make_head("ridge", alpha_selection="grouped").fit(X, Y)
    with pytest.raises(ValueError, match="one label per row"):
        make_head("ridge").fit(X, Y, groups=np.arange(5))
    with pytest.raises(ValueError, match="alpha_selection"):
        make_head("ridge", alpha_selection="kfold").fit(X, Y)


def test_ridge_grouped_shift_is_estimated_on_the_most_variable_genes(monkeypatch):
    import hexpr.heads.ridge as ridge_module

    X, Y, groups = _section_data()
    Y = Y * np.array([1.0, 5.0, 0.2, 3.0, 0.5, 2.0])          # gene variances in a known order
    monkeypatch.setattr(ridge_module, "MAX_SHIFT_GENES", 3)
    head = RidgeHead(alpha_selection="grouped").fit(X, Y, groups=groups)
    top3 = RidgeHead(alpha_selection="grouped").fit(X, Y[:, [1, 3, 5]], groups=groups)
    assert head.shift_errors_.shape == (3,) and head.alpha_.shape == (6,)
    assert head.alpha_shift_ == top3.alpha_shift_
    np.testing.assert_allclose(head.shift_errors_, top3.shift_errors_)
