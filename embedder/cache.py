"""The embedding cache: one HDF5 file per (dataset content, backbone spec, TTA).

The only module that opens embedding HDF5 files. Layout of a finished file::

    ids       (N,)    utf-8 strings, the dataset's spot ids
    features  (N, D)  float32
    attrs             key, dataset fingerprint, backbone spec (JSON), weights source and hash,
                      preprocessing, TTA, precision, library versions, creation time

Work in progress lives in ``<root>/embeddings/.partial/<key>/`` as one ``.npy`` file per chunk of
rows, each written to a temporary name and renamed, so a run killed at any instant (even
``kill -9``) resumes from its last finished chunk. The final HDF5 file is also written under a
temporary name and renamed: a cache file that exists is complete.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedder.backbones import BackboneSpec

CACHE_FORMAT_VERSION = 1
DEFAULT_CACHE_DIR = Path("cache")
_PARTIAL = ".partial"


class CacheError(RuntimeError):
    """A cache file is missing, damaged or made with a different configuration."""


def cache_key(dataset_fingerprint: str, spec: BackboneSpec, tta: bool) -> str:
    """Key from what produced the features: image content, the backbone spec with its weights' content, TTA."""
    payload = json.dumps(
        {"format": CACHE_FORMAT_VERSION, "dataset": dataset_fingerprint, "backbone": spec.identity(), "tta": bool(tta)},
        sort_keys=True,
    )
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def library_versions() -> dict:
    import h5py
    import timm
    import torch

    return {"torch": torch.__version__, "timm": timm.__version__, "h5py": h5py.__version__, "numpy": np.__version__}


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class CacheEntry:
    """One (dataset, spec, TTA) cache file and its in-progress folder."""

    root: Path
    dataset_name: str
    spec: BackboneSpec
    key: str

    @property
    def path(self) -> Path:
        safe_name = "".join(c if c.isalnum() or c in "._-" else "_" for c in self.dataset_name)
        return self.root / "embeddings" / f"{safe_name}__{self.spec.label}__{self.key[:16]}.h5"

    @property
    def partial_dir(self) -> Path:
        return self.root / "embeddings" / _PARTIAL / self.key

    def exists(self) -> bool:
        return self.path.is_file()

    # --- resumable chunk store -------------------------------------------------------------
    def start(self, n_rows: int, chunk_size: int, batch_size: int) -> dict:
        """Create or reopen the in-progress folder; returns its layout (what a resume must reuse)."""
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.partial_dir / "layout.json"
        if meta_path.is_file():
            layout = json.loads(meta_path.read_text())
            if layout.get("n_rows") == n_rows:
                return layout
            shutil.rmtree(self.partial_dir)
            self.partial_dir.mkdir(parents=True)
        layout = {"n_rows": n_rows, "chunk_size": chunk_size, "batch_size": batch_size}
        tmp = meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(layout))
        os.replace(tmp, meta_path)
        return layout

    def _chunk_path(self, index: int) -> Path:
        return self.partial_dir / f"chunk_{index:06d}.npy"

    def done_chunks(self, n_chunks: int) -> set[int]:
        return {i for i in range(n_chunks) if self._chunk_path(i).is_file()}

    def write_chunk(self, index: int, features: np.ndarray) -> None:
        _atomic_save_npy(self._chunk_path(index), np.ascontiguousarray(features, dtype=np.float32))

    def finalize(self, ids: list[str], n_chunks: int, attrs: dict) -> Path:
        """Assemble the chunks into the final HDF5 file (temp name, then rename) and drop the chunks."""
        import h5py

        chunks = [np.load(self._chunk_path(i)) for i in range(n_chunks)]
        features = np.concatenate(chunks, axis=0)
        if features.shape[0] != len(ids):
            raise CacheError(f"{self.partial_dir}: chunks hold {features.shape[0]} rows for {len(ids)} ids")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
            f.create_dataset(
                "features", data=features, chunks=(min(len(ids), 1024), features.shape[1]),
            )
            all_attrs = {
                "key": self.key,
                "format_version": CACHE_FORMAT_VERSION,
                "backbone": self.spec.to_json(),
                "backbone_identity": json.dumps(self.spec.identity(), sort_keys=True),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "library_versions": json.dumps(library_versions()),
                **attrs,
            }
            for name, value in all_attrs.items():
                f.attrs[name] = value if isinstance(value, (str, int, float, bool, np.number)) else json.dumps(value)
        os.replace(tmp, self.path)
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        return self.path


def read_cache(path: str | Path) -> tuple[list[str], np.ndarray, dict]:
    """(ids, features, attrs) of a finished cache file."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise CacheError(f"embedding cache {path} not found; run `hexpr embed` first")
    try:
        with h5py.File(path, "r") as f:
            ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["ids"][()]]
            features = f["features"][()]
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except (OSError, KeyError) as exc:
        raise CacheError(f"{path} is not a readable hexpr embedding cache ({exc}); delete it and embed again") from exc
    return ids, features, attrs


def read_attrs(path: str | Path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def load_aligned(paths: list[Path], ids: list[str]) -> tuple[np.ndarray, list[dict]]:
    """Features of several caches concatenated column-wise, rows aligned to ``ids`` by id."""
    import pandas as pd

    blocks, columns, start = [], [], 0
    wanted = pd.Index(ids)
    for path in paths:
        cache_ids, features, attrs = read_cache(path)
        position = pd.Index(cache_ids).get_indexer(wanted)
        if (position < 0).any():
            missing = [ids[i] for i in np.flatnonzero(position < 0)[:5]]
            raise CacheError(f"{path}: {int((position < 0).sum())} requested ids are not in the cache, e.g. {missing}")
        columns.append(features[position])
        stop = start + features.shape[1]
        blocks.append({"key": attrs["key"], "path": str(path), "spec": json.loads(attrs["backbone"]),
                       "identity": json.loads(attrs["backbone_identity"]), "start": start, "stop": stop})
        start = stop
    return np.concatenate(columns, axis=1).astype(np.float32, copy=False), blocks
