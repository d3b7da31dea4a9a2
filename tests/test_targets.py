import numpy as np
import pytest

from hexpr.heads.model_files import load_head, save_head
from hexpr.heads import TargetTransformed, make_head, make_transform
from hexpr.heads.targets import TRANSFORMS

RNG = np.random.default_rng(0)
Y = np.abs(RNG.gamma(2.0, 1.5, size=(60, 7)))
Y[:, 3] = 0.0                                   # a constant (all-zero) gene
Y[:40, 4] = 0.0                                 # a mostly-zero gene: zero IQR
ALL_NAMES = list(TRANSFORMS) + ["log1p+standardize", "log1p+minmax", "robust+minmax"]


def _clipped_by_robust(Y):
    from hexpr.heads.targets import Robust
    t = Robust(clip=None).fit(Y)
    return np.abs(t.transform(Y)) > 5.0


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_transform_inverts_exactly(name):
    data = Y
    if "robust" in name:   # robust clips beyond 5 IQR on purpose; invert on the unclipped genes
        data = Y[:, ~_clipped_by_robust(Y).any(axis=0)]
        assert data.shape[1] >= 5
    t = make_transform(name).fit(data)
    Z = t.transform(data)
    assert Z.shape == data.shape and np.isfinite(Z).all()
    np.testing.assert_allclose(t.inverse_transform(Z), data, rtol=1e-12, atol=1e-12)


def test_robust_without_clipping_inverts_every_gene_exactly():
    from hexpr.heads.targets import Robust
    t = Robust(clip=None).fit(Y)
    np.testing.assert_allclose(t.inverse_transform(t.transform(Y)), Y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_inverse_then_transform_is_identity_on_new_values(name):
    t = make_transform(name).fit(Y)
    Z = t.transform(Y[:10] * 0.9 + 0.05)
    np.testing.assert_allclose(t.transform(t.inverse_transform(Z)), Z, rtol=1e-10, atol=1e-10)


def test_transform_statistics():
    assert np.allclose(make_transform("minmax").fit_transform(Y[:, [0, 1]]).min(axis=0), 0)
    assert np.allclose(make_transform("minmax").fit_transform(Y[:, [0, 1]]).max(axis=0), 1)
    Z = make_transform("standardize").fit_transform(Y[:, [0, 1]])
    assert np.allclose(Z.mean(axis=0), 0) and np.allclose(Z.std(axis=0), 1)
    Z = make_transform("robust").fit_transform(Y[:, [0, 1]])
    assert np.allclose(np.median(Z, axis=0), 0)


def test_robust_clips_outliers_only():
    Yo = Y[:, :4].copy()
    Yo[0, 0] = 1e6
    t = make_transform("robust").fit(Yo)
    Z = t.transform(Yo)
    assert Z[0, 0] == pytest.approx(5.0)
    np.testing.assert_allclose(t.inverse_transform(Z)[1:], Yo[1:], rtol=1e-12, atol=1e-12)


def test_log1p_refuses_values_at_or_below_minus_one():
    with pytest.raises(ValueError, match="log1p"):
        make_transform("log1p").fit_transform(Y - 5)


def test_unknown_transform_lists_choices():
    with pytest.raises(ValueError, match="minmax"):
        make_transform("zscore")


def test_wrong_gene_count_is_refused():
    t = make_transform("standardize").fit(Y)
    with pytest.raises(ValueError, match="7 genes"):
        t.transform(Y[:, :3])


@pytest.mark.parametrize("name", ["log1p", "standardize", "minmax", "robust"])
def test_target_transformed_predicts_in_input_scale(name, tmp_path):
    X = RNG.standard_normal((60, 5))
    model = TargetTransformed(make_head("mean"), name).fit(X, Y)
    expected = model.transform_.inverse_transform(model.transform_.transform(Y).mean(axis=0, keepdims=True))
    np.testing.assert_allclose(model.predict(X[:3]), np.repeat(expected, 3, axis=0), rtol=1e-12)
    save_head(model, tmp_path / "m")
    loaded = load_head(tmp_path / "m")
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
