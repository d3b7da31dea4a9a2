"""finetune: the backbones and an MLP head trained end to end (see ``heads.finetune``)."""
from __future__ import annotations

from hexpr.heads.finetune import finetune

__all__ = ["finetune"]
