"""Features for heads: the cached embeddings of several backbones, concatenated and aligned by id."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import numpy as np

from hexpr.embedder.backbones import BackboneSpec
from hexpr.embedder.cache import DEFAULT_CACHE_DIR, CacheError, load_aligned
from hexpr.embedder.context import check_context, context_datasets, format_um
from hexpr.embedder.datasets import PatchDataset
from hexpr.embedder.extract import embed_dataset


@dataclass
class FeatureSet:
    ids: list[str]
    X: np.ndarray  # (N, D) float32
    blocks: list[dict]  # per backbone: key, path, spec, identity, start, stop
    tta: bool = False
    warnings: list[str] = field(default_factory=list)
    context_um: tuple = ()  # context scales (µm) whose blocks follow the patch's own, in this order

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
            "context_um": [float(s) for s in self.context_um],
        }

    def select(self, labels: list[str]) -> "FeatureSet":
        """Only the blocks of the named backbones (by spec label or name), in the given order."""
        if self.context_um:
            raise CacheError("choosing backbones from features with context scales is not supported; "
                             "fit each backbone with --context-um on its own")
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


def _embedded(dataset: PatchDataset, specs: list[BackboneSpec], cache_dir, tta: bool, **embed_options) -> FeatureSet:
    entries = embed_dataset(dataset, specs, cache_dir, tta=tta, **embed_options)
    incomplete = [e for e in entries if not e.exists()]
    if incomplete:
        raise CacheError(f"embedding stopped before finishing {[e.spec.label for e in incomplete]}; the finished chunks are "
                         f"kept in {', '.join(str(e.partial_dir) for e in incomplete)}: run again to resume")
    X, blocks = load_aligned([e.path for e in entries], dataset.ids)
    return FeatureSet(dataset.ids, X, blocks, tta)


def ensure_features(dataset: PatchDataset, specs: list[BackboneSpec], cache_dir=DEFAULT_CACHE_DIR, *, tta: bool = False,
                    context_um=(), context_why: str = "context (--context-um)", **embed_options) -> FeatureSet:
    """Embed what is missing from the cache, then return the features aligned to ``dataset.ids``.

    ``context_um``: context scales (µm); each adds, after the patch's own features, the features of
    a square of that size around the same centre cut from the source slide (``embedder.context``),
    embedded with the same backbones and TTA and cached under its own key."""
    scales = check_context(dataset, context_um, context_why)   # a bad size or no source image: before any work
    features = _embedded(dataset, specs, cache_dir, tta, **embed_options)
    return with_context_scales(features, dataset, specs, scales, cache_dir, tta=tta, why=context_why,
                               **embed_options) if scales else features


def with_context_scales(features: FeatureSet, dataset: PatchDataset, specs: list[BackboneSpec], scales, cache_dir=DEFAULT_CACHE_DIR,
                        *, tta: bool = False, why: str = "context (--context-um)", **embed_options) -> FeatureSet:
    """``features`` (of the patches alone) with one block per backbone and context scale appended,
    scale by scale in the order given; each block records its scale (``context_um``) and how many
    of its squares were padded at an image edge (``n_padded``)."""
    if features.context_um:
        raise CacheError(f"these features already hold context scales {format_um(features.context_um)} µm")
    columns, blocks, start = [features.X], list(features.blocks), features.n_features
    regions = context_datasets(dataset, scales, why)
    try:
        for region, record in regions:
            scale = _embedded(region, specs, cache_dir, tta, **embed_options)
            for b in scale.blocks:
                width = b["stop"] - b["start"]
                blocks.append({**b, "kind": "context_scale", **record, "start": start, "stop": start + width,
                               "identity": {**b["identity"], "context_um": record["context_um"],
                                            "context_px": record["context_px"]}})
                start += width
            columns.append(scale.X)
    finally:
        for region, _ in regions:
            region.close()
    return FeatureSet(features.ids, np.concatenate(columns, axis=1), blocks, features.tta, features.warnings,
                      tuple(float(s) for s in scales))


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
    if [float(s) for s in meta.get("context_um") or []] != [float(s) for s in features.context_um]:
        raise CacheError(f"{model_path} was fitted with context scales [{format_um(meta.get('context_um') or [])}] µm, "
                         f"but these features have [{format_um(features.context_um)}] µm; refit, or embed the same scales")
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
                      features.tta, features.warnings, features.context_um)


MIN_CENTRING_ROWS = 30   # fewer spots than this per slide: its mean embedding is a rough estimate (a warning says so)


def centre_per_slide(features: FeatureSet, groups) -> FeatureSet:
    """Each slide's mean feature vector subtracted from its rows (``groups``: one slide label per row;
    None: all rows are one slide).

    Removes what shifts every spot of a slide alike (stain, scanner, section thickness) before a head
    sees the features; predictions then vary within each slide around the training mean. The mean is
    the slide's own, from its images alone, so it is the same at fit and predict time and needs no
    measured expression."""
    X = np.asarray(features.X, dtype=np.float32).copy()
    labels = np.zeros(len(X), dtype=int) if groups is None else np.asarray(groups)
    small = []
    for label in np.unique(labels):
        rows = labels == label
        X[rows] -= X[rows].mean(axis=0, dtype=np.float64).astype(np.float32)
        if rows.sum() < MIN_CENTRING_ROWS:
            small.append(f"{label} ({int(rows.sum())})")
    notes = list(features.warnings)
    if small:
        notes.append(f"slide centring: {', '.join(small[:5])}{' ...' if len(small) > 5 else ''} "
                     f"{'has' if len(small) == 1 else 'have'} fewer than {MIN_CENTRING_ROWS} spots, so the slide "
                     "mean is a rough estimate; give all of a slide's spots in one call")
    return FeatureSet(features.ids, X, features.blocks, features.tta, notes, features.context_um)


def with_slide_centring(features: FeatureSet, dataset: PatchDataset, centre: bool) -> FeatureSet:
    """``features`` centred per slide of ``dataset`` (``centre_per_slide``); unchanged when not ``centre``."""
    if not centre:
        return features
    centred = centre_per_slide(features, None if dataset.groups is None else dataset.groups.to_numpy())
    for note in centred.warnings[len(features.warnings):]:
        warnings.warn(note, stacklevel=2)
    return centred


def with_dataset_context(features: FeatureSet, dataset: PatchDataset, neighbours: int) -> FeatureSet:
    """``features`` with the mean embedding of each spot's ``neighbours`` nearest spots of the same
    group appended (the dataset's coordinates and groups); unchanged when ``neighbours`` is 0."""
    if not neighbours:
        return features
    groups = None if dataset.groups is None else dataset.groups.to_numpy()
    return add_neighbour_context(features, dataset.coords, groups, neighbours)
