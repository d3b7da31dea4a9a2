"""The embed loop: images -> frozen-backbone features -> cache, for several backbones in one pass.

Each image is decoded once (in DataLoader workers) and resized once per distinct preprocessing;
normalisation happens on the device. Work is cut into fixed chunks of rows whose batches never
straddle a chunk boundary, so a resumed run computes exactly the batches an uninterrupted run
would and ends with identical features.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

from hexpr.embedder.backbones import BackboneSpec, LoadedBackbone, Preprocess, create_backbone
from hexpr.embedder.cache import DEFAULT_CACHE_DIR, CacheEntry, cache_key, describe_partials, locked_entries, partial_folders
from hexpr.embedder.datasets import DatasetError, PatchDataset
from hexpr.embedder.errors import UsageError

DEFAULT_CHUNK_SIZE = 512
CHECKPOINT_SECONDS = 30.0   # unfinished chunks' first rows are saved at least this often (and on Ctrl-C)
CPU_BATCH_SIZE = 16   # measured best on CPU (benchmarks/embed_throughput.py: 16 > 32 > 64)
GPU_BATCH_SIZE = 128


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def check_device(device: str = "auto") -> torch.device | None:
    """The torch device ``device`` names (None for "auto"); UsageError for a name torch does not know
    or a CUDA device this machine does not have."""
    if device == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device; use {DEVICE_CHOICES}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available here (torch.cuda.is_available() is False); "
                             "use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: no MPS device is available here; use --device cpu or auto")
    elif dev.type not in ("cpu", "mps"):
        raise UsageError(f"--device {device!r} is not supported; use {DEVICE_CHOICES}")
    return dev


def resolve_device(device: str = "auto") -> torch.device:
    dev = check_device(device)
    if dev is not None:
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


PRECISIONS = ("auto", "fp32", "bf16")


def _whole(value, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= low


def check_embed_options(*, batch_size: int | None = None, num_workers: int | None = None, device: str = "auto",
                        precision: str = "auto", chunk_size: int = DEFAULT_CHUNK_SIZE, **_other) -> None:
    """Refuse a bad embedding option before any work (one UsageError naming the option); the
    other keyword arguments of ``embed_dataset`` are accepted and ignored."""
    if batch_size is not None and not _whole(batch_size, 1):
        raise UsageError(f"--batch-size must be a whole number >= 1 (images per forward pass), got {batch_size!r}")
    if num_workers is not None and not _whole(num_workers, 0):
        raise UsageError(f"--workers must be a whole number >= 0 (0: decode in the main process), got {num_workers!r}")
    if not _whole(chunk_size, 1):
        raise UsageError(f"--chunk-size must be a whole number >= 1 (rows per resumable chunk), got {chunk_size!r}")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    check_device(device)


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA and on CPUs with native bf16 (AMX/AVX512-BF16), else fp32 (None)."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16" or device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16()):
        return torch.bfloat16
    return None


@dataclass
class _Ranks:
    """This process's place in a torchrun launch (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    dist: object = None

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()


def distributed_ranks() -> _Ranks:
    """Join the process group that torchrun describes in the environment (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Ranks()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return _Ranks(dist.get_rank(), dist.get_world_size(), dist)


def default_batch_size(device: torch.device) -> int:
    return GPU_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE


def default_num_workers(device: torch.device | None = None) -> int:
    """Decode workers: up to 8 feeding a GPU; on CPU the model needs the cores (decode is ~3% of the time)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device is not None and device.type == "cpu":
        return min(4, cpus // 4)
    return max(1, min(8, cpus - 1))


class _ResizedPatches(torch.utils.data.Dataset):
    """Worker-side: decode image i once, resize it for each distinct preprocessing."""

    def __init__(self, dataset: PatchDataset, preprocesses: list[Preprocess]):
        self.dataset = dataset
        self.preprocesses = preprocesses

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            image = self.dataset.read_image(i)
            return i, tuple(p.resize_uint8(image) for p in self.preprocesses), ""
        except Exception as exc:  # noqa: BLE001 - reported cleanly by the main process
            message = str(exc) if isinstance(exc, DatasetError) else f"{self.dataset.image_label(i)}: cannot read image: {exc}"
            empty = tuple(torch.zeros(3, p.height, p.width, dtype=torch.uint8) for p in self.preprocesses)
            return i, empty, message


def _collate(items):
    indices = [it[0] for it in items]
    errors = [it[2] for it in items if it[2]]
    stacks = tuple(torch.stack([it[1][k] for it in items]) for k in range(len(items[0][1])))
    return indices, stacks, errors


def dihedral_views(batch: torch.Tensor):
    """The 8 flips/rotations of a square batch (4 flips if not square)."""
    square = batch.shape[-1] == batch.shape[-2]
    for k in range(4 if square else 1):
        rotated = torch.rot90(batch, k, dims=(2, 3)) if k else batch
        yield rotated
        yield torch.flip(rotated, dims=(3,))
    if not square:
        yield torch.flip(batch, dims=(2,))
        yield torch.flip(batch, dims=(2, 3))


@dataclass
class _Job:
    entry: CacheEntry
    backbone: LoadedBackbone
    preprocess_index: int
    missing_chunks: set[int]
    buffers: dict


def _forward(backbone: LoadedBackbone, batch_uint8: torch.Tensor, device: torch.device, tta: bool,
             autocast_dtype: torch.dtype | None) -> np.ndarray:
    x = backbone.preprocess.normalize(batch_uint8.to(device, non_blocking=True))
    x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with torch.inference_mode(), autocast:
        if tta:
            views = list(dihedral_views(x))
            out = sum(backbone.model(v).float() for v in views) / len(views)
        else:
            out = backbone.model(x).float()
    return out.cpu().numpy()


def _progress_bar(enabled: bool):
    """On stderr. The numbers keep their width at any terminal width (80 columns included); the
    description takes what is left and is cut with an ellipsis first."""
    return Progress(
        TextColumn("[bold]{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
        BarColumn(bar_width=16), MofNCompleteColumn(table_column=Column(no_wrap=True)),
        TextColumn("{task.fields[rate]:>6.1f} img/s", table_column=Column(no_wrap=True)),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled, transient=False, expand=True,
    )


def embed_dataset(
    dataset: PatchDataset,
    specs: list[BackboneSpec],
    cache_dir=DEFAULT_CACHE_DIR,
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    device: str = "auto",
    tta: bool = False,
    precision: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    max_chunks: int | None = None,
    distributed: bool = True,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
) -> list[CacheEntry]:
    """Embed ``dataset`` with every spec whose cache is missing; returns the entries in spec order.

    Under torchrun (WORLD_SIZE > 1) rank r computes the chunks c with c % world == r into the shared
    in-progress folder, with exactly the batches a single process would use; rank 0 then writes the
    same cache file a single-process run writes. The cache folder must be shared by all ranks.
    ``precision``: "auto" (bf16 autocast on CUDA and on CPUs with native bf16, else fp32), "fp32" or "bf16".
    ``max_chunks`` stops after that many chunks (for tests of interruption and resume).
    ``distributed=False``: embed alone even under torchrun (each rank embeds its own slides).
    ``checkpoint_seconds``: the finished rows of an unfinished chunk are saved this often and when
    interrupted (Ctrl-C included), and a rerun continues after them with the same batches.
    """
    check_embed_options(batch_size=batch_size, num_workers=num_workers, device=device, precision=precision,
                        chunk_size=chunk_size)
    if len(dataset) == 0:
        raise DatasetError(f"{dataset.source}: the dataset is empty")
    ranks = distributed_ranks() if distributed else _Ranks()
    torch_device = resolve_device(device)
    autocast_dtype = resolve_precision(precision, torch_device)
    batch_size = default_batch_size(torch_device) if batch_size is None else batch_size
    fingerprint = dataset.fingerprint()
    precision_used = "bf16-autocast" if autocast_dtype is not None else "fp32"
    entries = [CacheEntry(Path(cache_dir), dataset.name, spec, cache_key(fingerprint, spec, tta, precision_used))
               for spec in specs]
    todo = [e for e in entries if not e.exists()]
    ranks.barrier()  # every rank has decided what to do before rank 0 can finish anything
    if not todo:
        return entries
    if ranks.rank == 0:
        _report_partials(Path(cache_dir), {e.key for e in entries})
    args = (ranks, torch_device, autocast_dtype, batch_size, num_workers, tta, chunk_size, progress, max_chunks,
            fingerprint, precision_used, checkpoint_seconds)
    try:
        if ranks.world > 1:  # the ranks share the in-progress folders on purpose
            _embed_missing(dataset, todo, *args)
        else:  # another process embedding the same keys: wait for it, then use what it finished
            with locked_entries(todo, on_wait=_notify_wait):
                todo = [e for e in todo if not e.exists()]
                if todo:
                    try:
                        _embed_missing(dataset, todo, *args)
                    except (Exception, KeyboardInterrupt):
                        for entry in todo:  # still holding the lock: no other process writes there
                            entry.drop_if_empty()
                        raise
    except (Exception, KeyboardInterrupt) as exc:
        kept = [e for e in todo if e.has_chunks() and not e.exists()]
        if kept:
            what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "embedding stopped"
            noun = getattr(dataset, "item_noun", "images")
            rows = min(e.rows_done() for e in kept)
            warnings.warn(f"{what}: {rows:,} of {len(dataset):,} {noun} kept in {', '.join(str(e.partial_dir) for e in kept)}; "
                          "rerun the same command to resume", stacklevel=2)
        raise
    return entries


def _notify_wait(entry: CacheEntry) -> None:
    warnings.warn(f"another process is embedding {entry.spec.label} into {entry.path.parent}; waiting for it to "
                  "finish, then its features are used", stacklevel=3)


def _report_partials(cache_dir: Path, current_keys: set[str]) -> None:
    """Say when earlier runs left unfinished embeddings (other keys) behind in this cache."""
    partials = partial_folders(cache_dir, exclude_keys=current_keys)
    if partials:
        warnings.warn(f"{describe_partials(partials)}: rerun the command that made them to resume, or delete them "
                      f"with `hexpr clean-cache --cache-dir {cache_dir}`", stacklevel=3)


def _resume_offsets(jobs: list[_Job], chunks: list[int], batch: int) -> dict[int, int]:
    """Rows of each chunk already checkpointed by every job that needs it (whole batches); those
    rows go back into the jobs' buffers so the chunk is completed with the remaining batches."""
    offsets = {}
    for c in chunks:
        parts = {id(job): job.entry.read_partial_chunk(c) for job in jobs if c in job.missing_chunks}
        offset = min((0 if p is None else len(p)) for p in parts.values()) if parts else 0
        offset -= offset % batch
        if offset:
            for job in jobs:
                if c in job.missing_chunks:
                    job.buffers[c] = [parts[id(job)][:offset]]
            offsets[c] = offset
    return offsets


def _checkpoint(jobs: list[_Job]) -> None:
    """Save the finished rows of every unfinished chunk in the jobs' buffers."""
    for job in jobs:
        for c, parts in job.buffers.items():
            if parts:
                job.entry.write_partial_chunk(c, np.concatenate(parts))


def _embed_missing(dataset: PatchDataset, todo: list[CacheEntry], ranks: _Ranks, torch_device, autocast_dtype,
                   batch_size: int, num_workers, tta: bool, chunk_size: int, progress: bool, max_chunks,
                   fingerprint: str, precision_used: str, checkpoint_seconds: float = CHECKPOINT_SECONDS) -> None:
    """Compute the missing chunks of ``todo`` (this rank's share) and finalize complete cache files."""
    n = len(dataset)
    jobs: list[_Job] = []
    preprocesses: list[Preprocess] = []
    layouts = []
    for turn in (0, 1):  # rank 0 lays the chunk layout out first; the others then read it
        if (ranks.rank == 0) == (turn == 0):
            first = None
            for entry in todo:
                first = entry.start(n, first["chunk_size"] if first else chunk_size, first["batch_size"] if first else batch_size)
                layouts.append(first)
        ranks.barrier()
    chunk, batch = layouts[0]["chunk_size"], layouts[0]["batch_size"]
    n_chunks = math.ceil(n / chunk)
    for entry in todo:
        backbone = create_backbone(entry.spec, torch_device)
        if backbone.preprocess not in preprocesses:
            preprocesses.append(backbone.preprocess)
        missing = {c for c in set(range(n_chunks)) - entry.done_chunks(n_chunks) if c % ranks.world == ranks.rank}
        jobs.append(_Job(entry, backbone, preprocesses.index(backbone.preprocess), missing, {}))
    needed_chunks = sorted(set().union(*(j.missing_chunks for j in jobs)))
    if max_chunks is not None:
        needed_chunks = needed_chunks[:max_chunks]

    resumed = _resume_offsets(jobs, needed_chunks, batch)
    batches = [
        list(range(start, min(start + batch, (c + 1) * chunk, n)))
        for c in needed_chunks
        for start in range(c * chunk + resumed.get(c, 0), min((c + 1) * chunk, n), batch)
    ]
    workers = default_num_workers(torch_device) if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(
        _ResizedPatches(dataset, preprocesses), batch_sampler=batches, num_workers=workers,
        collate_fn=_collate, pin_memory=torch_device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
    )
    total_images = sum(len(b) for b in batches)
    done_images = 0
    started = time.perf_counter()
    last_checkpoint = time.monotonic()
    with _progress_bar(progress and ranks.rank == 0) as bar:
        task = bar.add_task(f"embed {dataset.name} ({', '.join(j.entry.spec.label for j in jobs)})", total=total_images, rate=0.0)
        try:
            for indices, stacks, errors in loader:
                if errors:
                    raise DatasetError(errors[0] + (f" ({len(errors)} unreadable images in this batch)" if len(errors) > 1 else ""))
                c = indices[0] // chunk
                for job in jobs:
                    if c in job.missing_chunks:
                        feats = _forward(job.backbone, stacks[job.preprocess_index], torch_device, tta, autocast_dtype)
                        job.buffers.setdefault(c, []).append(feats)
                chunk_end = min((c + 1) * chunk, n)
                if indices[-1] + 1 == chunk_end:
                    for job in jobs:
                        if c in job.buffers:
                            job.entry.write_chunk(c, np.concatenate(job.buffers.pop(c)))
                            job.missing_chunks.discard(c)
                elif time.monotonic() - last_checkpoint > checkpoint_seconds:
                    _checkpoint(jobs)
                    last_checkpoint = time.monotonic()
                done_images += len(indices)
                bar.update(task, advance=len(indices), rate=done_images / max(time.perf_counter() - started, 1e-9))
        except BaseException:
            _checkpoint(jobs)  # Ctrl-C or an error: keep every finished batch
            raise

    ranks.barrier()  # all ranks' chunks are on disk
    for job in jobs:
        if ranks.rank != 0 or job.entry.done_chunks(n_chunks) != set(range(n_chunks)):
            continue  # another rank's job, or interrupted on purpose (max_chunks): resume later
        job.entry.finalize(dataset.ids, n_chunks, {
            "dataset_fingerprint": fingerprint,
            "dataset_source": str(dataset.source),
            "dataset_name": dataset.name,
            "n_rows": n,
            "model_name": job.entry.spec.name,
            "weights_source": job.backbone.weights_source,
            "weights_sha256": job.backbone.weights_sha256 or "",
            "pretrained": not job.entry.spec.is_random_init,
            "preprocess": job.backbone.preprocess.to_dict(),
            "tta": "dihedral8" if tta else "none",
            "precision": precision_used,
            "device": str(torch_device),
            "chunk_size": chunk,
            "batch_size": batch,
            "world_size": ranks.world,
        })
    ranks.barrier()  # the cache files exist before any rank returns
