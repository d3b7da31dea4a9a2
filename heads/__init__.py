"""Heads: features -> expression. "Embed once, fit many heads."

Entry points (imported lazily, so ``import heads.metrics`` stays light): ``make_head`` and the
registry ``HEADS``; ``make_transform`` / ``TargetTransformed``; ``FeaturePCA`` / ``FeatureReduced``;
``make_folds`` / ``cross_validate``; ``run_sweep``; ``fit_head`` / ``load_model`` / ``FittedModel``.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "HEADS": "heads.base", "Head": "heads.base", "FeaturePCA": "heads.base",
    "FeatureReduced": "heads.base", "default_search_space": "heads.base",
    "head_param_names": "heads.base", "make_head": "heads.base", "HEAD_CLASSES": "heads.base",
    "registered_heads": "heads.base",
    "TRANSFORMS": "heads.targets", "TargetTransformed": "heads.targets", "make_transform": "heads.targets",
    "cross_validate": "heads.cv", "make_folds": "heads.cv",
    "run_sweep": "heads.sweep",
    "FittedModel": "heads.fitting", "fit_head": "heads.fitting", "load_model": "heads.fitting",
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
