"""embed: cache frozen backbone features of a dataset; the backbone specs from the command line; cache upkeep."""
from __future__ import annotations

from pathlib import Path

from hexpr.embedder.backbones import BackboneSpec
from hexpr.embedder.backbones import resolve_specs as backbone_specs
from hexpr.embedder.cache import DEFAULT_CACHE_DIR, clean_partials
from hexpr.embedder.context import parse_context_um
from hexpr.embedder.datasets import open_dataset
from hexpr.embedder.extract import check_embed_options
from hexpr.embedder.features import FeatureSet, ensure_features
from hexpr.embedder.presets import preset_rows

__all__ = ["backbone_presets", "backbone_specs", "clean_cache", "embed"]


def embed(data: str | Path, specs: list[BackboneSpec], cache_dir=DEFAULT_CACHE_DIR, *, context_um=(), **options) -> FeatureSet:
    """Open a dataset and make sure every backbone's features are cached; returns the aligned features.
    ``context_um`` (e.g. ``"336,672"``): also embed squares of those sizes around each spot, cut from the
    source slides (one cache file per backbone and scale; see ``embedder.context``).

    Example::

        >>> features = hexpr.embed("demo/train.csv", hexpr.backbone_specs(["resnet18:weights=none,size=64"]))
        >>> features.X.shape                            # (spots, features), rows aligned by id
    """
    check_embed_options(**options)
    scales = parse_context_um(context_um)
    return ensure_features(open_dataset(data), specs, cache_dir, context_um=scales, **options)


def clean_cache(cache_dir=DEFAULT_CACHE_DIR) -> list[dict]:
    """Delete the unfinished embedding folders interrupted runs left in ``cache_dir``; finished files stay.

    Example::

        >>> removed = hexpr.clean_cache("cache")      # unfinished folders of interrupted runs
        >>> [r["path"] for r in removed]
    """
    return clean_partials(cache_dir)


def backbone_presets(check_local: bool = True) -> list[dict]:
    """The named backbone presets (foundation models and the ImageNet defaults), one dict each, with
    where their weights were found on this machine (no network calls).

    Example::

        >>> [row["name"] for row in hexpr.backbone_presets()][:3]
        # -> the preset names (uni, virchow2, ...), with where their weights were found
    """
    return preset_rows(check_local=check_local)
