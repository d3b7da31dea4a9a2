"""embed: cache frozen backbone features of a dataset; the backbone specs from the command line; cache upkeep."""
from __future__ import annotations

from pathlib import Path

from embedder.backbones import BackboneSpec
from embedder.backbones import resolve_specs as backbone_specs
from embedder.cache import DEFAULT_CACHE_DIR, clean_partials
from embedder.datasets import open_dataset
from embedder.extract import check_embed_options
from embedder.features import FeatureSet, ensure_features
from embedder.presets import preset_rows

__all__ = ["backbone_presets", "backbone_specs", "clean_cache", "embed"]


def embed(data: str | Path, specs: list[BackboneSpec], cache_dir=DEFAULT_CACHE_DIR, **options) -> FeatureSet:
    """Open a dataset and make sure every backbone's features are cached; returns the aligned features."""
    check_embed_options(**options)
    return ensure_features(open_dataset(data), specs, cache_dir, **options)


def clean_cache(cache_dir=DEFAULT_CACHE_DIR) -> list[dict]:
    """Delete the unfinished embedding folders interrupted runs left in ``cache_dir``; finished files stay."""
    return clean_partials(cache_dir)


def backbone_presets(check_local: bool = True) -> list[dict]:
    """The named backbone presets (foundation models and the ImageNet defaults), one dict each, with
    where their weights were found on this machine (no network calls)."""
    return preset_rows(check_local=check_local)
