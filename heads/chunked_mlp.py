"""``mlp_streamed``: the ``mlp`` head trained from row chunks, in memory bounded by the chunk size.

Same network (``heads.mlp.build_mlp``), losses (``LOSSES``), optimiser (AdamW), output-bias
initialisation and early stopping on the validation challenge score as ``MLPHead``; what changes is
where the rows come from:

  1. a statistics pass over the chunks (``heads.streaming.RunningMoments``, diagonal only) gives
     the feature standardization (the ``FeaturePCA`` that ``MLPHead`` fits), the target means
     (output bias, and the centring of ``standardize_targets``), per-gene sums and variances (the
     HEG/HVG panels of the ``weighted_mse`` loss and of the validation score);
  2. each epoch visits the chunks in a shuffled order (when the source has random access, i.e. is
     a ``ChunkSource``; otherwise in the source's order), ``mix_chunks`` chunks at a time, shuffles
     the rows of those chunks together and takes minibatch steps over them; then drops them.

At most ``mix_chunks`` chunks (default 1) of the training source are alive at any time, plus the
validation set (``validation=(X_val, Y_val)``, in memory: keep it to a chunk or so). Runs are
deterministic for a given ``seed`` (the global torch RNG is left untouched).

Differences from ``MLPHead`` to know about: the minibatches mix rows of ``mix_chunks`` chunks only
(if the rows are sorted, e.g. by slide, raise ``mix_chunks`` or shuffle the file once when writing
it); ``fit(X, Y)`` holds out ``val_fraction`` of the rows as ``MLPHead`` does, but then streams
the rest through ``chunk_rows`` blocks; behind a ``TargetTransformed`` wrapper the validation score
and gene panels are computed on the transformed targets (``MLPHead`` can use the untransformed
ones, passed as ``reference_targets``/``inverse_targets``, which this head does not take).
"""
from __future__ import annotations

import numpy as np
import torch

from hexpr.heads.base import as_matrix, rng_split
from hexpr.heads.metrics import N_TOP_DEFAULT
from hexpr.heads.mlp import (
    LOSSES,
    EarlyStopping,
    MLPHead,
    gene_weights_from_panels,
    minibatches,
    predict_in_chunks,
    resolve_device,
    torch_session,
)
from hexpr.heads.params import Bool, Int
from hexpr.heads.streaming import DEFAULT_CHUNK_ROWS, ArrayChunks, ChunkSource, accumulate, is_reiterable, iterate_chunks


def panels_from_moments(n: int, mean_y: np.ndarray, var_y: np.ndarray, n_top: int) -> dict[str, np.ndarray]:
    """``heads.cv.training_panels`` from streamed moments: top ``n_top`` genes by sum and by
    variance (ties by column order, as ``heads.metrics.top_genes``)."""
    k = min(int(n_top), len(mean_y))
    return {"heg": np.argsort(-(mean_y * n), kind="stable")[:k],
            "hvg": np.argsort(-var_y, kind="stable")[:k]}


class ChunkedMLPHead(MLPHead):
    """``MLPHead`` trained from row chunks (see the module docstring): its hyper-parameters plus
    ``standardize_targets``, ``chunk_rows`` and ``mix_chunks``."""

    param_constraints = {**MLPHead.param_constraints, "standardize_targets": Bool(), "chunk_rows": Int(1),
                         "mix_chunks": Int(1)}
    bag_fit = None        # streamed row chunks: no bag loss (heads.bags)

    def __init__(self, hidden=(512,), dropout: float = 0.1, weight_decay: float = 1e-4,
                 lr: float = 1e-3, epochs: int = 40, batch_size: int = 256, loss: str = "mse",
                 pearson_axis: str = "both", pearson_weight: float = 1.0, huber_delta: float = 1.0,
                 gene_weight: float = 4.0, n_top: int = N_TOP_DEFAULT, val_fraction: float = 0.1,
                 patience: int = 6, standardize_targets: bool = False,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, mix_chunks: int = 1, seed: int = 0,
                 device: str = "auto", n_threads: int | None = None):
        super().__init__(hidden=hidden, dropout=dropout, weight_decay=weight_decay, lr=lr, epochs=epochs,
                         batch_size=batch_size, loss=loss, pearson_axis=pearson_axis, pearson_weight=pearson_weight,
                         huber_delta=huber_delta, gene_weight=gene_weight, n_top=n_top, val_fraction=val_fraction,
                         patience=patience, seed=seed, device=device, n_threads=n_threads)
        self.standardize_targets = standardize_targets
        self.chunk_rows = chunk_rows
        self.mix_chunks = mix_chunks

    def _check_options(self):
        super()._check_options()
        if int(self.mix_chunks) < 1:
            raise ValueError(f"mix_chunks must be >= 1, got {self.mix_chunks}")

    # -- fitting ---------------------------------------------------------------------------------
    def fit(self, X, Y, *, X_val=None, Y_val=None):
        """Fit on in-memory arrays: validation = (X_val, Y_val) when given, else ``val_fraction``
        of the rows (as ``MLPHead``); the training rows are streamed in ``chunk_rows`` blocks."""
        X, Y = self._start_fit(X, Y)
        validation = None
        rows = None
        if X_val is not None:
            validation = (X_val, Y_val)
        elif self.val_fraction:
            rows, val = rng_split(X.shape[0], self.val_fraction, self.seed)
            validation = (X[val], Y[val])
        single_output = self.single_output_
        self.fit_stream(ArrayChunks(X, Y, self.chunk_rows, rows=rows, dtype=np.float32), validation=validation)
        self.single_output_ = single_output
        return self

    def fit_stream(self, source, validation=None):
        """Train from a re-iterable chunk source of ``(X_chunk, Y_chunk)``; ``validation`` =
        ``(X_val, Y_val)`` in memory for early stopping, or None (train all ``epochs``)."""
        self._check_options()
        if not is_reiterable(source):
            raise ValueError("the chunked MLP reads the chunks once per epoch (plus a statistics pass); "
                             "pass a re-iterable source (a ChunkSource, a list, or a callable)")
        moments = accumulate(source, cross=False, dtype=np.float64)
        self.single_output_ = False
        self.n_features_in_ = moments.mean_x.shape[0]
        self.n_targets_ = moments.mean_y.shape[0]
        self.n_samples_seen_ = moments.n
        self.features_ = moments.feature_step(None)
        self.target_mean_ = moments.mean_y.copy()
        std_y = np.sqrt(moments.var_y)
        self.target_scale_ = (np.where(std_y > 1e-12 * max(1.0, float(np.abs(self.target_mean_).max())), std_y, 1.0)
                              if self.standardize_targets else np.ones(self.n_targets_))
        panels = panels_from_moments(moments.n, moments.mean_y, moments.var_y, self.n_top)
        weights = gene_weights_from_panels(self.n_targets_, panels, self.gene_weight)
        del moments
        if validation is not None:
            X_val = as_matrix(validation[0], "X_val")
            truth = as_matrix(validation[1], "Y_val")
            if X_val.shape[1] != self.n_features_in_ or truth.shape[1] != self.n_targets_:
                raise ValueError("validation data must have the same columns as the training chunks")
            validation = (self.features_.transform(X_val).astype(np.float32), truth)
        device = resolve_device(self.device)
        with torch_session(self.seed, self.n_threads) as generator:
            self.net_ = self._build_module("net_").to(device)
            with torch.no_grad():
                bias = 0.0 if self.standardize_targets else self.target_mean_
                self.net_[-1].bias.copy_(torch.as_tensor(np.broadcast_to(bias, (self.n_targets_,)).copy(),
                                                         dtype=torch.float32))
            self._train(source, validation, panels, weights, device, generator)
        return self

    def _chunk_groups(self, source, generator):
        """Lists of chunk indices (``mix_chunks`` per group) in a shuffled order, or None when the
        source has no random access (then it is read in its own order)."""
        if not isinstance(source, ChunkSource):
            return None
        order = torch.randperm(len(source), generator=generator).tolist()
        k = int(self.mix_chunks)
        return [order[i:i + k] for i in range(0, len(order), k)]

    def _epoch_blocks(self, source, generator):
        """Yield ``(X, Y)`` training blocks of one epoch, each made of ``mix_chunks`` chunks."""
        groups = self._chunk_groups(source, generator)
        if groups is not None:
            for group in groups:
                parts = [source.read_chunk(i) for i in group]
                if len(parts) == 1:
                    X, Y = parts.pop()
                else:
                    X = np.concatenate([p[0] for p in parts])
                    Y = np.concatenate([p[1] for p in parts])
                    parts.clear()
                yield X, Y
                del X, Y
            return
        pending = []
        for X, Y in iterate_chunks(source):
            pending.append((X, Y))
            del X, Y
            if len(pending) == int(self.mix_chunks):
                yield self._merge(pending)
        if pending:
            yield self._merge(pending)

    @staticmethod
    def _merge(pending):
        if len(pending) == 1:
            return pending.pop()
        X = np.concatenate([p[0] for p in pending])
        Y = np.concatenate([p[1] for p in pending])
        pending.clear()
        return X, Y

    def _train(self, source, validation, panels, weights, device, generator):
        w = torch.as_tensor(weights, dtype=torch.float32, device=device)
        x_mean = self.features_.mean_.astype(np.float32)
        x_scale = self.features_.scale_.astype(np.float32)
        y_mean = self.target_mean_.astype(np.float32)
        y_scale = self.target_scale_.astype(np.float32)
        loss_fn = LOSSES[self.loss]
        optimizer = torch.optim.AdamW(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        stopping = EarlyStopping(self.patience)
        self.history_ = []
        self.max_rows_in_memory_ = 0
        for epoch in range(int(self.epochs)):
            self.net_.train()
            total, seen = 0.0, 0
            for X, Y in self._epoch_blocks(source, generator):
                n_rows = X.shape[0]
                self.max_rows_in_memory_ = max(self.max_rows_in_memory_, n_rows)
                # standardized in float32: no float64 copy of the chunk
                Xt = torch.as_tensor((np.asarray(X, dtype=np.float32) - x_mean) / x_scale, device=device)
                Yt = np.asarray(Y, dtype=np.float32)
                if self.standardize_targets:
                    Yt = (Yt - y_mean) / y_scale
                Yt = torch.as_tensor(Yt, device=device)
                del X, Y
                for idx in minibatches(n_rows, int(self.batch_size), generator):
                    idx = idx.to(device)
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(self.net_(Xt[idx]), Yt[idx], self, w)
                    loss.backward()
                    optimizer.step()
                    total += loss.detach().item() * len(idx)
                seen += n_rows
                del Xt, Yt
            record = {"epoch": epoch + 1, "train_loss": total / max(1, seen)}
            if validation is not None:
                Z_val, truth = validation
                pred = self._from_network(predict_in_chunks(self.net_, Z_val, device))
                record["val_score"] = stopping.update(self.net_, pred, truth, panels)
            self.history_.append(record)
            if validation is not None and stopping.should_stop:
                break
        stopping.finish(self, validation is not None)

    def _from_network(self, out: np.ndarray) -> np.ndarray:
        if not self.standardize_targets:
            return out
        return out * self.target_scale_ + self.target_mean_
