"""hexpr: predict spatially resolved gene expression from H&E histology. Embed once, fit many heads.

The Python API is this module: each name runs one stage, takes paths and options, writes its outputs
atomically and returns a plain dict report (the same one the CLI prints). Names load on first use, so
``import hexpr`` stays light::

    >>> import hexpr
    >>> hexpr.write_demo_dataset("demo", n_train=40, n_test=10, n_genes=20)        # doctest: +SKIP
    >>> hexpr.embed("demo/train.csv", hexpr.backbone_specs(["resnet18:weights=none,size=64"]))  # doctest: +SKIP
    >>> report = hexpr.fit_head("demo/train.csv", head="ridge", specs=...)       # doctest: +SKIP

Each function's docstring has its own example. The layers live in sub-packages: ``hexpr.embedder``
(images -> features), ``hexpr.heads`` (features -> expression), ``hexpr.workflow`` (the use cases this
module re-exports) and ``hexpr.pipeline`` (the ``hexpr`` command line).
"""
from __future__ import annotations

import importlib as _importlib
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("hexpr")
except _metadata.PackageNotFoundError:      # a source tree that was not installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    workflow = _importlib.import_module("hexpr.workflow")     # not `from hexpr import`: that calls this again
    if name in workflow.__all__:
        value = getattr(workflow, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hexpr' has no attribute {name!r}")


def __dir__():
    workflow = _importlib.import_module("hexpr.workflow")
    return sorted(set(globals()) | set(workflow.__all__))

