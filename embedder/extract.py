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
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from embedder.backbones import BackboneSpec, LoadedBackbone, Preprocess, create_backbone
from embedder.cache import DEFAULT_CACHE_DIR, CacheEntry, cache_key
from embedder.datasets import DatasetError, PatchDataset

DEFAULT_CHUNK_SIZE = 512
DEFAULT_BATCH_SIZE = 64


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_num_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
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


def _forward(backbone: LoadedBackbone, batch_uint8: torch.Tensor, device: torch.device, tta: bool, amp: bool) -> np.ndarray:
    x = backbone.preprocess.normalize(batch_uint8.to(device, non_blocking=True))
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (amp and device.type == "cuda") else nullcontext()
    with torch.inference_mode(), autocast:
        if tta:
            views = list(dihedral_views(x))
            out = sum(backbone.model(v).float() for v in views) / len(views)
        else:
            out = backbone.model(x).float()
    return out.cpu().numpy()


def _progress_bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>7.1f} img/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        disable=not enabled, transient=False,
    )


def embed_dataset(
    dataset: PatchDataset,
    specs: list[BackboneSpec],
    cache_dir=DEFAULT_CACHE_DIR,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int | None = None,
    device: str = "auto",
    tta: bool = False,
    amp: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    max_chunks: int | None = None,
) -> list[CacheEntry]:
    """Embed ``dataset`` with every spec whose cache is missing; returns the entries in spec order.

    ``max_chunks`` stops after that many chunks (for tests of interruption and resume).
    """
    from pathlib import Path

    if len(dataset) == 0:
        raise DatasetError(f"{dataset.source}: the dataset is empty")
    torch_device = resolve_device(device)
    fingerprint = dataset.fingerprint()
    entries = [CacheEntry(Path(cache_dir), dataset.name, spec, cache_key(fingerprint, spec, tta)) for spec in specs]
    todo = [e for e in entries if not e.exists()]
    if not todo:
        return entries

    n = len(dataset)
    jobs: list[_Job] = []
    preprocesses: list[Preprocess] = []
    layout = None
    for entry in todo:
        backbone = create_backbone(entry.spec, torch_device)
        layout = entry.start(n, layout["chunk_size"] if layout else chunk_size, layout["batch_size"] if layout else batch_size)
        if backbone.preprocess not in preprocesses:
            preprocesses.append(backbone.preprocess)
        n_chunks = math.ceil(n / layout["chunk_size"])
        missing = set(range(n_chunks)) - entry.done_chunks(n_chunks)
        jobs.append(_Job(entry, backbone, preprocesses.index(backbone.preprocess), missing, {}))
    chunk, batch = layout["chunk_size"], layout["batch_size"]
    n_chunks = math.ceil(n / chunk)
    needed_chunks = sorted(set().union(*(j.missing_chunks for j in jobs)))
    if max_chunks is not None:
        needed_chunks = needed_chunks[:max_chunks]

    batches = [
        list(range(start, min(start + batch, (c + 1) * chunk, n)))
        for c in needed_chunks
        for start in range(c * chunk, min((c + 1) * chunk, n), batch)
    ]
    workers = default_num_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(
        _ResizedPatches(dataset, preprocesses), batch_sampler=batches, num_workers=workers,
        collate_fn=_collate, pin_memory=torch_device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
    )
    total_images = sum(len(b) for b in batches)
    done_images = 0
    started = time.perf_counter()
    with _progress_bar(progress) as bar:
        task = bar.add_task(f"embed {dataset.name} ({', '.join(j.entry.spec.label for j in jobs)})", total=total_images, rate=0.0)
        for indices, stacks, errors in loader:
            if errors:
                raise DatasetError(errors[0] + (f" ({len(errors)} unreadable images in this batch)" if len(errors) > 1 else ""))
            c = indices[0] // chunk
            for job in jobs:
                if c in job.missing_chunks:
                    feats = _forward(job.backbone, stacks[job.preprocess_index], torch_device, tta, amp)
                    job.buffers.setdefault(c, []).append(feats)
            chunk_end = min((c + 1) * chunk, n)
            if indices[-1] + 1 == chunk_end:
                for job in jobs:
                    if c in job.buffers:
                        job.entry.write_chunk(c, np.concatenate(job.buffers.pop(c)))
                        job.missing_chunks.discard(c)
            done_images += len(indices)
            bar.update(task, advance=len(indices), rate=done_images / max(time.perf_counter() - started, 1e-9))

    precision = "bf16-autocast" if (amp and torch_device.type == "cuda") else "fp32"
    for job in jobs:
        if job.missing_chunks:
            continue  # interrupted on purpose (max_chunks): resume later
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
            "precision": precision,
            "device": str(torch_device),
            "chunk_size": chunk,
            "batch_size": batch,
        })
    return entries
