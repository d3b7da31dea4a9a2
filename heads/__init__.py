"""Heads: features -> expression. "Embed once, fit many heads."

Entry points (imported lazily, so ``import heads.metrics`` stays light): ``make_head`` and the
registry ``HEADS``; ``make_transform`` / ``TargetTransformed``; ``FeaturePCA`` / ``FeatureReduced``;
``make_folds`` / ``cross_validate``; ``run_sweep``; ``fit_head`` / ``load_model`` / ``FittedModel``;
``save_head`` / ``load_head`` (one head on disk, no pickle: ``heads.model_files``).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "HEADS": "hexpr.heads.base", "Head": "hexpr.heads.base", "FeaturePCA": "hexpr.heads.base",
    "FeatureReduced": "hexpr.heads.base", "default_search_space": "hexpr.heads.base",
    "head_param_names": "hexpr.heads.base", "make_head": "hexpr.heads.base", "HEAD_CLASSES": "hexpr.heads.base",
    "registered_heads": "hexpr.heads.base",
    "TRANSFORMS": "hexpr.heads.targets", "TargetTransformed": "hexpr.heads.targets", "make_transform": "hexpr.heads.targets",
    "cross_validate": "hexpr.heads.cv", "make_folds": "hexpr.heads.cv",
    "run_sweep": "hexpr.heads.sweep",
    "save_head": "hexpr.heads.model_files", "load_head": "hexpr.heads.model_files",
    "FittedModel": "hexpr.heads.fitting", "fit_head": "hexpr.heads.fitting", "load_model": "hexpr.heads.fitting",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'heads' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    if name == "HEADS":
        return module.registered_heads()
    return getattr(module, name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
