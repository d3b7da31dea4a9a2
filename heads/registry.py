"""The head registry, names only: ``HEAD_CLASSES`` maps each ``--head`` name to "module:Class".

Kept free of imports so that the command line checks ``--head`` before loading scikit-learn or
torch; ``heads.base`` imports each class on first use (``make_head``, ``registered_heads``).
"""
from __future__ import annotations

HEAD_CLASSES = {
    "mean": "hexpr.heads.mean:MeanHead",
    "ridge": "hexpr.heads.ridge:RidgeHead",
    "hest": "hexpr.heads.ridge:HestRidgeHead",
    "mlp": "hexpr.heads.mlp:MLPHead",
    "gbm": "hexpr.heads.gbm:GBMHead",
    "knn": "hexpr.heads.knn:KNNHead",
    "bleep": "hexpr.heads.knn:BleepHead",
    "ensemble": "hexpr.heads.ensemble:EnsembleHead",
    "ridge_streamed": "hexpr.heads.streamed_ridge:StreamedRidgeHead",
    "mlp_streamed": "hexpr.heads.chunked_mlp:ChunkedMLPHead",
    "bagged": "hexpr.heads.bagging:SeedBagged",
}
AUTO = "auto"   # --head auto: not a class, a choice among candidates by CV (heads.sweep, heads.fitting)
