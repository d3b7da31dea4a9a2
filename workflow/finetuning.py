"""finetune: the backbones and an MLP head trained end to end (see ``heads.finetune``)."""
from __future__ import annotations

from heads.finetune import finetune

__all__ = ["finetune"]
