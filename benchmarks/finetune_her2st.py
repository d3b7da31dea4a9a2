"""Fine-tuned vs frozen backbone on her2st, leave-one-section-out (CPU-sized).

Data: the 4 her2st sections (../shared/data/her2st) imported once with
``embedder.importers.import_dataset`` (112 µm patches at 0.5 µm/px = 224 px, log1p CP10k).
For every held-out section S (or those given with --sections):

  * genes: the 50 most variable genes of the *training* sections (log1p CP10k);
  * frozen: MobileNetV2 (the shared ImageNet weights) features at --size px, embedded once;
    heads ``ridge`` and ``mlp`` fitted on the training sections with ``heads.fitting.fit_head``
    (grouped CV over the training sections, then a refit on all of them); "best" = the head with
    the higher grouped-CV score on the training sections (the held-out section never decides);
  * fine-tuned: ``heads.finetune.finetune`` on the training sections, the head initialised
    from the frozen ``mlp`` head (``head_init``), for a fixed number of epochs without a
    validation split (``val_fold=None``: no held-out spot is used for model selection), then
    ``load_finetuned(...).predict_dataset`` on S (images embedded on the fly);
  * mean head: the training sections' mean profile.

Scores on S: mean Pearson r over the 50 genes (the HEST-Benchmark figure) and the challenge score
with gene panels from the training sections.

    python -m benchmarks.finetune_her2st                       # all 4 sections, CPU settings
    python -m benchmarks.finetune_her2st --sections C2 --epochs 2
    python -m benchmarks.finetune_her2st --device cuda --size 224 --epochs 10 --batch-size 64

Prints a table and writes JSON (default benchmarks/results/finetune_her2st.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import HER2ST, MOBILENET_SPEC
from benchmarks._common import MOBILENET_WEIGHTS as WEIGHTS
from hexpr.embedder.backbones import parse_backbone
from hexpr.embedder.datasets import open_dataset
from hexpr.embedder.features import ensure_features
from hexpr.heads.cv import score_with_panels, training_panels
from hexpr.heads.finetune import finetune, load_finetuned
from hexpr.heads.fitting import fit_head, load_model
from hexpr.heads.metrics import pearson_per_gene, top_genes

REPO = Path(__file__).resolve().parents[1]

N_GENES = 50


def spec_text(size: int) -> str:
    return f"{MOBILENET_SPEC},size={size}"


def import_once(work: Path) -> Path:
    from hexpr.embedder.importers import import_dataset

    root = work / "her2st"
    if not (root / "patches").is_dir():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import_dataset(HER2ST, root, progress=False)
    return root


def write_subset(root: Path, out: Path, sections: list[str], genes: list[str]) -> Path:
    """A HEST-style folder with ``sections`` only (patch files linked) and expression of ``genes``."""
    import anndata

    for sub in ("patches", "st"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for s in sections:
        link = out / "patches" / f"{s}.h5"
        if not link.exists():
            link.symlink_to((root / "patches" / f"{s}.h5").resolve())
        target = out / "st" / f"{s}.h5ad"
        if not target.exists():
            adata = anndata.read_h5ad(root / "st" / f"{s}.h5ad")
            X = adata[:, genes].X
            X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
            small = anndata.AnnData(X=X.astype(np.float32), obs=adata.obs.copy(), var=adata.var.loc[genes].copy())
            small.obsm["spatial"] = adata.obsm["spatial"]
            small.write_h5ad(target)
    return out


def scores(pred: np.ndarray, truth: np.ndarray, panels) -> dict:
    s = score_with_panels(pred, truth, panels)
    return {"pearson_hvg50": float(pearson_per_gene(pred, truth).mean()), "score": s["score"],
            "mean_corr_cells": s["mean_corr_cells"], "max_corr_genes": s["max_corr_genes"],
            "heg_corr": s["heg_corr"], "hvg_corr": s["hvg_corr"]}


def run_section(held: str, sections: list[str], root: Path, full, features, spec, work: Path, args) -> dict:
    started = time.perf_counter()
    train_sections = [s for s in sections if s != held]
    groups = full.groups.to_numpy().astype(str)
    train_rows = np.flatnonzero(groups != held)
    test_rows = np.flatnonzero(groups == held)
    Y_all = full.targets
    genes = [Y_all.columns[i] for i in top_genes(Y_all.to_numpy()[train_rows], N_GENES, by="variance")]
    fold = work / f"holdout_{held}"
    train_dir = write_subset(root, fold / "train", train_sections, genes)
    test_dir = write_subset(root, fold / "test", [held], genes)
    train_ds, test_ds = open_dataset(train_dir), open_dataset(test_dir)
    position = {sid: i for i, sid in enumerate(full.ids)}
    X_train = features.X[[position[i] for i in train_ds.ids]]
    X_test = features.X[[position[i] for i in test_ds.ids]]
    Y_train, Y_test = train_ds.targets[genes].to_numpy(), test_ds.targets[genes].to_numpy()
    panels = training_panels(Y_train, N_GENES)
    result = {"held_out": held, "train_sections": train_sections, "n_train": len(train_rows),
              "n_test": len(test_rows), "genes": genes}

    # frozen features + heads (grouped CV on the training sections picks the best)
    frozen = {}
    head_params = {"ridge": {}, "mlp": {"device": "cpu", "seed": args.seed}}
    for head in ("ridge", "mlp"):
        report = fit_head(X_train, Y_train, genes, head=head, params=head_params[head], transform="minmax",
                          folds=len(train_sections), groups=train_ds.groups.to_numpy(), seed=args.seed,
                          out_dir=fold / f"frozen_{head}", feature_meta=features.meta(), progress=False,
                          n_jobs=1, ids=train_ds.ids)
        pred = load_model(fold / f"frozen_{head}").predict(X_test)
        frozen[head] = {"cv_score_train_sections": report["cv"]["score"], **scores(pred, Y_test, panels)}
    best = max(frozen, key=lambda h: frozen[h]["cv_score_train_sections"])
    result["frozen"] = frozen
    result["frozen_best_head"] = best
    result["mean_head"] = scores(np.tile(Y_train.mean(axis=0), (len(Y_test), 1)), Y_test, panels)

    # fine-tuning from the frozen mlp head
    ft_dir = fold / "finetuned"
    report = finetune(
        train_dir, [spec], ft_dir, head_init=fold / "frozen_mlp", loss=args.loss, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr, weight_decay=args.weight_decay,
        warmup_epochs=1, schedule="cosine", freeze_epochs=args.freeze_epochs, layer_decay=args.layer_decay,
        val_fold=None, augment=True, seed=args.seed, max_train_batches=args.max_train_batches, device=args.device, num_workers=args.workers,
        resume=(ft_dir / "checkpoints" / "last.pt").is_file(), progress=args.progress,
        on_epoch=lambda row: print(f"  [{held}] epoch {row['epoch']}: train loss {row['train_loss']:.4f}, "
                                   f"{row['images_per_s']:.1f} img/s, ETA {row['eta_s']:.0f} s", flush=True))
    model = load_finetuned(ft_dir)
    pred = model.predict_dataset(test_ds, batch_size=64, device=args.device, num_workers=args.workers,
                                 progress=False).loc[test_ds.ids, genes].to_numpy()
    result["finetuned"] = {**scores(pred, Y_test, panels), "epochs": report["epochs_run"],
                           "train_images_per_s": report["images_per_s"], "seconds": report["seconds"],
                           "history": [{k: r.get(k) for k in ("epoch", "stage", "train_loss", "images_per_s")}
                                       for r in report["history"]]}
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


COLUMNS = (("mean head", lambda r: r["mean_head"]), ("frozen ridge", lambda r: r["frozen"]["ridge"]),
           ("frozen mlp", lambda r: r["frozen"]["mlp"]), ("frozen best", lambda r: r["frozen"][r["frozen_best_head"]]),
           ("fine-tuned", lambda r: r["finetuned"]))


def summarize(rows: list[dict]) -> dict:
    return {name: {m: float(np.mean([pick(r)[m] for r in rows])) for m in ("pearson_hvg50", "score")}
            for name, pick in COLUMNS}


def print_table(rows: list[dict]) -> None:
    cells = lambda d: f"{d['pearson_hvg50']:6.3f} {d['score']:6.3f}"  # noqa: E731
    header = f"{'held out':>8} {'spots':>5} | " + " | ".join(f"{name:>13}" for name, _ in COLUMNS)
    print(header)
    print(f"{'':>8} {'':>5} | " + " | ".join(f"{'r_hvg  score':>13}" for _ in COLUMNS))
    print("-" * len(header))
    for r in rows:
        print(f"{r['held_out']:>8} {r['n_test']:>5} | " + " | ".join(cells(pick(r)) for _, pick in COLUMNS)
              + f"   (best frozen head: {r['frozen_best_head']})")
    if len(rows) > 1:
        print("-" * len(header))
        mean = summarize(rows)
        print(f"{'mean':>8} {'':>5} | " + " | ".join(cells(mean[name]) for name, _ in COLUMNS))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "cache" / "bench_finetune_her2st")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "finetune_her2st.json")
    parser.add_argument("--sections", nargs="*", default=None, help="held-out sections (default: all)")
    parser.add_argument("--size", type=int, default=112, help="backbone input side in px")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--freeze-epochs", type=int, default=0, help="head-only epochs (the head starts fitted)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--head-lr", type=float, default=3e-4)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--layer-decay", type=float, default=None)
    parser.add_argument("--loss", default="mse")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--max-train-batches", type=int, default=None, help="cap per epoch (smoke runs)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    if not HER2ST.is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"needs {HER2ST} and {WEIGHTS}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="hexpr.embedder.importers")
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    root = import_once(args.work)
    full = open_dataset(root)
    sections = sorted(set(full.groups.astype(str)))
    held_out = args.sections or sections
    spec = parse_backbone(spec_text(args.size))
    embed_start = time.perf_counter()
    # frozen features in the precision the fine-tuning forward uses (fp32 on CPU, bf16 autocast on CUDA),
    # so fine-tuning starts exactly where the frozen mlp head is
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    features = ensure_features(full, [spec], args.work / "cache", progress=args.progress, device=args.device,
                               num_workers=args.workers, precision="auto" if on_cuda else "fp32")
    embed_seconds = time.perf_counter() - embed_start
    rows = []
    for held in held_out:
        print(f"held-out section {held} ...", flush=True)
        rows.append(run_section(held, sections, root, full, features, spec, args.work, args))
        print(f"  done in {rows[-1]['seconds']} s", flush=True)
    print()
    print_table(rows)
    result = {
        "benchmark": "finetune_her2st", "protocol": "leave-one-section-out; 50 HVG of the training sections; "
        "frozen heads fitted on training sections (best by grouped CV there); fine-tuning from the frozen mlp "
        "head, fixed epochs, no validation split",
        "backbone": spec.to_dict(), "sections": sections, "held_out": held_out,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "embed_seconds": round(embed_seconds, 1), "total_seconds": round(time.perf_counter() - started, 1),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "results": rows,
    }
    if len(rows) > 1:
        result["mean"] = summarize(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(args.out)
    print(f"\nwritten {args.out}")
    return result


if __name__ == "__main__":
    main()
