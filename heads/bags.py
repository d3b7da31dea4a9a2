"""Bags: an observation measured over several patches (its sub-tiles), and how heads learn from them.

A measurement covers a region; the region is cut into sub-tiles, each embedded on its own. A head
learns so that the **mean of its sub-tile predictions** matches the region's expression, then
predicts each sub-tile alone (super-resolution). ``Bags`` says which patch belongs to which
observation: ``index[i]`` is the observation of patch ``i``. Heads see bags through one function,
``fit_on_bags``, which picks by the head's ``bag_fit`` attribute:

* ``"mean_features"`` (mean, ridge, hest): a linear head fitted on each observation's mean
  sub-tile feature. Standardization, PCA and ridge are affine, so the mean of the sub-tile
  predictions of a patch set equals the prediction of its mean feature: fitting on mean features
  *is* fitting the mean of sub-tile predictions, exactly (``aggregate`` reproduces the region's
  prediction up to float rounding; tested). The feature standardization (and PCA) is fitted on
  the sub-tiles themselves (``fit(..., subtile_features=X)``), not on the bag means: a feature
  that varies from sub-tile to sub-tile but averages out over a bag keeps its sub-tile scale, so
  the ridge penalty holds it down; and ridge's alpha is chosen for sub-tiles (``subtile_bags``:
  GCV of the bag means plus the spread of sub-tile predictions around their bag's, moved by the
  grid steps held-out groups prefer when ``fit`` gets groups). On her2st
  (README, benchmarks/superres_her2st.py) these lifted the super-resolved 2x2 ridge from 0.156
  to 0.171 and 0.198.
* ``"bag_loss"`` (mlp, and a bagged mlp): the head's ``fit`` takes ``bags=`` and trains on the
  loss of the mean of its sub-tile predictions against the target.
* None (gbm, knn, bleep, ensemble, streamed heads): no bag support; asked to fit bags, a
  ``HeadError``, never a silent fallback.

Wrappers pass the question through: a target transform (``TargetTransformed``) and seed bagging
(``SeedBagged``) support bags when their inner head does; ``FeatureReduced`` (an affine PCA step)
when its inner head fits mean features. With a non-affine target transform (log1p, robust, minmax
clipping) the mean-feature fit is the bag fit in the transformed scale; aggregates of the
predictions in the targets' scale then differ slightly from the region prediction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hexpr.heads.base import FeatureReduced, HeadError, fit_with_supported, make_head
from hexpr.heads.bagging import SeedBagged
from hexpr.heads.targets import TargetTransformed
from hexpr.heads.uncertainty import member_predictions

MEAN_FEATURES = "mean_features"
BAG_LOSS = "bag_loss"


@dataclass(frozen=True)
class Bags:
    """``index[i]``: the observation (0 .. n_obs - 1) patch ``i`` belongs to; every observation owns >= 1 patch."""

    index: np.ndarray
    n_obs: int

    @classmethod
    def from_index(cls, index, n_obs: int | None = None) -> "Bags":
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        n_obs = int(index.max()) + 1 if n_obs is None else int(n_obs)
        if index.size == 0 or index.min() < 0 or index.max() >= n_obs:
            raise HeadError(f"bag index must map every patch to an observation 0..{n_obs - 1}")
        sizes = np.bincount(index, minlength=n_obs)
        if (sizes == 0).any():
            raise HeadError(f"{int((sizes == 0).sum())} observation(s) own no patch; every observation needs >= 1 sub-tile")
        return cls(index, n_obs)

    @classmethod
    def from_labels(cls, patch_labels, obs_labels) -> "Bags":
        """Bags from each patch's observation id and the observations' ids (order of the targets)."""
        position = {str(o): i for i, o in enumerate(obs_labels)}
        missing = [str(p) for p in patch_labels if str(p) not in position]
        if missing:
            raise HeadError(f"{len(missing)} patch(es) name an observation that has no target, e.g. {missing[0]!r}")
        return cls.from_index([position[str(p)] for p in patch_labels], len(position))

    @property
    def n_patches(self) -> int:
        return int(self.index.size)

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.index, minlength=self.n_obs)

    def is_trivial(self) -> bool:
        """One patch per observation, in order: plain spots, no bags."""
        return self.n_patches == self.n_obs and bool((self.index == np.arange(self.n_obs)).all())

    def mean(self, values) -> np.ndarray:
        """(n_obs, ...) the mean of ``values`` (n_patches, ...) over each observation's patches."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape[0] != self.n_patches:
            raise HeadError(f"{values.shape[0]} rows for {self.n_patches} patches")
        flat = values.reshape(self.n_patches, -1)
        total = np.zeros((self.n_obs, flat.shape[1]))
        np.add.at(total, self.index, flat)
        return (total / self.sizes[:, None]).reshape((self.n_obs,) + values.shape[1:])

    def patch_rows(self, obs_rows) -> np.ndarray:
        """The patch rows (sorted) of the observations ``obs_rows``."""
        keep = np.zeros(self.n_obs, dtype=bool)
        keep[np.asarray(obs_rows, dtype=np.int64)] = True
        return np.flatnonzero(keep[self.index])

    def subset(self, obs_rows) -> tuple[np.ndarray, "Bags"]:
        """(patch rows, Bags over them) for the observations ``obs_rows`` (renumbered in that order)."""
        obs_rows = np.asarray(obs_rows, dtype=np.int64)
        renumber = np.full(self.n_obs, -1, dtype=np.int64)
        renumber[obs_rows] = np.arange(len(obs_rows))
        rows = self.patch_rows(obs_rows)
        return rows, Bags.from_index(renumber[self.index[rows]], len(obs_rows))


def as_bags(bags, n_obs: int | None = None) -> Bags | None:
    """``bags`` as ``Bags`` (an index array is accepted), or None when absent or trivial."""
    if bags is None:
        return None
    bags = bags if isinstance(bags, Bags) else Bags.from_index(bags, n_obs)
    return None if bags.is_trivial() else bags


# --------------------------------------------------------------------------------------------
# which heads support bags
# --------------------------------------------------------------------------------------------
def bag_support(model) -> str | None:
    """How ``model`` (a head, possibly wrapped) learns from bags: MEAN_FEATURES, BAG_LOSS or None."""
    if isinstance(model, TargetTransformed):
        return bag_support(model.head)
    if isinstance(model, SeedBagged):
        return bag_support(make_head(model.head, **dict(model.params or {})))
    if isinstance(model, FeatureReduced):
        return MEAN_FEATURES if bag_support(model.head) == MEAN_FEATURES else None
    return getattr(model, "bag_fit", None)


def head_bag_support(head: str, params=None) -> str | None:
    """``bag_support`` of head ``head`` with ``params`` (by registry name)."""
    return bag_support(make_head(head, **dict(params or {})))


def check_bag_support(head: str, params=None) -> str:
    """The bag mode of ``head``, or a HeadError naming the heads that can fit bags."""
    mode = head_bag_support(head, params)
    if mode is None:
        raise HeadError(f"head {head!r} cannot learn from bags (observations measured over several sub-tiles); "
                        f"use {', '.join(BAG_HEADS)} (or --bag N of mlp), or import without pooling / sub-tiles")
    return mode


def fit_on_bags(estimator, X, Y, bags=None, **fit_params):
    """Fit ``estimator`` so that the mean of its predictions over each bag's patches matches ``Y``.

    X: (n_patches, D); Y: (n_obs, G); bags: ``Bags`` (None or trivial: an ordinary fit)."""
    bags = as_bags(bags, np.shape(Y)[0])
    if bags is None:
        return fit_with_supported(estimator, X, Y, **fit_params)
    if np.shape(X)[0] != bags.n_patches or np.shape(Y)[0] != bags.n_obs:
        raise HeadError(f"bags of {bags.n_patches} patches / {bags.n_obs} observations do not match X with "
                        f"{np.shape(X)[0]} rows and Y with {np.shape(Y)[0]} rows")
    mode = bag_support(estimator)
    if mode == MEAN_FEATURES:   # feature scaling from the sub-tiles themselves where the head takes them
        return fit_with_supported(estimator, bags.mean(X), Y, subtile_features=np.asarray(X, dtype=np.float64),
                                  subtile_bags=bags.index, **fit_params)
    if mode == BAG_LOSS:
        return fit_with_supported(estimator, X, Y, bags=bags, **fit_params)
    name = getattr(estimator, "head", estimator)
    raise HeadError(f"{type(name).__name__ if not isinstance(name, str) else name} cannot learn from bags; "
                    f"use {', '.join(BAG_HEADS)}")


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
def aggregate(predictions, bags) -> np.ndarray:
    """Region-level predictions: the mean of the sub-tile ``predictions`` over each bag."""
    bags = bags if isinstance(bags, Bags) else Bags.from_index(bags)
    return bags.mean(predictions)


def predict_bags_with_spread(model, X, bags: Bags) -> tuple[np.ndarray, np.ndarray | None]:
    """(region predictions (n_obs, G), region-level member spread or None): each member's sub-tile
    predictions are averaged over the bag first, then the members' std is taken (in the targets' scale)."""
    mean = aggregate(np.asarray(model.predict(X), dtype=np.float64), bags)
    found = member_predictions(model, X)
    if found is None:
        return mean, None
    raw, inverse = found
    regions = np.stack([aggregate(r if inverse is None else inverse(r), bags) for r in raw])
    return mean, regions.std(axis=0)


BAG_HEADS = ("mean", "ridge", "hest", "mlp")
