"""Use cases that compose the embedder and the heads: what the CLI calls, usable from Python.

Each function takes paths and options, does one stage, writes its outputs atomically (temporary
name, then rename) and returns a plain dict report. Names are loaded on first use, so that
``import workflow`` (and ``hexpr --help``) stays fast; ``workflow.<name>`` is the public API:

    embed, clean_cache, backbone_specs,     workflow.embedding
    backbone_presets
    fit_head, check_transform               workflow.fit
    head_names, check_head, check_model_path  workflow.options (light: the CLI checks before heavy imports)
    predict, load_predictor, predict_with   workflow.prediction
    resolve_model                           workflow.prediction
    convert_model, export_model             workflow.models
    predict_slide                           workflow.slides
    evaluate, plot                          workflow.scoring
    read_expression_table                   workflow.expression_tables
    inspect_dataset                         workflow.explore
    demo, write_demo_dataset                workflow.demo_pipeline
    import_dataset                          workflow.importing
    finetune                                workflow.finetuning
    view, read_slide_map                    workflow.viewing
    hest_bench                              workflow.hest_bench
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "embed": "hexpr.workflow.embedding", "clean_cache": "hexpr.workflow.embedding", "backbone_specs": "hexpr.workflow.embedding",
    "backbone_presets": "hexpr.workflow.embedding",
    "fit_head": "hexpr.workflow.fit", "head_names": "hexpr.workflow.options", "check_head": "hexpr.workflow.options",
    "check_transform": "hexpr.workflow.fit",
    "predict": "hexpr.workflow.prediction", "load_predictor": "hexpr.workflow.prediction", "predict_with": "hexpr.workflow.prediction",
    "predictor_meta": "hexpr.workflow.prediction", "resolve_model": "hexpr.workflow.prediction",
    "convert_model": "hexpr.workflow.models", "export_model": "hexpr.workflow.models",
    "predict_slide": "hexpr.workflow.slides",
    "evaluate": "hexpr.workflow.scoring", "plot": "hexpr.workflow.scoring",
    "read_expression_table": "hexpr.workflow.expression_tables",
    "inspect_dataset": "hexpr.workflow.explore",
    "demo": "hexpr.workflow.demo_pipeline", "write_demo_dataset": "hexpr.workflow.demo_pipeline",
    "import_dataset": "hexpr.workflow.importing",
    "finetune": "hexpr.workflow.finetuning",
    "check_model_path": "hexpr.workflow.options",
    "view": "hexpr.workflow.viewing", "read_slide_map": "hexpr.workflow.viewing",
    "hest_bench": "hexpr.workflow.hest_bench",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'workflow' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
