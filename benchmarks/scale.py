"""Scale benchmark: heads fitted on more rows than memory, from chunked HDF5 files.

    python -m benchmarks.scale                          # 1,000,000 spots x 1,664 features -> 3,467 genes
    python -m benchmarks.scale --rows 50000 --out /tmp/scale_small.json    # quick run (a minute or two)
    python -m benchmarks.scale --dir /data/scale --keep                    # keep the generated files
    python -m benchmarks.scale --dir /data/scale --reuse                   # reuse them (same shape and seed)

1. Synthetic data (a low-rank latent signal shared by features and genes, plus noise; a few
   dominant genes, as ``benchmarks/head_fits.py``) is generated chunk by chunk and written straight
   to two HDF5 files with ``embedder.cache.write_feature_file``: ``features.h5`` (ids + features,
   float16) and ``targets.h5`` (ids + targets, float16): 1M rows = 3.3 GB + 6.9 GB. The free
   disk is checked first; when it is short, the largest row count that fits is used (and reported).
2. Each head is fitted in its own subprocess on the first ``rows - test_rows`` rows, streamed in
   ``--chunk-rows`` blocks (``heads.streaming.H5Chunks``):
     * ``ridge``: ``StreamedRidgeHead`` (one pass; per-gene alpha by GCV; ``--ridge-precision``);
     * ``mlp``: ``ChunkedMLPHead``, ``--mlp-epochs`` epochs (default 1), a statistics pass first,
       no early stopping (no validation set).
   Measured per head: fit time, peak resident memory of the fit (VmHWM reset after the imports,
   read right after ``fit``: includes the interpreter/torch baseline) and of the whole child
   process (``os.wait4``), and the challenge score (``heads.metrics.challenge_score``) on the
   held-out last ``test_rows`` rows against the mean expression profile of the training rows.
3. A table on stdout and JSON at ``--out`` (default benchmarks/results/scale.json). The generated
   files are deleted at the end unless ``--keep``.

Fit times depend on the machine's load: the figures record ``os.getloadavg()`` before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import peak_memory_mib, reset_peak_memory, resident_mib

REPO = Path(__file__).resolve().parents[1]

FULL_ROWS, N_FEATURES, N_GENES = 1_000_000, 1664, 3467
DISK_DTYPE = np.float16
GOAL_PEAK_GIB = 24.0
FEATURES_FILE, TARGETS_FILE = "features.h5", "targets.h5"


# --------------------------------------------------------------------------------------------
# memory (Linux): reset the peak, read it back
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# synthetic data, chunk by chunk
# --------------------------------------------------------------------------------------------
class Synthetic:
    """Deterministic synthetic rows: block ``i`` depends only on (seed, i), so features and targets
    can be written by two independent passes and any block regenerated alone.

    X = latent @ A / sqrt(rank) + 0.5 noise;  Y = clip(gene_mean + tanh(latent) @ B + noise, 0),
    with ``n_dominant`` genes of 8x mean and 4x loadings (as benchmarks/head_fits.synthetic_expression).
    """

    def __init__(self, n_features: int, n_genes: int, rank: int = 16, n_dominant: int = 10,
                 noise: float = 1.0, seed: int = 0, block_rows: int = 16384):
        rng = np.random.default_rng([seed, 0])
        self.rank, self.noise, self.seed, self.block_rows = rank, noise, seed, block_rows
        self.A = (rng.standard_normal((rank, n_features)) / np.sqrt(rank)).astype(np.float32)
        gene_mean = rng.gamma(1.5, 1.0, size=n_genes)
        loadings = rng.standard_normal((rank, n_genes)) * rng.gamma(1.0, 0.3, size=n_genes)
        dominant = rng.choice(n_genes, size=min(n_dominant, n_genes), replace=False)
        gene_mean[dominant] *= 8.0
        loadings[:, dominant] *= 4.0
        self.gene_mean = gene_mean.astype(np.float32)
        self.B = loadings.astype(np.float32)

    def _latent(self, i: int, rows: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 1, i]).standard_normal((rows, self.rank), dtype=np.float32)

    def features(self, i: int, rows: int) -> np.ndarray:
        X = self._latent(i, rows) @ self.A
        X += 0.5 * np.random.default_rng([self.seed, 2, i]).standard_normal(X.shape, dtype=np.float32)
        return X

    def targets(self, i: int, rows: int) -> np.ndarray:
        Y = np.tanh(self._latent(i, rows)) @ self.B
        Y += self.gene_mean
        Y += self.noise * np.random.default_rng([self.seed, 3, i]).standard_normal(Y.shape, dtype=np.float32)
        return np.clip(Y, 0.0, None, out=Y)

    def blocks(self, n_rows: int, kind: str):
        make = self.features if kind == "features" else self.targets
        for i, a in enumerate(range(0, n_rows, self.block_rows)):
            yield make(i, min(self.block_rows, n_rows - a))


def bytes_needed(rows: int, n_features: int, n_genes: int) -> int:
    itemsize = np.dtype(DISK_DTYPE).itemsize
    return rows * ((n_features + n_genes) * itemsize + 2 * 24)      # + ids (two files), generous


def rows_that_fit(rows: int, folder: Path, n_features: int, n_genes: int, margin: float = 0.85) -> tuple[int, int]:
    """(rows to use, free bytes): the requested rows, or the most that fit in ``margin`` of the free disk."""
    free = shutil.disk_usage(folder).free
    per_row = bytes_needed(1, n_features, n_genes)
    return min(rows, int(free * margin) // per_row), free


def generate(folder: Path, rows: int, n_features: int, n_genes: int, seed: int, block_rows: int) -> dict:
    from hexpr.embedder.cache import write_feature_file

    synthetic = Synthetic(n_features, n_genes, seed=seed, block_rows=block_rows)
    ids = [f"spot{i:08d}" for i in range(rows)]
    attrs = {"synthetic": json.dumps({"rows": rows, "features": n_features, "genes": n_genes, "seed": seed})}
    start = time.perf_counter()
    reset_peak_memory()
    write_feature_file(folder / FEATURES_FILE, ids, synthetic.blocks(rows, "features"), dtype=DISK_DTYPE, attrs=attrs)
    write_feature_file(folder / TARGETS_FILE, ids, synthetic.blocks(rows, "targets"), dtype=DISK_DTYPE,
                       dataset_name="targets", attrs=attrs)
    sizes = {name: (folder / name).stat().st_size for name in (FEATURES_FILE, TARGETS_FILE)}
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mib": peak_memory_mib(),
            "file_bytes": sizes, "total_gb": round(sum(sizes.values()) / 1e9, 2)}


def existing_data_matches(folder: Path, rows: int, n_features: int, n_genes: int, seed: int) -> bool:
    from hexpr.embedder.cache import read_attrs

    try:
        want = {"rows": rows, "features": n_features, "genes": n_genes, "seed": seed}
        return all(json.loads(read_attrs(folder / name).get("synthetic", "{}")) == want
                   for name in (FEATURES_FILE, TARGETS_FILE))
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# one head, in a child process
# --------------------------------------------------------------------------------------------
def make_head(name: str, args):
    if name == "ridge":
        from hexpr.heads.streamed_ridge import StreamedRidgeHead
        return StreamedRidgeHead(precision=args.ridge_precision)
    if name == "mlp":
        from hexpr.heads.chunked_mlp import ChunkedMLPHead
        return ChunkedMLPHead(hidden=args.mlp_hidden, epochs=args.mlp_epochs, batch_size=args.mlp_batch,
                              lr=args.mlp_lr, val_fraction=0, seed=args.seed, device=args.device)
    raise ValueError(f"unknown benchmark head {name!r}; use ridge or mlp")


def run_child(args) -> dict:
    import hexpr.heads.chunked_mlp  # noqa: F401  (import torch now: imports are not fit memory)
    import hexpr.heads.streamed_ridge  # noqa: F401
    from hexpr.embedder.cache import dataset_shape, read_feature_rows, read_rows
    from hexpr.heads.metrics import challenge_score
    from hexpr.heads.streaming import H5Chunks

    folder = Path(args.data)
    n_rows = dataset_shape(folder / FEATURES_FILE)[0]
    n_train = n_rows - args.test_rows
    source = H5Chunks(folder / FEATURES_FILE, folder / TARGETS_FILE, chunk_rows=args.chunk_rows, stop=n_train)
    head = make_head(args.child, args)
    rss_before = resident_mib()
    exact = reset_peak_memory()
    start = time.perf_counter()
    if args.child == "mlp":
        head.fit_stream(source, validation=None)
    else:
        head.fit_stream(source)
    fit_seconds = time.perf_counter() - start
    fit_peak = peak_memory_mib()
    # held-out rows: the last test_rows rows, in memory (small)
    start = time.perf_counter()
    X_test = read_feature_rows([folder / FEATURES_FILE], n_train, n_rows)
    Y_test = read_rows(folder / TARGETS_FILE, "targets", n_train, n_rows).astype(np.float64)
    pred = head.predict(X_test)
    train_mean = head.intercept_ if args.child == "ridge" else head.target_mean_
    score = challenge_score(pred, Y_test)
    floor = challenge_score(np.broadcast_to(train_mean, Y_test.shape).copy(), Y_test)
    result = {
        "head": args.child, "class": type(head).__name__, "params": head.get_params(),
        "n_train": int(n_train), "n_test": int(args.test_rows), "chunk_rows": args.chunk_rows,
        "n_chunks": len(source), "fit_seconds": round(fit_seconds, 1),
        "peak_rss_fit_mib": fit_peak, "rss_before_fit_mib": rss_before, "peak_is_fit_only": exact,
        "eval_seconds": round(time.perf_counter() - start, 1),
        "score": score["score"], "mean_profile_score": floor["score"],
        "ratio_to_mean": (score["score"] / floor["score"]) if floor["score"] > 0 else None,
        "terms": {k: score[k] for k in ("mean_corr_cells", "max_corr_genes", "heg_corr", "hvg_corr")},
        "pearson_all_genes": score["mean_corr_genes"],
    }
    if args.child == "mlp":
        result["epochs"] = len(head.history_)
        result["train_loss"] = [round(r["train_loss"], 4) for r in head.history_]
        result["max_rows_in_memory"] = head.max_rows_in_memory_
    else:
        result["alpha_median"] = float(np.median(head.alpha_))
    return result


def run_head(name: str, folder: Path, args) -> dict:
    out = folder / f"result_{name}.json"
    cmd = [sys.executable, "-m", "benchmarks.scale", "--child", name, "--data", str(folder),
           "--child-out", str(out), "--chunk-rows", str(args.chunk_rows), "--test-rows", str(args.test_rows),
           "--ridge-precision", args.ridge_precision, "--mlp-epochs", str(args.mlp_epochs),
           "--mlp-batch", str(args.mlp_batch), "--mlp-lr", str(args.mlp_lr), "--mlp-hidden", args.mlp_hidden,
           "--seed", str(args.seed), "--device", args.device]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    with open(folder / f"child_{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = round(time.perf_counter() - start, 1)
    process_peak = round(usage.ru_maxrss / 1024, 1)          # KiB on Linux
    if proc.returncode != 0 or not out.exists():
        tail = (folder / f"child_{name}.log").read_text().strip().splitlines()[-3:]
        return {"head": name, "error": tail or ["failed"], "wall_seconds": wall, "process_peak_rss_mib": process_peak}
    result = json.loads(out.read_text())
    result.update({"wall_seconds": wall, "process_peak_rss_mib": process_peak})
    return result


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    header = f"{'head':<6} {'train rows':>11} {'fit s':>8} {'fit peak GiB':>13} {'proc peak GiB':>14} " \
             f"{'score':>7} {'mean prof.':>10} {'ratio':>6}"
    lines = [header, "-" * len(header)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['head']:<6} ERROR {' '.join(r['error'])}")
            continue
        ratio = "-" if r["ratio_to_mean"] is None else f"{r['ratio_to_mean']:.2f}"
        lines.append(f"{r['head']:<6} {r['n_train']:>11,} {r['fit_seconds']:>8.1f} "
                     f"{r['peak_rss_fit_mib'] / 1024:>13.2f} {r['process_peak_rss_mib'] / 1024:>14.2f} "
                     f"{r['score']:>7.3f} {r['mean_profile_score']:>10.3f} {ratio:>6}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=FULL_ROWS, help="spots to generate (train + held-out)")
    p.add_argument("--features", type=int, default=N_FEATURES)
    p.add_argument("--genes", type=int, default=N_GENES)
    p.add_argument("--test-rows", type=int, default=None, help="held-out last rows (default min(20000, rows/10))")
    p.add_argument("--chunk-rows", type=int, default=16384)
    p.add_argument("--heads", default="ridge,mlp")
    p.add_argument("--ridge-precision", default="float64", choices=["float64", "float32"])
    p.add_argument("--mlp-epochs", type=int, default=1)
    p.add_argument("--mlp-batch", type=int, default=512)
    p.add_argument("--mlp-lr", type=float, default=1e-3)
    p.add_argument("--mlp-hidden", default="512")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="folder for the generated files (default: a new folder in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--reuse", action="store_true", help="reuse files in --dir made with the same shape and seed")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    # internal: one head in a child process
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        result = run_child(args)
        Path(args.child_out).write_text(json.dumps(result, indent=2, default=str))
        return 0
    from hexpr.embedder.files import write_json

    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="hexpr_scale_", dir="/tmp"))
    folder.mkdir(parents=True, exist_ok=True)
    created_folder = args.dir is None
    rows_requested = args.rows
    reused = args.reuse and existing_data_matches(folder, args.rows, args.features, args.genes, args.seed)
    note = None
    if not reused:
        rows, free = rows_that_fit(args.rows, folder, args.features, args.genes)
        if rows < args.rows:
            note = (f"{free / 1e9:.1f} GB free in {folder}: {args.rows:,} rows need "
                    f"{bytes_needed(args.rows, args.features, args.genes) / 1e9:.1f} GB; using {rows:,} rows")
            print(note, flush=True)
        args.rows = rows
    if args.test_rows is None:
        args.test_rows = min(20000, args.rows // 10)
    if args.rows - args.test_rows < 2 * args.features:
        raise SystemExit(f"too few rows ({args.rows:,}) for a benchmark with {args.features} features")
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        if reused:
            generation = {"reused": str(folder)}
        else:
            print(f"generating {args.rows:,} x {args.features} features and {args.genes} genes "
                  f"(float16) in {folder} ...", flush=True)
            generation = generate(folder, args.rows, args.features, args.genes, args.seed, args.chunk_rows)
            print(f"  {generation['total_gb']} GB in {generation['seconds']} s", flush=True)
        results = []
        for name in heads:
            print(f"fitting {name} ...", flush=True)
            results.append(run_head(name, folder, args))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    finally:
        if not args.keep:
            for name in (FEATURES_FILE, TARGETS_FILE):
                (folder / name).unlink(missing_ok=True)
            if created_folder:
                shutil.rmtree(folder, ignore_errors=True)
    report = {
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "started": started, "rows_requested": rows_requested, "rows": args.rows,
        "rows_note": note, "n_train": args.rows - args.test_rows, "n_test": args.test_rows,
        "n_features": args.features, "n_genes": args.genes, "disk_dtype": "float16",
        "chunk_rows": args.chunk_rows, "generation": generation,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "loadavg_before": [round(v, 2) for v in load_before],
                    "loadavg_after": [round(v, 2) for v in os.getloadavg()]},
        "goal_peak_gib": GOAL_PEAK_GIB,
        "peak_under_goal": all("error" not in r and r["process_peak_rss_mib"] / 1024 < GOAL_PEAK_GIB for r in results),
        "results": results,
    }
    write_json(Path(args.out), report)
    print()
    print(table(results))
    print(f"\nJSON: {args.out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
