"""The end-to-end model of ``hexpr finetune`` and what is needed to train, save and use it.

``FusedModel``: the backbones (timm, pooled features), their features concatenated, standardised
with fixed per-feature statistics (buffers), then an MLP head built by ``heads.mlp.build_mlp`` --
the same layout as a fitted ``mlp`` head, so such a head can be copied in as the starting point.

Also here: AdamW parameter groups (optionally with layer-wise learning-rate decay), the warmup +
cosine / plateau learning-rate schedule (checkpointable), the batched prediction loop, the export
(``config.json`` + ``model.safetensors`` in ``heads.model_files``' format, no pickle, and
``finetuned.json`` for humans) and ``load_finetuned`` (an old pickled ``finetuned.pt`` only with
``trust_pickle``).
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from hexpr.embedder.backbones import RANDOM_INIT, BackboneSpec, LoadedBackbone, Preprocess, RandomInitWarning, create_backbone
from hexpr.embedder.datasets import ID_COLUMN, DatasetError, PatchDataset
from hexpr.embedder.errors import MissingInputError, ModelError
from hexpr.embedder.extract import _collate, _progress_bar, _ResizedPatches, default_num_workers
from hexpr.embedder.files import write_json
from hexpr.heads.mlp import build_mlp, resolve_device
from hexpr.heads.model_files import CONFIG_FILE, read_folder, refuse_pickles, trusted_torch_load, write_folder

FINETUNED_FILE = CONFIG_FILE        # with model.safetensors beside it
LEGACY_FINETUNED_FILE = "finetuned.pt"
FINETUNED_KIND = "finetuned"
FINETUNED_INFO_FILE = "finetuned.json"
FORMAT_VERSION = 1


class FinetuneError(ModelError):
    """Bad fine-tuning options or inputs; the message says what to change."""


# ----------------------------------------------------------------------------- the model


class FusedModel(nn.Module):
    """backbones -> concatenated pooled features -> (f - mean) / scale -> MLP head -> genes."""

    def __init__(self, backbones: list[nn.Module], head: nn.Sequential, feature_mean, feature_scale):
        super().__init__()
        self.backbones = nn.ModuleList(backbones)
        self.head = head
        self.register_buffer("feature_mean", torch.as_tensor(np.asarray(feature_mean), dtype=torch.float32).clone())
        self.register_buffer("feature_scale", torch.as_tensor(np.asarray(feature_scale), dtype=torch.float32).clone())
        self.backbones_trainable = True

    def features(self, views: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([backbone(view).float() for backbone, view in zip(self.backbones, views)], dim=1)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        with nullcontext() if self.backbones_trainable else torch.no_grad():
            feats = self.features(views)
        return self.head((feats - self.feature_mean) / self.feature_scale).float()

    def set_stage(self, train_backbones: bool) -> None:
        """Training mode for one stage: the head always trains; the backbones only when asked.

        Batch-norm layers of the backbones keep their running statistics (eval mode) throughout:
        fine-tuning batches are small and come from few slides, so re-estimating them would hurt.
        """
        self.backbones_trainable = bool(train_backbones)
        for p in self.backbones.parameters():
            p.requires_grad_(self.backbones_trainable)
        self.train()
        if not self.backbones_trainable:
            self.backbones.eval()
        else:
            for module in self.backbones.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()


def build_backbones(specs: list[BackboneSpec], device: torch.device, *, random_init: bool = False) -> list[LoadedBackbone]:
    """Trainable backbones for ``specs``. ``random_init`` builds the architecture only (weights are
    loaded afterwards from an exported model), without touching the weights file or the hub."""
    loaded = []
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        if random_init:
            warnings.simplefilter("ignore", RandomInitWarning)
        for spec in specs:
            build = BackboneSpec.from_dict({**spec.to_dict(), "weights": RANDOM_INIT}) if random_init else spec
            backbone = create_backbone(build, device)
            backbone.model.requires_grad_(True)
            loaded.append(backbone)
    return loaded


def views_to_device(stacks, preprocesses: list[Preprocess], device: torch.device) -> list[torch.Tensor]:
    """uint8 (B, 3, H, W) stacks -> normalised float views on ``device``, channels_last (as the embedder)."""
    return [p.normalize(stack.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
            for stack, p in zip(stacks, preprocesses)]


def autocast_for(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if (amp and device.type == "cuda") else nullcontext()


# ----------------------------------------------------------------------------- optimisation


_NO_DECAY_NAMES = ("cls_token", "pos_embed", "reg_token", "dist_token", "mask_token")


def layer_ids(names: list[str]) -> tuple[list[int], int]:
    """Depth index of each parameter of one backbone (and the largest index), for layer-wise decay.

    Generic over timm models: a "unit" is the parameter-name prefix up to the numbered block it
    sits in (``blocks.3``, ``layer2.1``, ``blocks.0.2``, ``stages.1.blocks.4``); units get
    increasing ids in the order the model registers them. Everything before the first numbered
    block (stem, patch embedding, tokens) shares id 0; everything after the last one (final norm,
    head convolution) gets the top id; an unnumbered module between blocks shares the id of the
    block before it.
    """
    def unit(name: str) -> tuple[str, bool]:
        parts = name.split(".")
        numbered = [i for i, part in enumerate(parts[:-1]) if part.isdigit()]
        if not numbered:
            return parts[0], False
        end = numbered[0]
        while end + 1 < len(parts) - 1 and parts[end + 1].isdigit():
            end += 1
        return ".".join(parts[:end + 1]), True

    units = [unit(n) for n in names]
    numbered_order: dict[str, int] = {}
    for key, numbered in units:
        if numbered and key not in numbered_order:
            numbered_order[key] = len(numbered_order) + 1
    last = len(numbered_order) + 1
    ids, current, seen = [], 0, 0
    for position, (key, numbered) in enumerate(units):
        if numbered:
            current = numbered_order[key]
            seen = max(seen, current)
            ids.append(current)
        elif seen == len(numbered_order):  # nothing numbered follows: after the last block
            ids.append(last if numbered_order else 0)
        else:                              # before the first block (0) or between blocks
            ids.append(current)
    return ids, max(ids) if ids else 0


def _decays(name: str, p: torch.Tensor) -> bool:
    return p.ndim > 1 and not any(token in name for token in _NO_DECAY_NAMES)


def param_groups(model: FusedModel, *, lr: float, head_lr: float, weight_decay: float,
                 layer_decay: float | None) -> list[dict]:
    """AdamW groups: backbone parameters at ``lr`` (times ``layer_decay ** depth_from_top`` when
    set), head parameters at ``head_lr``; no weight decay on biases, norms and tokens."""
    groups: dict[tuple, dict] = {}

    def add(key, name, p, kind, base_lr):
        decay = _decays(name, p)
        key = (*key, decay)
        if key not in groups:
            groups[key] = {"params": [], "kind": kind, "base_lr": float(base_lr), "lr": float(base_lr),
                           "weight_decay": float(weight_decay) if decay else 0.0, "name": "/".join(map(str, key))}
        groups[key]["params"].append(p)

    for b, backbone in enumerate(model.backbones):
        named = list(backbone.named_parameters())
        ids, top = layer_ids([n for n, _ in named])
        for (name, p), lid in zip(named, ids):
            scale = float(layer_decay) ** (top - lid) if layer_decay else 1.0
            add(("backbone", b, lid if layer_decay else 0), name, p, "backbone", lr * scale)
    for name, p in model.head.named_parameters():
        add(("head",), name, p, "head", head_lr)
    return list(groups.values())


class LRSchedule:
    """Per-optimizer-step learning rates: linear warmup, then cosine decay, plateau halving or constant.

    The head warms up from step 0; the backbones warm up again from the step they are unfrozen at.
    ``cosine`` decays every group to ``min_factor`` of its base rate over the whole run;
    ``plateau`` halves the rates when the monitored score has not improved for ``plateau_patience``
    epochs. State (step, plateau bookkeeping) round-trips through ``state_dict``.
    """

    KINDS = ("cosine", "plateau", "constant")

    def __init__(self, kind: str, total_steps: int, warmup_steps: int, unfreeze_step: int,
                 min_factor: float = 0.01, plateau_factor: float = 0.5, plateau_patience: int = 1):
        if kind not in self.KINDS:
            raise FinetuneError(f"unknown schedule {kind!r}; choose from {', '.join(self.KINDS)}")
        self.kind = kind
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, int(warmup_steps))
        self.unfreeze_step = max(0, int(unfreeze_step))
        self.min_factor = min_factor
        self.plateau_factor = plateau_factor
        self.plateau_patience = plateau_patience
        self.step = 0
        self.plateau_scale = 1.0
        self.plateau_best = -math.inf
        self.plateau_bad = 0

    def factor(self, kind: str) -> float:
        start = 0 if kind == "head" else self.unfreeze_step
        since = self.step - start
        warm = 1.0 if self.warmup_steps == 0 else min(1.0, max(0.0, (since + 1) / self.warmup_steps))
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, max(0.0, (self.step - self.warmup_steps) / span))
            decay = self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        elif self.kind == "plateau":
            decay = self.plateau_scale
        else:
            decay = 1.0
        return warm * decay

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * self.factor(group["kind"])

    def step_batch(self) -> None:
        self.step += 1

    def step_epoch(self, score: float) -> None:
        if self.kind != "plateau" or score is None or not np.isfinite(score):
            return
        if score > self.plateau_best + 1e-4:
            self.plateau_best, self.plateau_bad = score, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad > self.plateau_patience:
                self.plateau_scale *= self.plateau_factor
                self.plateau_bad = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "plateau_scale": self.plateau_scale, "plateau_best": self.plateau_best,
                "plateau_bad": self.plateau_bad}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.plateau_scale = float(state["plateau_scale"])
        self.plateau_best = float(state["plateau_best"])
        self.plateau_bad = int(state["plateau_bad"])


# ----------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict_rows(model: FusedModel, dataset: PatchDataset, indices, preprocesses: list[Preprocess], *,
                 batch_size: int, device: torch.device, num_workers: int | None, amp: bool,
                 advance=lambda n: None, loader=None) -> np.ndarray:
    """Model outputs (transformed scale) for ``dataset`` rows ``indices``, in that order."""
    indices = [int(i) for i in indices]
    if loader is None:
        loader = plain_loader(dataset, indices, preprocesses, batch_size=batch_size, device=device,
                              num_workers=num_workers)
    model.eval()
    out = np.empty((len(indices), model.head[-1].out_features), dtype=np.float64)
    position = 0
    for batch_indices, stacks, errors in loader:
        if errors:
            raise DatasetError(errors[0] + (f" ({len(errors)} unreadable images in this batch)" if len(errors) > 1 else ""))
        with autocast_for(device, amp):
            pred = model(views_to_device(stacks, preprocesses, device))
        out[position:position + len(batch_indices)] = pred.float().cpu().numpy()
        position += len(batch_indices)
        advance(len(batch_indices))
    return out


def plain_loader(dataset: PatchDataset, indices, preprocesses, *, batch_size: int, device: torch.device,
                 num_workers: int | None, persistent: bool = False):
    """Un-augmented images, resized as the frozen embedder resizes them, in fixed batches."""
    indices = [int(i) for i in indices]
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    workers = default_num_workers(device) if num_workers is None else int(num_workers)
    return torch.utils.data.DataLoader(
        _ResizedPatches(dataset, preprocesses), batch_sampler=batches, num_workers=workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", prefetch_factor=2 if workers > 0 else None,
        persistent_workers=persistent and workers > 0, generator=torch.Generator(),  # leave the global RNG alone
    )


# ----------------------------------------------------------------------------- export / load


def cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def export_model(out_dir: Path, model: FusedModel, *, specs: list[BackboneSpec], preprocesses: list[Preprocess],
                 widths: list[int], genes: list[str], hidden, dropout: float, transform, info: dict) -> Path:
    """Write the model (weights + everything needed to predict: config.json + model.safetensors) and
    ``finetuned.json``."""
    out_dir = Path(out_dir)
    payload = {
        "format_version": FORMAT_VERSION,
        "specs": [s.to_dict() for s in specs],
        "preprocess": [p.to_dict() for p in preprocesses],
        "widths": [int(w) for w in widths],
        "genes": list(genes),
        "hidden": [int(h) for h in hidden],
        "dropout": float(dropout),
        "transform": transform,          # fitted heads.targets transform: outputs -> target scale
        "state_dict": cpu_state(model),
        "info": info,
    }
    path = write_folder(out_dir, payload, FINETUNED_KIND)
    write_json(out_dir / FINETUNED_INFO_FILE, {
        "format_version": FORMAT_VERSION, "kind": "hexpr-finetuned", "file": "model.safetensors",
        "backbones": payload["specs"], "preprocess": payload["preprocess"], "widths": payload["widths"],
        "head": {"hidden": payload["hidden"], "dropout": payload["dropout"]},
        "transform": getattr(transform, "name", str(transform)), "n_genes": len(genes), "genes": list(genes),
        **info,
    })
    return path


class FinetunedModel:
    """An exported fine-tuned model: ``predict_dataset`` embeds on the fly and predicts."""

    def __init__(self, payload: dict, path: Path):
        if payload.get("format_version") != FORMAT_VERSION:
            raise FinetuneError(f"{path}: unsupported finetuned-model format {payload.get('format_version')!r} "
                                f"(this hexpr reads version {FORMAT_VERSION})")
        self.path = Path(path)
        self.genes: list[str] = list(payload["genes"])
        self.specs: list[BackboneSpec] = [BackboneSpec.from_dict(d) for d in payload["specs"]]
        self.preprocesses = [Preprocess(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])}) for d in payload["preprocess"]]
        self.widths = list(payload["widths"])
        self.hidden = tuple(payload["hidden"])
        self.dropout = float(payload["dropout"])
        self.transform = payload["transform"]
        self.info = dict(payload.get("info", {}))
        self._state = payload["state_dict"]
        self._modules: dict[str, FusedModel] = {}

    def __repr__(self):
        return (f"FinetunedModel({self.path}, backbones={[s.name for s in self.specs]}, "
                f"genes={len(self.genes)}, best_epoch={self.info.get('best_epoch')})")

    def save(self, folder) -> Path:
        """Write this model into ``folder`` in the safetensors format (what ``export_model`` writes)."""
        return write_folder(folder, {
            "format_version": FORMAT_VERSION, "specs": [s.to_dict() for s in self.specs],
            "preprocess": [p.to_dict() for p in self.preprocesses], "widths": self.widths, "genes": self.genes,
            "hidden": list(self.hidden), "dropout": self.dropout, "transform": self.transform,
            "state_dict": self._state, "info": self.info}, FINETUNED_KIND)

    def module(self, device="cpu") -> FusedModel:
        """The network on ``device`` (built once per device, eval mode)."""
        device = torch.device(device)
        key = str(device)
        if key not in self._modules:
            backbones = build_backbones(self.specs, device, random_init=True)
            widths = [b.num_features for b in backbones]
            if widths != self.widths:
                raise FinetuneError(f"{self.path}: backbones give feature widths {widths}, the model was "
                                    f"trained with {self.widths}; is this the same timm version?")
            head = build_mlp(sum(widths), self.hidden, len(self.genes), self.dropout)
            model = FusedModel([b.model for b in backbones], head, np.zeros(sum(widths)), np.ones(sum(widths)))
            model.load_state_dict(self._state)
            model = model.to(device).to(memory_format=torch.channels_last).eval()
            self._modules[key] = model
        return self._modules[key]

    def predict_dataset(self, dataset: PatchDataset, *, batch_size: int = 64, device="auto",
                        num_workers: int | None = None, progress: bool = True, amp: bool = True) -> pd.DataFrame:
        """Predictions for every spot of ``dataset``: index = ``dataset.ids`` (named "ID"),
        columns = ``self.genes``, values in the training targets' scale."""
        if len(dataset) == 0:
            raise DatasetError(f"{dataset.source}: the dataset is empty")
        torch_device = resolve_device(device, strict=True)
        model = self.module(torch_device)
        started, done = time.perf_counter(), [0]

        def advance(n):
            done[0] += n
            bar.update(task, advance=n, rate=done[0] / max(time.perf_counter() - started, 1e-9))

        with _progress_bar(progress) as bar:
            task = bar.add_task(f"predict {dataset.name} (fine-tuned)", total=len(dataset), rate=0.0)
            raw = predict_rows(model, dataset, range(len(dataset)), self.preprocesses, batch_size=int(batch_size),
                               device=torch_device, num_workers=num_workers, amp=amp, advance=advance)
        values = self.transform.inverse_transform(raw)
        return pd.DataFrame(values, index=pd.Index(list(dataset.ids), name=ID_COLUMN), columns=self.genes)


def load_finetuned(path, trust_pickle: bool = False) -> FinetunedModel:
    """Read an exported model from its folder (or its config.json), CPU tensors. A folder holding only
    an old pickled ``finetuned.pt`` loads only with ``trust_pickle`` (unpickling runs any code in it)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if (folder / FINETUNED_FILE).is_file() and path.name != LEGACY_FINETUNED_FILE:
        payload = read_folder(folder, FINETUNED_KIND)
        return FinetunedModel(payload, folder / FINETUNED_FILE)
    legacy = folder / LEGACY_FINETUNED_FILE
    if not legacy.is_file():
        raise MissingInputError(f"no fine-tuned model at {folder}; run `hexpr finetune` first")
    if not trust_pickle:
        raise FinetuneError(f"{legacy} is an old fine-tuned model saved as a pickle, and loading a pickle runs any code "
                            "its author put in it. If you trust where it came from, pass --trust-pickle, or convert it "
                            f"once with `hexpr convert-model {folder}`")
    refuse_pickles(folder, allow=(LEGACY_FINETUNED_FILE,))
    payload = trusted_torch_load(legacy)
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise FinetuneError(f"{legacy}: not a readable hexpr fine-tuned model (no state_dict); "
                            "fine-tune again with hexpr finetune")
    return FinetunedModel(payload, legacy)
