"""Features for heads: the cached embeddings of several backbones, concatenated and aligned by id."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import numpy as np

from hexpr.embedder.backbones import BackboneSpec
from hexpr.embedder.cache import DEFAULT_CACHE_DIR, CacheError, load_aligned
from hexpr.embedder.datasets import PatchDataset
from hexpr.embedder.extract import embed_dataset


@dataclass
class FeatureSet:
    ids: list[str]
    X: np.ndarray  # (N, D) float32
    blocks: list[dict]  # per backbone: key, path, spec, identity, start, stop
    tta: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    def meta(self) -> dict:
        """What a head fitted on these features must see again at predict time."""
        return {
            "backbones": [b["spec"] for b in self.blocks if b.get("kind", "backbone") == "backbone"],
            "identities": [b["identity"] for b in self.blocks],
            "weights_sha256": [b.get("weights_sha256", "") for b in self.blocks],   # what the model card shows
            "widths": [b["stop"] - b["start"] for b in self.blocks],
            "cache_keys": [b["key"] for b in self.blocks],
            "tta": self.tta,
            "n_features": self.n_features,
        }

    def select(self, labels: list[str]) -> "FeatureSet":
        """Only the blocks of the named backbones (by spec label or name), in the given order."""
        chosen = []
        for label in labels:
            match = [b for b in self.blocks if BackboneSpec.from_dict(b["spec"]).label == label or b["spec"]["name"] == label]
            if not match:
                raise CacheError(f"backbone {label!r} is not among {[b['spec']['name'] for b in self.blocks]}")
            chosen.append(match[0])
        columns, blocks, start = [], [], 0
        for b in chosen:
            columns.append(self.X[:, b["start"]:b["stop"]])
            stop = start + b["stop"] - b["start"]
            blocks.append({**b, "start": start, "stop": stop})
            start = stop
        return FeatureSet(self.ids, np.concatenate(columns, axis=1), blocks, self.tta, self.warnings)


def ensure_features(dataset: PatchDataset, specs: list[BackboneSpec], cache_dir=DEFAULT_CACHE_DIR, *, tta: bool = False, **embed_options) -> FeatureSet:
    """Embed what is missing from the cache, then return the features aligned to ``dataset.ids``."""
    entries = embed_dataset(dataset, specs, cache_dir, tta=tta, **embed_options)
    incomplete = [e for e in entries if not e.exists()]
    if incomplete:
        raise CacheError(f"embedding stopped before finishing {[e.spec.label for e in incomplete]}; the finished chunks are "
                         f"kept in {', '.join(str(e.partial_dir) for e in incomplete)}: run again to resume")
    X, blocks = load_aligned([e.path for e in entries], dataset.ids)
    return FeatureSet(dataset.ids, X, blocks, tta)


def specs_from_meta(meta: dict) -> list[BackboneSpec]:
    return [BackboneSpec.from_dict(d) for d in meta["backbones"]]


def check_features_match(features: FeatureSet, meta: dict, model_path: str = "the model") -> None:
    """Refuse features that were not made the way the head's training features were: a backbone whose
    weights checksum (identity) differs is an error; a model that records no identities (edited or
    hand-made) is checked by width only, with a warning."""
    if not meta.get("identities"):
        warnings.warn(f"{model_path} records no backbone checksums: the weights cannot be checked, only the feature "
                      "width; make sure the backbones and weights are the ones it was trained with", stacklevel=2)
        if features.n_features != meta.get("n_features", features.n_features):
            raise CacheError(f"{model_path} expects {meta['n_features']} features, got {features.n_features}")
        return
    expected = [json.dumps(i, sort_keys=True) for i in meta["identities"]]
    got = [json.dumps(b["identity"], sort_keys=True) for b in features.blocks]
    if expected != got or bool(features.tta) != bool(meta.get("tta", False)):
        raise CacheError(
            f"{model_path} was fitted on features from {expected} (tta={meta.get('tta')}), but these features come "
            f"from {got} (tta={features.tta}). Embed with the same backbones, weights and preprocessing, or refit."
        )
    if features.n_features != meta["n_features"]:
        raise CacheError(f"{model_path} expects {meta['n_features']} features, got {features.n_features}")


def add_neighbour_context(features: FeatureSet, coords, groups, k: int) -> FeatureSet:
    """Append the mean features of each spot's ``k`` nearest spots (same slide/group, self excluded).

    Spatial context in the spirit of TRIPLEX's neighbourhood branch, computed from cached
    embeddings alone. ``coords`` are pixel centres (N, 2); ``groups`` keeps slides apart.
    """
    from sklearn.neighbors import NearestNeighbors

    if coords is None:
        raise CacheError("neighbour context needs spot coordinates (x, y columns, or HEST coords); this dataset has none")
    coords = np.asarray(coords, dtype=np.float64)
    groups = np.zeros(len(coords)) if groups is None else np.asarray(groups)
    context = np.zeros_like(features.X)
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        n_neighbours = min(k, len(rows) - 1)
        if n_neighbours < 1:
            context[rows] = features.X[rows]
            continue
        index = NearestNeighbors(n_neighbors=n_neighbours + 1).fit(coords[rows])
        _, neighbours = index.kneighbors(coords[rows])
        context[rows] = features.X[rows[neighbours[:, 1:]]].mean(axis=1)
    width = features.n_features
    block = {"kind": "context", "key": f"neighbour-mean-k{k}", "path": "", "spec": {"name": f"neighbour_mean_k{k}"},
             "identity": {"neighbour_mean_k": k}, "start": width, "stop": 2 * width}
    return FeatureSet(features.ids, np.concatenate([features.X, context], axis=1), features.blocks + [block],
                      features.tta, features.warnings)


def with_dataset_context(features: FeatureSet, dataset: PatchDataset, neighbours: int) -> FeatureSet:
    """``features`` with the mean embedding of each spot's ``neighbours`` nearest spots of the same
    group appended (the dataset's coordinates and groups); unchanged when ``neighbours`` is 0."""
    if not neighbours:
        return features
    groups = None if dataset.groups is None else dataset.groups.to_numpy()
    return add_neighbour_context(features, dataset.coords, groups, neighbours)
