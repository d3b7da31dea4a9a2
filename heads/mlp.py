"""Multi-output MLP head (torch) plus the torch helpers other trained heads reuse.

Input features are standardized; the network maps them to all G genes at once. Training uses
AdamW on minibatches with one of the losses in ``LOSSES`` and stops early on the validation
challenge score (an internal split of the training data, or validation data passed to ``fit``).
The gene panels of that score and of the ``weighted_mse`` loss come from the training targets
only, and the score is computed in the scale of the original targets when the head sits behind
a target transform. Runs are deterministic for a given ``seed`` (the global torch RNG is left
untouched). ``device="auto"`` (the default) uses CUDA when present, else the CPU.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from hexpr.heads.base import FeaturePCA, Head, as_matrix, rng_split
from hexpr.heads.cv import score_with_panels, training_panels
from hexpr.heads.metrics import N_TOP_DEFAULT
from hexpr.heads.params import N_THREADS, NON_NEGATIVE, POSITIVE, SEED, Device, Int, Options, Real, Widths

_PREDICT_CHUNK = 4096


# --------------------------------------------------------------------------------------------
# torch helpers shared by trained heads
# --------------------------------------------------------------------------------------------
def resolve_device(device: str = "auto", *, strict: bool = True) -> torch.device:
    """"auto" -> CUDA if available else CPU. A requested but missing CUDA is an error when
    ``strict`` (fitting) and falls back to CPU otherwise (loading a saved model)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        if strict:
            raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
        return torch.device("cpu")
    return dev


@contextmanager
def torch_session(seed: int, n_threads: int | None = None):
    """Seeded torch RNG (restored afterwards) and, optionally, a fixed intra-op thread count."""
    previous_threads = torch.get_num_threads()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if n_threads:
            torch.set_num_threads(int(n_threads))
        try:
            yield torch.Generator().manual_seed(seed)
        finally:
            torch.set_num_threads(previous_threads)


def build_mlp(n_in: int, hidden, n_out: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear -> GELU -> Dropout blocks for each width in ``hidden``, then a linear output layer."""
    layers, width = [], n_in
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.GELU(), nn.Dropout(dropout)]
        width = int(h)
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def as_widths(hidden) -> tuple[int, ...]:
    """Hidden sizes from an int, a list/tuple, or a string like "512,256" (YAML/CLI friendly)."""
    if hidden is None or hidden == "":
        return ()
    if isinstance(hidden, (int, np.integer)):
        return (int(hidden),)
    if isinstance(hidden, str):
        return tuple(int(h) for h in hidden.replace("x", ",").split(",") if h.strip())
    return tuple(int(h) for h in hidden)


def minibatches(n: int, batch_size: int, generator: torch.Generator):
    """Shuffled index batches of about ``batch_size`` (no batch smaller than half of it)."""
    perm = torch.randperm(n, generator=generator)
    return torch.tensor_split(perm, max(1, math.ceil(n / batch_size - 0.5)))


@torch.no_grad()
def predict_in_chunks(module: nn.Module, X: np.ndarray, device: torch.device) -> np.ndarray:
    module.eval()
    out = [module(torch.as_tensor(X[i:i + _PREDICT_CHUNK], dtype=torch.float32, device=device)).cpu()
           for i in range(0, X.shape[0], _PREDICT_CHUNK)]
    return torch.cat(out).double().numpy()


@contextmanager
def torch_threads(n_threads: int | None):
    """Run the block with ``n_threads`` intra-op torch threads (unchanged when None)."""
    previous = torch.get_num_threads()
    if n_threads:
        torch.set_num_threads(int(n_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TorchStateMixin:
    """What torch heads share: torch modules pickled as CPU ``state_dict``s and rebuilt on load,
    and the scikit-learn ``non_deterministic`` tag when the head trains on CUDA.

    A head lists its module attributes in ``_torch_modules`` and implements
    ``_build_module(attr) -> nn.Module`` from its (already restored) fitted attributes.
    """

    _torch_modules: tuple[str, ...] = ()

    def _non_deterministic(self) -> bool:
        # CUDA kernels (atomics in backward passes) may differ between runs with the same seed
        return resolve_device(getattr(self, "device", "cpu"), strict=False).type == "cuda"

    def __getstate__(self):
        state = dict(self.__dict__)
        saved = {}
        for attr in self._torch_modules:
            module = state.pop(attr, None)
            if module is not None:
                saved[attr] = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        state["_torch_state"] = saved
        return state

    def __setstate__(self, state):
        saved = state.pop("_torch_state", {})
        self.__dict__.update(state)
        device = resolve_device(getattr(self, "device", "cpu"), strict=False)
        for attr, weights in saved.items():
            module = self._build_module(attr)
            module.load_state_dict(weights)
            setattr(self, attr, module.to(device).eval())

    def _build_module(self, attr: str) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# losses: (pred, target, head, gene_weights) -> scalar tensor
# --------------------------------------------------------------------------------------------
def correlation_loss(pred, target, dim: int) -> torch.Tensor:
    """1 - mean Pearson r of matching slices along ``dim`` (dim=1: per spot, dim=0: per gene)."""
    p = pred - pred.mean(dim=dim, keepdim=True)
    t = target - target.mean(dim=dim, keepdim=True)
    r = (p * t).sum(dim=dim) / (p.norm(dim=dim) * t.norm(dim=dim) + 1e-8)
    return 1.0 - r.mean()


def pearson_loss(pred, target, head, weights=None):
    axes = {"spot": (1,), "gene": (0,), "both": (1, 0)}[head.pearson_axis]
    return sum(correlation_loss(pred, target, d) for d in axes) / len(axes)


def logcosh_loss(pred, target, head, weights=None):
    d = pred - target
    return (d + nn.functional.softplus(-2.0 * d) - math.log(2.0)).mean()


LOSSES = {
    "mse": lambda pred, target, head, w=None: nn.functional.mse_loss(pred, target),
    "huber": lambda pred, target, head, w=None: nn.functional.huber_loss(pred, target, delta=head.huber_delta),
    "logcosh": logcosh_loss,
    "pearson": pearson_loss,
    "mse+pearson": lambda pred, target, head, w=None: (nn.functional.mse_loss(pred, target)
                                                       + head.pearson_weight * pearson_loss(pred, target, head)),
    "weighted_mse": lambda pred, target, head, w=None: (((pred - target) ** 2) * w).mean(),
}


def gene_weights_from_panels(n_genes: int, panels: dict, boost: float) -> np.ndarray:
    """Per-gene loss weights (mean 1): genes in the HEG or HVG panel count ``1 + boost``."""
    w = np.ones(n_genes)
    w[np.union1d(panels["heg"], panels["hvg"])] += boost
    return w / w.mean()


def panel_gene_weights(reference: np.ndarray, n_top: int, boost: float) -> np.ndarray:
    """Per-gene loss weights from the panels of the training targets ``reference``."""
    return gene_weights_from_panels(reference.shape[1], training_panels(reference, n_top), boost)


class EarlyStopping:
    """Validation bookkeeping shared by the MLP heads: score each epoch, keep the best weights.

    The score is the unclipped mean of the four challenge terms (the challenge score clips at 0,
    which would hide progress below zero), on panels chosen from the training targets.
    """

    def __init__(self, patience: int):
        self.patience = int(patience)
        self.best_score, self.best_state, self.stale = -np.inf, None, 0

    def update(self, net: nn.Module, pred: np.ndarray, truth: np.ndarray, panels: dict) -> float:
        terms = score_with_panels(pred, truth, panels)
        score = (terms["mean_corr_cells"] + terms["max_corr_genes"] + terms["heg_corr"] + terms["hvg_corr"]) / 4.0
        if score > self.best_score + 1e-6:
            self.best_score, self.stale = score, 0
            self.best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            self.stale += 1
        return score

    @property
    def should_stop(self) -> bool:
        return self.stale >= self.patience

    def finish(self, head, validated: bool) -> None:
        """Restore the best weights and set ``best_epoch_`` / ``best_val_score_`` on ``head``."""
        if self.best_state is not None:
            head.net_.load_state_dict(self.best_state)
        head.net_.eval()
        head.best_epoch_ = (max(head.history_, key=lambda r: r.get("val_score", -np.inf))["epoch"]
                            if validated else len(head.history_))
        head.best_val_score_ = float(self.best_score) if validated else None


class _BagForward:
    """Predictions of a minibatch of observations: the mean of the network's outputs over each
    observation's sub-tiles (the bag loss compares these with the targets)."""

    def __init__(self, net: nn.Module, bags, device: torch.device):
        self.net = net
        order = np.argsort(bags.index, kind="stable")
        self.order = order
        self.starts = np.concatenate([[0], np.cumsum(bags.sizes)])
        self.sizes = bags.sizes
        self.device = device

    def __call__(self, Xt: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        obs = obs.cpu().numpy()
        rows = np.concatenate([self.order[self.starts[o]:self.starts[o + 1]] for o in obs])
        local = torch.as_tensor(np.repeat(np.arange(len(obs)), self.sizes[obs]), device=self.device)
        out = self.net(Xt[torch.as_tensor(rows, device=self.device)])
        total = torch.zeros(len(obs), out.shape[1], dtype=out.dtype, device=self.device).index_add_(0, local, out)
        return total / torch.as_tensor(self.sizes[obs], dtype=out.dtype, device=self.device)[:, None]


# --------------------------------------------------------------------------------------------
# the head
# --------------------------------------------------------------------------------------------
class MLPHead(TorchStateMixin, Head):
    """Multi-output MLP with early stopping on the validation challenge score.

    Fine-tuning (``heads.finetune``) starts from a fitted head through ``hidden_widths``,
    ``dropout``, ``network_state()`` and ``input_standardization()``.
    """

    param_constraints = {
        "hidden": Widths(), "dropout": Real(0, 1, high_open=True), "weight_decay": NON_NEGATIVE, "lr": POSITIVE,
        "epochs": Int(1), "batch_size": Int(1), "loss": Options(*LOSSES), "pearson_axis": Options("spot", "gene", "both"),
        "pearson_weight": NON_NEGATIVE, "huber_delta": POSITIVE, "gene_weight": NON_NEGATIVE, "n_top": Int(1),
        "val_fraction": Real(0, 1, high_open=True), "patience": Int(1), "seed": SEED, "device": Device(),
        "n_threads": N_THREADS,
    }

    _torch_modules = ("net_",)
    bag_fit = "bag_loss"      # fit(bags=...): mean of sub-tile predictions vs target (heads.bags)
    search_space = {
        "hidden": [[256], [512], [512, 256]],
        "dropout": [0.0, 0.1, 0.25, 0.5],
        "lr": {"log": [1e-4, 3e-3]},
        "weight_decay": {"log": [1e-6, 1e-2]},
        "batch_size": [128, 256, 512],
        "loss": ["mse", "huber", "pearson", "mse+pearson", "weighted_mse"],
    }

    def __init__(self, hidden=(512,), dropout: float = 0.1, weight_decay: float = 1e-4,
                 lr: float = 1e-3, epochs: int = 40, batch_size: int = 256, loss: str = "mse",
                 pearson_axis: str = "both", pearson_weight: float = 1.0, huber_delta: float = 1.0,
                 gene_weight: float = 4.0, n_top: int = N_TOP_DEFAULT, val_fraction: float = 0.1,
                 patience: int = 6, seed: int = 0, device: str = "auto", n_threads: int | None = None):
        self.hidden = hidden
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.loss = loss
        self.pearson_axis = pearson_axis
        self.pearson_weight = pearson_weight
        self.huber_delta = huber_delta
        self.gene_weight = gene_weight
        self.n_top = n_top
        self.val_fraction = val_fraction
        self.patience = patience
        self.seed = seed
        self.device = device
        self.n_threads = n_threads

    min_samples = 3     # an internal validation split needs two training rows and one held out

    def _build_module(self, attr):
        return build_mlp(self.features_.n_output_, self.hidden_widths, self.n_targets_, self.dropout)

    # -- what fine-tuning starts from ----------------------------------------------------------
    @property
    def hidden_widths(self) -> tuple[int, ...]:
        """The hidden layer widths as a tuple of ints (``hidden`` may be a string or an int)."""
        return as_widths(self.hidden)

    def network_state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the fitted network's weights (the ``state_dict`` of ``build_mlp``'s module)."""
        self._check_fitted()
        return {k: v.detach().cpu().clone() for k, v in self.net_.state_dict().items()}

    def input_standardization(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, scale) of the fitted feature standardization: the network sees (X - mean) / scale."""
        self._check_fitted()
        return (np.asarray(self.features_.mean_, dtype=np.float64).copy(),
                np.asarray(self.features_.scale_, dtype=np.float64).copy())

    def _check_options(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.pearson_axis not in ("spot", "gene", "both"):
            raise ValueError(f"pearson_axis must be 'spot', 'gene' or 'both', got {self.pearson_axis!r}")

    def _split(self, X, Y, reference, X_val, Y_val, to_reference):
        """(X_tr, Y_tr, ref_tr, X_val, ref_val): training rows and the validation spots with their
        targets in the reference (untransformed) scale; validation is None when there is none."""
        if X_val is not None:
            X_val, Y_val = as_matrix(X_val, "X_val"), as_matrix(Y_val, "Y_val")
            if X_val.shape[1] != X.shape[1] or Y_val.shape[1] != Y.shape[1]:
                raise ValueError("validation data must have the same columns as the training data")
            return X, Y, reference, X_val, to_reference(Y_val)
        if not self.val_fraction:
            return X, Y, reference, None, None
        train, val = rng_split(X.shape[0], self.val_fraction, self.seed)
        return X[train], Y[train], reference[train], X[val], reference[val]

    def fit(self, X, Y, *, X_val=None, Y_val=None, reference_targets=None, inverse_targets=None, bags=None):
        """Fit on (X, Y); early-stop on (X_val, Y_val) when given, else on an internal split.

        When Y is a transform of the targets (``TargetTransformed`` passes both):
        ``reference_targets`` are the untransformed targets of the same rows (gene panels are
        chosen on them) and ``inverse_targets`` maps predictions back, so the validation score is
        the challenge score in the targets' own scale.

        ``bags`` (``heads.bags.Bags``): X holds sub-tiles, Y observations; the loss compares the
        mean of each observation's sub-tile predictions with its target (the bag loss), and the
        internal validation split holds out whole observations."""
        if bags is not None and X_val is not None:
            raise ValueError("validation data cannot be combined with bags; use the internal split (val_fraction)")
        X, Y = self._start_fit(X, Y, bags)
        self._check_options()
        reference = Y if reference_targets is None else as_matrix(reference_targets, "reference_targets")
        to_reference = inverse_targets or (lambda values: values)
        if bags is None:
            X_tr, Y_tr, ref_tr, X_val, ref_val = self._split(X, Y, reference, X_val, Y_val, to_reference)
            bags_tr = bags_val = None
        else:
            X_tr, Y_tr, ref_tr, X_val, ref_val, bags_tr, bags_val = self._split_bags(X, Y, reference, bags)
        self.features_ = FeaturePCA(None, standardize=True).fit(X_tr)
        device = resolve_device(self.device)
        panels = training_panels(ref_tr, self.n_top)
        weights = panel_gene_weights(ref_tr, self.n_top, self.gene_weight)
        validation = None if X_val is None else (self.features_.transform(X_val), ref_val, to_reference, bags_val)
        with torch_session(self.seed, self.n_threads) as generator:
            self.net_ = self._build_module("net_").to(device)
            with torch.no_grad():
                self.net_[-1].bias.copy_(torch.as_tensor(Y_tr.mean(axis=0), dtype=torch.float32))
            self._train(X_tr, Y_tr, validation, panels, weights, device, generator, bags_tr)
        return self

    def _split_bags(self, X, Y, reference, bags):
        """The internal split by observation: (X_tr, Y_tr, ref_tr, X_val, ref_val, bags_tr, bags_val)."""
        if not self.val_fraction:
            return X, Y, reference, None, None, bags, None
        train, val = rng_split(Y.shape[0], self.val_fraction, self.seed)
        rows_tr, bags_tr = bags.subset(train)
        rows_val, bags_val = bags.subset(val)
        return X[rows_tr], Y[train], reference[train], X[rows_val], reference[val], bags_tr, bags_val

    def _train(self, X_tr, Y_tr, validation, panels, weights, device, generator, bags=None):
        """Minibatch AdamW; ``validation`` = (standardized X_val, reference-scale truth, inverse, bags or None).
        With ``bags`` a minibatch is a set of observations and the loss compares the mean of their
        sub-tile predictions with their targets."""
        Xt = torch.as_tensor(self.features_.transform(X_tr), dtype=torch.float32, device=device)
        Yt = torch.as_tensor(Y_tr, dtype=torch.float32, device=device)
        w = torch.as_tensor(weights, dtype=torch.float32, device=device)
        loss_fn = LOSSES[self.loss]
        forward = self.net_ if bags is None else _BagForward(self.net_, bags, device)
        optimizer = torch.optim.AdamW(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        stopping = EarlyStopping(self.patience)
        self.history_ = []
        for epoch in range(int(self.epochs)):
            self.net_.train()
            total = 0.0
            for idx in minibatches(Yt.shape[0], int(self.batch_size), generator):
                idx = idx.to(device)
                optimizer.zero_grad(set_to_none=True)
                pred = self.net_(Xt[idx]) if bags is None else forward(Xt, idx)
                loss = loss_fn(pred, Yt[idx], self, w)
                loss.backward()
                optimizer.step()
                total += loss.detach().item() * len(idx)
            record = {"epoch": epoch + 1, "train_loss": total / Yt.shape[0]}
            if validation is not None:
                Z_val, truth, to_reference, bags_val = validation
                raw = predict_in_chunks(self.net_, Z_val, device)
                pred = to_reference(raw if bags_val is None else bags_val.mean(raw))
                record["val_score"] = stopping.update(self.net_, pred, truth, panels)
            self.history_.append(record)
            if validation is not None and stopping.should_stop:
                break
        stopping.finish(self, validation is not None)

    def _from_network(self, out: np.ndarray) -> np.ndarray:
        """Network outputs -> predictions (identity here; a head that scales its targets undoes it)."""
        return out

    def _predict(self, X):
        device = next(self.net_.parameters()).device
        with torch_threads(self.n_threads):
            return self._from_network(predict_in_chunks(self.net_, self.features_.transform(X), device))
