"""finetune: the backbones and an MLP head trained end to end (see ``heads.finetune``), with a model card."""
from __future__ import annotations

import functools
from pathlib import Path

from hexpr.heads.finetune import finetune as finetune_network
from hexpr.heads.finetune import load_finetuned
from hexpr.workflow.model_card import write_card_for

__all__ = ["finetune"]


@functools.wraps(finetune_network)
def finetune(data, specs, out_dir, *args, **kwargs) -> dict:
    report = finetune_network(data, specs, out_dir, *args, **kwargs)
    write_card_for(out_dir, load_finetuned(out_dir), Path(out_dir).name)   # README.md: the model card
    return report
