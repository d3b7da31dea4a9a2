"""``hexpr finetune``: train the backbones and an MLP head end to end (the final stage).

"Embed once, fit many heads" finds the best head on frozen features; fine-tuning then adapts the
backbones themselves. The model (``heads.finetune_model.FusedModel``) concatenates the pooled
features of every backbone in the spec list, standardises them and feeds an MLP head. The head can
start from a fitted ``mlp`` head (``head_init``: a ``hexpr fit-head`` model folder), so training
starts at the frozen-feature optimum.

Training
  * losses of ``heads.mlp.LOSSES`` (mse, huber, logcosh, pearson, mse+pearson, weighted_mse with
    the HEG/HVG panels of the training split) on targets transformed by ``heads.targets``
    (statistics of the training split; with ``head_init`` the head's own fitted transform);
  * H&E augmentations (``embedder.augment``), seeded per (seed, epoch, image);
  * staged unfreezing (head only for ``freeze_epochs`` epochs, then everything) and/or layer-wise
    learning-rate decay (``layer_decay``); AdamW; warmup then cosine or plateau schedule;
    gradient accumulation; bf16 autocast, channels_last and pinned memory on CUDA;
  * validation on fold ``val_fold`` of ``heads.cv.make_folds`` (grouped by slide when the dataset
    has groups) with the challenge score (gene panels from the training split), early stopping
    on it (``patience``). ``val_fold=None`` trains on every spot for ``epochs`` epochs.

Files in ``out_dir``: ``config.json`` + ``model.safetensors`` + ``finetuned.json`` (the best epoch;
what ``hexpr predict`` loads), ``finetune_report.json``, ``checkpoints/last/`` (model, optimizer,
schedule, RNG states, epoch, best score, history, in the same format -- written every epoch as a
temporary folder, then swapped in). Nothing is a pickle (``heads.model_files``).
``resume=True`` continues from that checkpoint; the result equals an uninterrupted run's.

Deterministic on CPU for a given seed: batch order and augmentations are drawn from generators
seeded by (seed, epoch[, image]); the global torch RNG (dropout) is reseeded at every epoch and
restored for the caller afterwards.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hexpr.embedder.augment import DEFAULT_AUGMENT, augmented_views, plain_views, sample_rng
from hexpr.embedder.backbones import BackboneError, BackboneSpec, resolve_specs
from hexpr.embedder.datasets import DatasetError, PatchDataset, open_dataset
from hexpr.embedder.errors import OutputExistsError
from hexpr.embedder.extract import _collate, check_embed_options, default_num_workers
from hexpr.embedder.files import atomic_dir, json_ready, write_json
from hexpr.heads.base import FeaturePCA
from hexpr.heads.cv import make_folds, score_with_panels, training_panels
from hexpr.heads.finetune_model import (
    FINETUNED_FILE,
    FINETUNED_INFO_FILE,
    FinetunedModel,
    FinetuneError,
    FusedModel,
    LRSchedule,
    autocast_for,
    build_backbones,
    cpu_state,
    export_model,
    load_finetuned,
    param_groups,
    plain_loader,
    predict_rows,
    views_to_device,
)
from hexpr.heads.fitting import load_model
from hexpr.heads.metrics import N_TOP_DEFAULT
from hexpr.heads.model_files import read_folder, write_folder
from hexpr.heads.mlp import LOSSES, MLPHead, as_widths, build_mlp, minibatches, panel_gene_weights, resolve_device
from hexpr.heads.params import NON_NEGATIVE, POSITIVE, Int, NoneOr, Real
from hexpr.heads.targets import TargetTransformed, make_transform

__all__ = ["finetune", "load_finetuned", "FinetunedModel", "FinetuneError", "FINETUNED_FILE",
           "FINETUNED_INFO_FILE", "CHECKPOINT_FILE", "REPORT_FILE"]

CHECKPOINT_FILE = "checkpoints/last"      # a folder in heads.model_files' format
CHECKPOINT_KIND = "finetune-checkpoint"
REPORT_FILE = "finetune_report.json"
CHECKPOINT_VERSION = 1
STATS_MAX_IMAGES = 512       # training images used for the feature standardisation (no head_init)
GENE_WEIGHT_BOOST = 4.0      # weighted_mse: HEG/HVG genes count 1 + boost (as the mlp head)
LOSS_OPTIONS = SimpleNamespace(pearson_axis="both", pearson_weight=1.0, huber_delta=1.0)
# options that may change between an interrupted run and its resumption
# (the data path may move: the data fingerprint -- ids and genes -- must match)
_RESUME_FREE = {"epochs", "patience", "device", "amp", "num_workers", "data"}


# ----------------------------------------------------------------------------- data


class _TrainViews(torch.utils.data.Dataset):
    """Worker side: item (epoch, i) -> (i, one (augmented) uint8 view per backbone, error)."""

    def __init__(self, dataset: PatchDataset, preprocesses, augment: bool, seed: int):
        self.dataset, self.preprocesses, self.augment, self.seed = dataset, preprocesses, augment, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        epoch, i = item
        try:
            image = self.dataset.read_image(i)
            if self.augment:
                views = augmented_views(image, self.preprocesses, sample_rng(self.seed, epoch, i), DEFAULT_AUGMENT)
            else:
                views = plain_views(image, self.preprocesses)
            return i, views, ""
        except Exception as exc:  # noqa: BLE001 - reported cleanly by the main process
            message = str(exc) if isinstance(exc, DatasetError) else f"{self.dataset.image_label(i)}: cannot read image: {exc}"
            empty = tuple(torch.zeros(3, p.height, p.width, dtype=torch.uint8) for p in self.preprocesses)
            return i, empty, message


class _EpochBatches:
    """Batch sampler: the shuffled batches of ``self.epoch`` (set before each epoch), as (epoch, i)."""

    def __init__(self, train_idx: np.ndarray, batch_size: int, seed: int, max_batches: int | None):
        self.train_idx, self.batch_size, self.seed, self.max_batches = train_idx, batch_size, seed, max_batches
        self.epoch = 0

    def batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(_derived_seed(self.seed, "batches", epoch))
        parts = [self.train_idx[b.numpy()].tolist() for b in minibatches(len(self.train_idx), self.batch_size, generator)]
        return parts[:self.max_batches] if self.max_batches else parts

    def __iter__(self):
        epoch = self.epoch
        return iter([[(epoch, i) for i in batch] for batch in self.batches(epoch)])

    def __len__(self):
        return len(self.batches(self.epoch))


def _derived_seed(seed: int, *parts) -> int:
    digest = hashlib.sha256(json.dumps([int(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------- setup helpers


@dataclass
class _HeadInit:
    path: str
    genes: list[str]
    transform: object
    net_state: dict
    hidden: tuple
    dropout: float
    feature_mean: np.ndarray
    feature_scale: np.ndarray
    widths: list[int] | None
    tta: bool


def _load_head_init(path, specs: list[BackboneSpec]) -> _HeadInit:
    """A fitted ``mlp`` head (fit-head folder) checked against ``specs``."""
    fitted = load_model(path)
    model = fitted.model
    transform = make_transform("none").fit(np.zeros((1, len(fitted.genes))))
    if isinstance(model, TargetTransformed):
        transform, model = model.transform_, model.head_
    if type(model) is not MLPHead:   # not a subclass either: mlp_streamed may scale its outputs
        raise FinetuneError(f"head_init {path}: holds a {type(model).__name__} head; fine-tuning can only start "
                            "from an 'mlp' head (hexpr fit-head --head mlp)")
    meta = fitted.feature_meta or {}
    if not meta.get("backbones"):
        raise FinetuneError(f"head_init {path}: the model does not record which backbones made its features")
    if int(meta.get("neighbours", 0) or 0):
        raise FinetuneError(f"head_init {path}: the head was fitted with neighbour-context features "
                            f"(neighbours={meta['neighbours']}); fine-tuning uses each spot's own patch only")
    if meta.get("slide_centred"):
        raise FinetuneError(f"head_init {path}: the head was fitted on slide-centred features (--centre-slides); "
                            "fine-tuning sees one batch of patches at a time, not whole slides: start from a head "
                            "fitted without --centre-slides")
    if meta.get("context_um"):
        raise FinetuneError(f"head_init {path}: the head was fitted with context scales "
                            f"({', '.join(f'{s:g}' for s in meta['context_um'])} µm); fine-tuning uses each spot's own "
                            f"patch only: start from a head fitted without --context-um")
    theirs = [BackboneSpec.from_dict(d) for d in meta["backbones"]]
    if [s.to_json() for s in theirs] != [s.to_json() for s in specs]:
        raise FinetuneError(
            f"head_init {path} was fitted on features of backbones {[s.to_dict() for s in theirs]} but fine-tuning "
            f"uses {[s.to_dict() for s in specs]}. Give the same backbone specs (same order, weights and "
            "preprocessing) or fit a head on features of these backbones first")
    if meta.get("identities"):
        ours = [json.dumps(s.identity(), sort_keys=True) for s in specs]
        if [json.dumps(i, sort_keys=True) for i in meta["identities"]] != ours:
            raise FinetuneError(f"head_init {path}: the backbone weights differ from the ones the head was fitted "
                                "on (content hash changed); refit the head on features of these weights")
    if meta.get("tta"):
        warnings.warn(f"head_init {path}: the head was fitted on test-time-augmented (8-view mean) features; "
                      "fine-tuning feeds single views, so its starting predictions differ a little", stacklevel=3)
    feature_mean, feature_scale = model.input_standardization()
    return _HeadInit(
        path=str(path), genes=list(fitted.genes), transform=transform,
        net_state=model.network_state(), hidden=model.hidden_widths, dropout=float(model.dropout),
        feature_mean=feature_mean, feature_scale=feature_scale,
        widths=[int(w) for w in meta["widths"]] if meta.get("widths") else None, tta=bool(meta.get("tta")),
    )


def _split(dataset: PatchDataset, folds, val_fold, seed: int):
    """(train_idx, val_idx, info): fold ``val_fold`` of ``make_folds`` (grouped when possible)."""
    n = len(dataset)
    if val_fold is None:
        return np.arange(n), np.arange(0), {"validation": "none"}
    groups = None if dataset.groups is None else dataset.groups.to_numpy().astype(str)
    grouped = groups is not None and len(np.unique(groups)) > 1
    fold_list = make_folds(n, int(folds), groups if grouped else None, seed)
    if not 0 <= int(val_fold) < len(fold_list):
        raise FinetuneError(f"val_fold must be between 0 and {len(fold_list) - 1} (folds={folds}), got {val_fold}")
    train, val = fold_list[int(val_fold)]
    info = {"validation": "grouped fold" if grouped else "spot fold", "folds": int(folds), "val_fold": int(val_fold)}
    if grouped:
        info["val_groups"] = sorted(set(groups[val].tolist()))
    return train, val, info


def _check_options(loss, schedule, **values):
    """Refuse a bad option before any data is read or folder made (one FinetuneError naming it)."""
    if loss not in LOSSES:
        raise FinetuneError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    if schedule not in LRSchedule.KINDS:
        raise FinetuneError(f"unknown schedule {schedule!r}; choose from {', '.join(LRSchedule.KINDS)}")
    constraints = {"epochs": Int(0), "batch_size": Int(1), "accum_steps": Int(1), "freeze_epochs": Int(0),
                   "warmup_epochs": Int(0), "lr": POSITIVE, "head_lr": POSITIVE, "weight_decay": NON_NEGATIVE,
                   "dropout": Real(0, 1, high_open=True), "layer_decay": NoneOr(Real(0, 1, low_open=True)),
                   "patience": NoneOr(Int(1)), "folds": Int(2), "val_fold": NoneOr(Int(0)),
                   "max_train_batches": NoneOr(Int(1))}
    for name, value in values.items():
        if not constraints[name](value):
            raise FinetuneError(f"{name}={value!r} is not accepted; {name} must be {constraints[name].describe()}")
    if values["val_fold"] is not None and values["val_fold"] >= values["folds"]:
        raise FinetuneError(f"val_fold must be between 0 and {values['folds'] - 1} (folds={values['folds']}), "
                            f"got {values['val_fold']}; -1 (None) trains on every spot without validation")


def _fingerprint(dataset: PatchDataset, genes: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([str(dataset.source), list(map(str, dataset.ids)), genes]).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def _feature_stats(model: FusedModel, dataset, indices, preprocesses, *, batch_size, device, num_workers, amp):
    """Mean and scale of the frozen features of (up to STATS_MAX_IMAGES) training images, as the mlp
    head standardises its inputs (constant features keep scale 1)."""
    model.eval()
    feats = []
    loader = plain_loader(dataset, indices, preprocesses, batch_size=batch_size, device=device, num_workers=num_workers)
    for _, stacks, errors in loader:
        if errors:
            raise DatasetError(errors[0])
        with autocast_for(device, amp):
            feats.append(model.features(views_to_device(stacks, preprocesses, device)).float().cpu().numpy())
    step = FeaturePCA(None, standardize=True).fit(np.concatenate(feats).astype(np.float64))
    return step.mean_, step.scale_


def _rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class _Bar:
    """One rich progress bar (stderr, transient) reused for every epoch's train and validation passes."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = None

    def __enter__(self):
        if self.enabled:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=Console(stderr=True), transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task("", total=1, info="")
        return self

    def start(self, description: str, total: int):
        if self.progress is not None:
            self.progress.reset(self.task, total=total, description=description, info="")

    def advance(self, n: int = 1, info: str | None = None):
        if self.progress is not None:
            self.progress.update(self.task, advance=n, **({"info": info} if info is not None else {}))

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)


# ----------------------------------------------------------------------------- the entry point


def finetune(data, specs: list[BackboneSpec], out_dir, *, head_init=None, loss: str = "mse", transform="minmax",
             hidden=(512,), dropout: float = 0.1, epochs: int = 10, batch_size: int = 32, lr: float = 1e-4,
             head_lr: float = 1e-3, weight_decay: float = 0.05, warmup_epochs: int = 1, schedule: str = "cosine",
             freeze_epochs: int = 1, layer_decay: float | None = None, accum_steps: int = 1, folds: int = 5,
             val_fold: int | None = 0, patience: int | None = 3, augment: bool = True, seed: int = 0,
             device: str = "auto", amp: bool = True, num_workers: int | None = None, resume: bool = False,
             progress: bool = True, on_epoch=None, max_train_batches: int | None = None) -> dict:
    """Fine-tune ``specs`` + an MLP head on ``data``; export the best epoch to ``out_dir``.

    data: a dataset path for ``open_dataset`` (or an opened ``PatchDataset``), with targets.
    specs: backbone specs (None or empty: the default pair).
    head_init: a fitted ``mlp`` head (fit-head folder) to start from; its genes, target transform,
        hidden widths, dropout and feature standardisation are used (``transform``/``hidden``/
        ``dropout`` are then ignored). It must come from features of the same backbone specs.
        Note: a fit-head model is refitted on all its spots; if those include the validation fold,
        the validation score is optimistic.
    epochs: total epochs (``0`` exports the initial model). ``freeze_epochs``: head-only epochs first.
    lr / head_lr: peak learning rates of the backbones / the head. layer_decay: backbone rates
        shrink by this factor per block from the top (e.g. 0.75). schedule: cosine | plateau | constant.
    folds, val_fold: validation = fold ``val_fold`` of ``folds`` (grouped by ``dataset.groups``
        when there are several groups); ``val_fold=None``: no validation, every spot trains and the
        last epoch is exported. patience: epochs without a better validation score before stopping
        (None: never stop early).
    resume: continue from ``out_dir/checkpoints/last.pt`` (options must match, except epochs,
        patience, device, amp and num_workers). Without it, an existing checkpoint is an error.
    on_epoch(row): called after every epoch (and for the initial model when ``head_init`` is
        validated) with train loss, validation score and its terms, images/s, ETA in seconds.
    max_train_batches: cap on training batches per epoch (quick runs, tests).
    Returns a JSON-serialisable report (also written to ``finetune_report.json``).
    Example::

        >>> report = hexpr.finetune("demo/train.csv", hexpr.backbone_specs(["resnet18:weights=none,size=64"]),
        ... "cache/models/finetuned", epochs=2)
    """
    started = time.perf_counter()
    _check_options(loss, schedule, epochs=epochs, batch_size=batch_size, accum_steps=accum_steps,
                   freeze_epochs=freeze_epochs, warmup_epochs=warmup_epochs, lr=lr, head_lr=head_lr,
                   weight_decay=weight_decay, dropout=dropout, layer_decay=layer_decay, patience=patience,
                   folds=folds, val_fold=val_fold, max_train_batches=max_train_batches)
    check_embed_options(device=device, num_workers=num_workers)
    make_transform(transform)  # a bad --transform fails before the folder is made
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise FinetuneError(f"seed={seed!r} is not accepted; seed must be an integer >= 0")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise OutputExistsError(f"--out {out_dir} is an existing file, not a folder; choose another path")
    dataset = data if isinstance(data, PatchDataset) else open_dataset(data)
    if dataset.targets is None:
        raise DatasetError(f"{dataset.source}: no expression targets; fine-tuning needs training data with gene columns")
    specs = list(specs) if specs else resolve_specs()
    if len({s.to_json() for s in specs}) != len(specs):
        raise BackboneError("the same backbone spec is given twice")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device, strict=True)
    use_amp = bool(amp) and torch_device.type == "cuda"
    workers = default_num_workers(torch_device) if num_workers is None else int(num_workers)

    init = _load_head_init(head_init, specs) if head_init is not None else None
    train_idx, val_idx, split_info = _split(dataset, folds, val_fold, seed)
    if len(train_idx) < 2:
        raise FinetuneError(f"only {len(train_idx)} training spot(s) after holding out the validation fold")
    if len(val_idx) == 1:
        raise FinetuneError("the validation fold holds a single spot; correlations need at least 2 - use fewer folds")
    if init is not None:
        missing = sorted(set(init.genes) - set(dataset.targets.columns))
        if missing:
            raise FinetuneError(f"head_init {head_init} predicts {len(init.genes)} genes, {len(missing)} of which are not "
                                f"in {dataset.source} (e.g. {missing[:3]}); fine-tune on the data the head was fitted on")
        # the head's gene panel (e.g. fit-head --genes hvg:50) is what gets fine-tuned
        genes, hidden, dropout = list(init.genes), init.hidden, init.dropout
    else:
        genes, hidden = [str(g) for g in dataset.targets.columns], as_widths(hidden)
    Y = dataset.targets[genes].to_numpy(np.float64)
    Y_train = Y[train_idx]
    target_transform = init.transform if init is not None else make_transform(transform).fit(Y_train)
    Yt = torch.as_tensor(target_transform.transform(Y), dtype=torch.float32)
    panels = training_panels(Y_train, N_TOP_DEFAULT)
    gene_weights = torch.as_tensor(panel_gene_weights(Y_train, N_TOP_DEFAULT, GENE_WEIGHT_BOOST),
                                   dtype=torch.float32, device=torch_device)
    loss_fn = LOSSES[loss]

    config = {
        "data": str(dataset.source), "data_fingerprint": _fingerprint(dataset, genes),
        "specs": [s.to_dict() for s in specs], "head_init": None if head_init is None else str(head_init),
        "loss": loss, "transform": getattr(target_transform, "name", str(transform)),
        "hidden": list(hidden), "dropout": float(dropout), "epochs": int(epochs), "batch_size": int(batch_size),
        "lr": float(lr), "head_lr": float(head_lr), "weight_decay": float(weight_decay),
        "warmup_epochs": int(warmup_epochs), "schedule": schedule, "freeze_epochs": int(freeze_epochs),
        "layer_decay": layer_decay, "accum_steps": int(accum_steps), "folds": folds, "val_fold": val_fold,
        "patience": patience, "augment": bool(augment), "seed": int(seed), "device": str(torch_device),
        "amp": use_amp, "num_workers": workers, "max_train_batches": max_train_batches,
    }
    checkpoint_path = out_dir / CHECKPOINT_FILE
    state = None
    if checkpoint_path.is_dir():
        if not resume:
            raise FinetuneError(f"{out_dir} holds a checkpoint of an earlier fine-tuning run ({checkpoint_path}); "
                                "pass resume=True (--resume) to continue it, or use another / an empty output folder")
        state = read_folder(checkpoint_path, CHECKPOINT_KIND)
        changed = {k: (state["config"].get(k), v) for k, v in config.items()
                   if k not in _RESUME_FREE and state["config"].get(k) != v}
        if changed:
            raise FinetuneError(f"cannot resume {checkpoint_path}: these options differ from the interrupted run "
                                f"(was, now): {changed}; resume with the same options or start in another folder")

    batch_sampler = _EpochBatches(np.asarray(train_idx), int(batch_size), seed, max_train_batches)
    n_batches = len(batch_sampler.batches(0))
    steps_per_epoch = math.ceil(n_batches / accum_steps)

    devices = list(range(torch.cuda.device_count())) if torch_device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _Bar(progress) as bar:
        torch.manual_seed(seed)
        backbones = build_backbones(specs, torch_device)
        widths = [b.num_features for b in backbones]
        preprocesses = [b.preprocess for b in backbones]
        if init is not None and init.widths is not None and init.widths != widths:
            raise FinetuneError(f"head_init {head_init} was fitted on feature blocks of widths {init.widths}, "
                                f"these backbones give {widths}")
        if init is not None and len(init.feature_mean) != sum(widths):
            raise FinetuneError(f"head_init {head_init} expects {len(init.feature_mean)} features, "
                                f"these backbones give {sum(widths)}")
        torch.manual_seed(seed)
        head = build_mlp(sum(widths), hidden, len(genes), dropout)
        model = FusedModel([b.model for b in backbones], head, np.zeros(sum(widths)), np.ones(sum(widths)))
        model = model.to(torch_device).to(memory_format=torch.channels_last)  # as the embedder runs backbones
        if init is not None:
            model.head.load_state_dict(init.net_state)
            model.feature_mean.copy_(torch.as_tensor(init.feature_mean, dtype=torch.float32))
            model.feature_scale.copy_(torch.as_tensor(init.feature_scale, dtype=torch.float32))
        elif state is None:
            stats_rows = np.asarray(train_idx)
            if len(stats_rows) > STATS_MAX_IMAGES:
                stats_rows = np.sort(np.random.default_rng(seed).choice(stats_rows, STATS_MAX_IMAGES, replace=False))
            bar.start("feature statistics", 1)
            mean, scale = _feature_stats(model, dataset, stats_rows, preprocesses, batch_size=int(batch_size),
                                         device=torch_device, num_workers=workers, amp=use_amp)
            model.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            model.feature_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
            with torch.no_grad():
                model.head[-1].bias.copy_(Yt[train_idx].mean(dim=0))

        optimizer = torch.optim.AdamW(param_groups(model, lr=lr, head_lr=head_lr, weight_decay=weight_decay,
                                                   layer_decay=layer_decay))
        lr_schedule = LRSchedule(schedule, total_steps=int(epochs) * steps_per_epoch,
                                 warmup_steps=int(warmup_epochs) * steps_per_epoch,
                                 unfreeze_step=int(freeze_epochs) * steps_per_epoch)
        history, best_score, best_epoch, stale, stopped_early, start_epoch = [], -math.inf, None, 0, False, 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            lr_schedule.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"], torch_device)
            history, best_score, best_epoch = list(state["history"]), float(state["best_score"]), state["best_epoch"]
            stale, stopped_early, start_epoch = int(state["stale"]), bool(state["stopped_early"]), int(state["epoch"])

        train_loader = torch.utils.data.DataLoader(
            _TrainViews(dataset, preprocesses, augment, seed), batch_sampler=batch_sampler, num_workers=workers,
            collate_fn=_collate, pin_memory=torch_device.type == "cuda",
            prefetch_factor=2 if workers > 0 else None, persistent_workers=workers > 0,
            generator=torch.Generator())  # an own generator: creating iterators must not consume the global RNG
        val_loader = None if len(val_idx) == 0 else plain_loader(
            dataset, val_idx, preprocesses, batch_size=int(batch_size), device=torch_device, num_workers=workers,
            persistent=True)
        Y_val = Y[val_idx]

        export_info = {"config": config, "split": split_info, "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
                       "patch": dataset.patch_scale()}  # tile size for predict-slide

        def export(epoch: int, terms: dict | None):
            export_model(out_dir, model, specs=specs, preprocesses=preprocesses, widths=widths, genes=genes,
                         hidden=hidden, dropout=dropout, transform=target_transform,
                         info={**export_info, "best_epoch": epoch, "val": terms})

        def validate(description: str) -> dict:
            bar.start(description, len(val_idx))
            raw = predict_rows(model, dataset, val_idx, preprocesses, batch_size=int(batch_size), device=torch_device,
                               num_workers=workers, amp=use_amp, advance=bar.advance, loader=val_loader)
            terms = score_with_panels(target_transform.inverse_transform(raw), Y_val, panels)
            # early stopping on the unclipped mean of the four terms (the score clips at 0), as the mlp head
            terms["selection"] = (terms["mean_corr_cells"] + terms["max_corr_genes"] + terms["heg_corr"]
                                  + terms["hvg_corr"]) / 4.0
            return terms

        def val_columns(terms: dict | None) -> dict:
            return {} if terms is None else {f"val_{k}": float(v) for k, v in terms.items()}

        session_seconds, session_images, epoch_times = 0.0, 0, []
        if state is None and (epochs == 0 or (init is not None and val_loader is not None)):
            terms = validate("validating the initial model") if val_loader is not None else None
            row = {"epoch": 0, "stage": "initial", "train_loss": float("nan"), **val_columns(terms),
                   "images_per_s": float("nan"), "eta_s": float("nan"), "best": True}
            history.append(row)
            best_epoch, best_score = 0, (terms["selection"] if terms else -math.inf)
            export(0, terms)
            if on_epoch is not None:
                on_epoch(dict(row))

        epoch = start_epoch
        while epoch < int(epochs) and not stopped_early:
            epoch_start = time.perf_counter()
            torch.manual_seed(_derived_seed(seed, "dropout", epoch))
            train_backbones = epoch >= int(freeze_epochs)
            model.set_stage(train_backbones)
            batch_sampler.epoch = epoch
            batches = batch_sampler.batches(epoch)
            group_sizes = [min(accum_steps, len(batches) - (b // accum_steps) * accum_steps) for b in range(len(batches))]
            stage = "all" if train_backbones else "head"
            bar.start(f"epoch {epoch + 1}/{epochs} ({'backbones + head' if train_backbones else 'head only'})", len(batches))
            total_loss, n_seen = 0.0, 0
            optimizer.zero_grad(set_to_none=True)
            for b, (indices, stacks, errors) in enumerate(train_loader):
                if errors:
                    raise DatasetError(errors[0] + (f" ({len(errors)} unreadable images in this batch)" if len(errors) > 1 else ""))
                target = Yt[indices].to(torch_device, non_blocking=True)
                with autocast_for(torch_device, use_amp):
                    pred = model(views_to_device(stacks, preprocesses, torch_device))
                batch_loss = loss_fn(pred.float(), target, LOSS_OPTIONS, gene_weights)
                (batch_loss / group_sizes[b]).backward()
                if (b + 1) % accum_steps == 0 or b + 1 == len(batches):
                    lr_schedule.apply(optimizer)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    lr_schedule.step_batch()
                total_loss += float(batch_loss.detach()) * len(indices)
                n_seen += len(indices)
                elapsed = time.perf_counter() - epoch_start
                bar.advance(1, info=f"loss {total_loss / n_seen:.4f}  {n_seen / max(elapsed, 1e-9):.1f} img/s")
            train_seconds = time.perf_counter() - epoch_start
            terms = validate(f"epoch {epoch + 1}/{epochs} validation") if val_loader is not None else None
            train_loss = total_loss / max(n_seen, 1)
            lr_schedule.step_epoch(terms["selection"] if terms else -train_loss)
            score = terms["selection"] if terms else -train_loss
            improved = terms is None or score > best_score + 1e-6
            if improved:
                best_score, best_epoch, stale = score, epoch + 1, 0
            else:
                stale += 1
            epoch += 1
            if terms is not None and patience is not None and stale >= int(patience):
                stopped_early = True
            epoch_seconds = time.perf_counter() - epoch_start
            epoch_times.append(epoch_seconds)
            session_seconds += train_seconds
            session_images += n_seen
            remaining = 0 if stopped_early else int(epochs) - epoch
            row = {"epoch": epoch, "stage": stage, "train_loss": train_loss, **val_columns(terms),
                   "lr_head": _group_lr(optimizer, "head"), "lr_backbone": _group_lr(optimizer, "backbone"),
                   "images_per_s": n_seen / max(train_seconds, 1e-9), "train_seconds": round(train_seconds, 3),
                   "epoch_seconds": round(epoch_seconds, 3), "eta_s": remaining * float(np.mean(epoch_times)),
                   "best": bool(improved)}
            history.append(row)
            if improved:
                export(epoch, terms)
            with atomic_dir(checkpoint_path) as building:
                write_folder(building, {
                    "format_version": CHECKPOINT_VERSION, "config": config, "epoch": epoch,
                    "model": cpu_state(model), "optimizer": optimizer.state_dict(), "scheduler": lr_schedule.state_dict(),
                    "rng": _rng_state(torch_device), "best_score": best_score, "best_epoch": best_epoch, "stale": stale,
                    "stopped_early": stopped_early, "history": history,
                }, CHECKPOINT_KIND)
            if on_epoch is not None:
                on_epoch(dict(row))

    if not (out_dir / FINETUNED_FILE).is_file():
        raise FinetuneError(f"no model was exported to {out_dir}; is epochs > 0?")
    best_row = next((r for r in history if r["epoch"] == best_epoch), {})
    report = {
        "out_dir": str(out_dir), "best_epoch": best_epoch,
        "epochs_run": max((r["epoch"] for r in history), default=0), "stopped_early": stopped_early,
        "resumed_from_epoch": None if state is None else int(state["epoch"]),
        "history": history, "split": split_info, "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
        "n_genes": len(genes), "backbones": [s.to_dict() for s in specs], "widths": widths,
        "head_init": None if head_init is None else str(head_init), "device": str(torch_device),
        "precision": "bf16-autocast" if use_amp else "fp32",
        "images_per_s": session_images / session_seconds if session_seconds else None,
        "seconds": round(time.perf_counter() - started, 3),
        "paths": {"model": str(out_dir / FINETUNED_FILE), "info": str(out_dir / FINETUNED_INFO_FILE),
                  "checkpoint": str(checkpoint_path), "report": str(out_dir / REPORT_FILE)},
        "config": config,
    }
    if "val_score" in best_row:  # absent without validation
        report["best_score"] = best_row["val_score"]
        report["best_val"] = {k[4:]: v for k, v in best_row.items() if k.startswith("val_")}

    report = json_ready(report)
    write_json(out_dir / REPORT_FILE, report)
    return report


def _group_lr(optimizer, kind: str) -> float | None:
    rates = [g["lr"] for g in optimizer.param_groups if g["kind"] == kind]
    return float(max(rates)) if rates else None
