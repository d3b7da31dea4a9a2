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

Processes that embed the same key at once take turns: each holds an advisory lock
(``.partial/<key>.lock``, fcntl) while it computes a key, and the next one then finds the finished
file. ``partial_folders`` lists unfinished work left by earlier runs; ``clean_partials`` deletes it.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from hexpr.embedder.backbones import BackboneSpec
from hexpr.embedder.errors import DataError
from hexpr.embedder.files import atomic_path, atomic_write, hexpr_version

CACHE_FORMAT_VERSION = 1
DEFAULT_CACHE_DIR = Path("cache")
_PARTIAL = ".partial"


class CacheError(DataError):
    """A cache file is missing, damaged or made with a different configuration."""


def cache_key(dataset_fingerprint: str, spec: BackboneSpec, tta: bool, precision: str = "fp32") -> str:
    """Key from what produced the features: image content, the backbone spec with its weights' content,
    TTA and the numeric precision of the forward pass."""
    payload = json.dumps(
        {"format": CACHE_FORMAT_VERSION, "dataset": dataset_fingerprint, "backbone": spec.identity(), "tta": bool(tta),
         "precision": precision},
        sort_keys=True,
    )
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def library_versions() -> dict:
    # timm's version without importing it (backbones.py imports timm only when a model is built)
    return {"hexpr": hexpr_version(), "torch": torch.__version__, "timm": version("timm"), "h5py": h5py.__version__,
            "numpy": np.__version__}


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)


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

    @property
    def lock_path(self) -> Path:
        return self.root / "embeddings" / _PARTIAL / f"{self.key}.lock"

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
        atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(layout)))
        return layout

    def has_chunks(self) -> bool:
        """Whether the in-progress folder holds at least one finished chunk (something to resume)."""
        return self.partial_dir.is_dir() and any(self.partial_dir.glob("chunk_*.npy"))

    def drop_if_empty(self) -> None:
        """Remove an in-progress folder that holds no finished chunk (nothing to resume from)."""
        if self.partial_dir.is_dir() and not self.has_chunks():
            shutil.rmtree(self.partial_dir, ignore_errors=True)

    def _chunk_path(self, index: int) -> Path:
        return self.partial_dir / f"chunk_{index:06d}.npy"

    def done_chunks(self, n_chunks: int) -> set[int]:
        return {i for i in range(n_chunks) if self._chunk_path(i).is_file()}

    def write_chunk(self, index: int, features: np.ndarray) -> None:
        _atomic_save_npy(self._chunk_path(index), np.ascontiguousarray(features, dtype=np.float32))
        self._part_path(index).unlink(missing_ok=True)

    # --- time-based checkpoints: the first rows of an unfinished chunk ------------------------
    def _part_path(self, index: int) -> Path:
        return self.partial_dir / f"chunk_{index:06d}.part.npy"

    def write_partial_chunk(self, index: int, features: np.ndarray) -> None:
        """Keep the first rows of chunk ``index`` (a checkpoint; replaced by ``write_chunk``)."""
        _atomic_save_npy(self._part_path(index), np.ascontiguousarray(features, dtype=np.float32))

    def read_partial_chunk(self, index: int) -> np.ndarray | None:
        path = self._part_path(index)
        return np.load(path) if path.is_file() and not self._chunk_path(index).is_file() else None

    def rows_done(self) -> int:
        """Rows kept in the in-progress folder (finished chunks and checkpointed first rows)."""
        if not self.partial_dir.is_dir():
            return 0
        return sum(np.load(p, mmap_mode="r").shape[0] for p in self.partial_dir.glob("chunk_*.npy"))

    def finalize(self, ids: list[str], n_chunks: int, attrs: dict) -> Path:
        """Assemble the chunks into the final HDF5 file (temp name, then rename) and drop the chunks."""
        chunks = [np.load(self._chunk_path(i)) for i in range(n_chunks)]
        features = np.concatenate(chunks, axis=0)
        if features.shape[0] != len(ids):
            raise CacheError(f"{self.partial_dir}: chunks hold {features.shape[0]} rows for {len(ids)} ids")
        with atomic_path(self.path) as tmp, h5py.File(tmp, "w") as f:
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
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        return self.path


# --------------------------------------------------------------------------------------------
# several processes, one cache: per-key locks; unfinished work left behind
# --------------------------------------------------------------------------------------------
def _try_lock(handle, blocking: bool) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


@contextmanager
def locked_entries(entries: list[CacheEntry], on_wait=None):
    """Hold an exclusive advisory lock per cache key (in key order, so two processes never
    deadlock). A key another process holds is waited for, after calling ``on_wait(entry)``."""
    with ExitStack() as stack:
        for entry in sorted(entries, key=lambda e: e.key):
            entry.lock_path.parent.mkdir(parents=True, exist_ok=True)
            handle = stack.enter_context(open(entry.lock_path, "a"))
            if not _try_lock(handle, blocking=False):
                if on_wait is not None:
                    on_wait(entry)
                _try_lock(handle, blocking=True)
        yield


def _is_locked(lock_path: Path) -> bool:
    """Whether a running process holds this key's lock (a probe that never blocks)."""
    if not lock_path.exists():
        return False
    with open(lock_path, "a") as handle:
        if _try_lock(handle, blocking=False):
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    return True


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def partial_folders(root=DEFAULT_CACHE_DIR, exclude_keys=()) -> list[dict]:
    """Unfinished embeddings in the cache that no running process is working on: one dict per
    folder with ``path``, ``key``, ``bytes``, ``n_chunks`` and ``age_s`` (since its last write)."""
    base = Path(root) / "embeddings" / _PARTIAL
    found = []
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        if not folder.is_dir() or folder.name in exclude_keys or _is_locked(base / f"{folder.name}.lock"):
            continue
        mtimes = [f.stat().st_mtime for f in folder.iterdir()] or [folder.stat().st_mtime]
        found.append({"path": str(folder), "key": folder.name, "bytes": _folder_bytes(folder),
                      "n_chunks": len(list(folder.glob("chunk_*.npy"))), "age_s": time.time() - max(mtimes)})
    return found


def describe_partials(partials: list[dict]) -> str:
    """'2 unfinished embedding folder(s) (3.1 MB, the newest written 5.0 h ago) in ...' for messages."""
    size = sum(p["bytes"] for p in partials) / 1e6
    age = min(p["age_s"] for p in partials)
    age_text = f"{age / 60:.0f} min" if age < 3600 else f"{age / 3600:.1f} h" if age < 2 * 86400 else f"{age / 86400:.0f} days"
    return (f"{len(partials)} unfinished embedding folder(s) ({size:.1f} MB, the newest written {age_text} ago) "
            f"in {Path(partials[0]['path']).parent}")


def clean_partials(root=DEFAULT_CACHE_DIR) -> list[dict]:
    """Delete the unfinished embeddings no running process is working on (and their lock files);
    returns what was removed (as ``partial_folders``). Finished cache files are never touched."""
    removed = []
    for info in partial_folders(root):
        shutil.rmtree(info["path"], ignore_errors=True)
        Path(f"{info['path']}.lock").unlink(missing_ok=True)
        removed.append(info)
    base = Path(root) / "embeddings" / _PARTIAL
    for lock in base.glob("*.lock") if base.is_dir() else []:
        if not (base / lock.stem).exists() and not _is_locked(lock):
            lock.unlink(missing_ok=True)
    return removed


def read_cache(path: str | Path) -> tuple[list[str], np.ndarray, dict]:
    """(ids, features, attrs) of a finished cache file."""
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
    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def load_aligned(paths: list[Path], ids: list[str]) -> tuple[np.ndarray, list[dict]]:
    """Features of several caches concatenated column-wise, rows aligned to ``ids`` by id."""
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
                       "identity": json.loads(attrs["backbone_identity"]), "start": start, "stop": stop,
                       "weights_sha256": str(attrs.get("weights_sha256", ""))})
        start = stop
    return np.concatenate(columns, axis=1).astype(np.float32, copy=False), blocks


# --------------------------------------------------------------------------------------------
# row-chunked access, for heads fitted on more rows than fit in memory
# --------------------------------------------------------------------------------------------
# Embedding files written by ``EntryCache.finalize`` and by ``write_feature_file`` share the
# layout above (``ids`` + a 2-D row-major dataset); only the dtype of the dataset may differ
# (``write_feature_file`` defaults to float16 to halve the disk). Readers convert to float32.
DEFAULT_CHUNK_ROWS = 65536
_H5_CHUNK_BYTES = 1 << 20


def _check_chunk_rows(chunk_rows) -> int:
    chunk_rows = int(chunk_rows)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive number of rows, got {chunk_rows}")
    return chunk_rows


def _open_dataset(f, path, dataset_name: str):
    if dataset_name not in f:
        raise CacheError(f"{path} has no dataset {dataset_name!r} (it holds: {', '.join(f.keys())})")
    dset = f[dataset_name]
    if dset.ndim != 2:
        raise CacheError(f"{path}: dataset {dataset_name!r} has shape {dset.shape}; a 2-D (rows, columns) array is needed")
    return dset


def _open_h5(path):
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"HDF5 file {path} not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise CacheError(f"{path} is not a readable HDF5 file ({exc})") from exc


def dataset_shape(path: str | Path, dataset_name: str = "features") -> tuple[int, int]:
    """(rows, columns) of a 2-D dataset of an HDF5 file, without reading it."""
    with _open_h5(path) as f:
        return tuple(int(s) for s in _open_dataset(f, path, dataset_name).shape)


def _row_range(n_rows: int, start: int, stop: int | None) -> tuple[int, int]:
    stop = n_rows if stop is None else int(stop)
    start = int(start)
    if not 0 <= start <= stop <= n_rows:
        raise ValueError(f"row range [{start}, {stop}) is outside the {n_rows} rows of the file")
    return start, stop


def read_rows(path: str | Path, dataset_name: str, start: int, stop: int, dtype=np.float32) -> np.ndarray:
    """Rows ``[start, stop)`` of a 2-D dataset as a ``dtype`` array (one contiguous read)."""
    with _open_h5(path) as f:
        dset = _open_dataset(f, path, dataset_name)
        start, stop = _row_range(dset.shape[0], start, stop)
        return np.asarray(dset[start:stop], dtype=dtype)


def read_ids(path: str | Path, start: int = 0, stop: int | None = None) -> list[str]:
    """Spot ids ``[start, stop)`` of an embedding (or target) file's ``ids`` dataset."""
    with _open_h5(path) as f:
        if "ids" not in f:
            raise CacheError(f"{path} has no 'ids' dataset")
        start, stop = _row_range(f["ids"].shape[0], start, stop)
        return [s.decode() if isinstance(s, bytes) else str(s) for s in f["ids"][start:stop]]


def iter_array_chunks(h5_path: str | Path, dataset_name: str, chunk_rows: int = DEFAULT_CHUNK_ROWS, *,
                      start: int = 0, stop: int | None = None, dtype=np.float32):
    """Yield ``(start, stop, block)`` for consecutive row blocks of any 2-D HDF5 dataset.

    ``block`` is a fresh ``dtype`` array of at most ``chunk_rows`` rows; the file stays open for
    the whole iteration and nothing but the current block is held, so memory is bounded by
    ``chunk_rows`` whatever the number of rows. ``start``/``stop`` restrict the rows read.
    """
    chunk_rows = _check_chunk_rows(chunk_rows)
    with _open_h5(h5_path) as f:
        dset = _open_dataset(f, h5_path, dataset_name)
        first, last = _row_range(dset.shape[0], start, stop)
        for a in range(first, last, chunk_rows):
            b = min(a + chunk_rows, last)
            # yielded without a local name, so the generator keeps no reference to the block
            yield a, b, np.asarray(dset[a:b], dtype=dtype)


def read_feature_rows(paths, start: int, stop: int, *, check_ids: bool = True) -> np.ndarray:
    """Rows ``[start, stop)`` of the ``features`` of one or more cache files, concatenated
    column-wise (float32). Rows are matched by position; with ``check_ids`` the files must hold
    the same ids in that row range (a CacheError says to align by id otherwise)."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise ValueError("no embedding files given")
    blocks, reference = [], None
    for path in paths:
        with _open_h5(path) as f:
            dset = _open_dataset(f, path, "features")
            a, b = _row_range(dset.shape[0], start, stop)
            if check_ids and len(paths) > 1:
                if "ids" not in f:
                    raise CacheError(f"{path} has no 'ids' dataset")
                ids = f["ids"][a:b]
                if reference is None:
                    reference = (path, ids)
                elif len(ids) != len(reference[1]) or not np.array_equal(ids, reference[1]):
                    raise CacheError(
                        f"{path} and {reference[0]} hold different spot ids in rows [{a}, {b}); "
                        f"pass ids=... to align the files by id instead of by position")
            blocks.append(np.asarray(dset[a:b], dtype=np.float32))
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)


def _aligned_positions(path: Path, wanted) -> np.ndarray:
    position = pd.Index(read_ids(path)).get_indexer(wanted)
    if (position < 0).any():
        missing = [wanted[i] for i in np.flatnonzero(position < 0)[:5]]
        raise CacheError(f"{path}: {int((position < 0).sum())} requested ids are not in the cache, e.g. {missing}")
    return position


def _gather_rows(dset, positions: np.ndarray, window: int) -> np.ndarray:
    """``dset[positions]`` (any order, repeats allowed) read in sorted blocks of at most
    ``window`` file rows: a dense block is one contiguous read, a sparse one a sorted point read."""
    out = np.empty((len(positions), dset.shape[1]), dtype=np.float32)
    order = np.argsort(positions, kind="stable")
    sorted_pos = positions[order]
    i = 0
    while i < len(sorted_pos):
        lo = int(sorted_pos[i])
        j = int(np.searchsorted(sorted_pos, lo + window, side="left"))
        hi = int(sorted_pos[j - 1]) + 1
        unique = np.unique(sorted_pos[i:j])
        if len(unique) * 8 >= hi - lo:          # dense enough: one contiguous read
            block = np.asarray(dset[lo:hi], dtype=np.float32)
            out[order[i:j]] = block[sorted_pos[i:j] - lo]
        else:                                    # sparse: read only the needed rows
            block = np.asarray(dset[unique], dtype=np.float32)
            out[order[i:j]] = block[np.searchsorted(unique, sorted_pos[i:j])]
        del block
        i = j
    return out


def iter_feature_chunks(paths, ids=None, chunk_rows: int = DEFAULT_CHUNK_ROWS, *,
                        start: int = 0, stop: int | None = None):
    """Yield ``(start, stop, X_chunk)``: float32 features of one or more cache files
    (concatenated column-wise, as ``load_aligned``) in row blocks of at most ``chunk_rows``.

    ``ids=None``: the files' rows in file order (``start``/``stop`` restrict them); the files must
    list the same ids in the same order (checked block by block). With ``ids``: rows follow
    ``ids`` (``start``/``stop`` index into ``ids``); the id -> row mapping is computed once (ids
    fit in memory) and each block is gathered from the files in sorted reads of at most
    ``chunk_rows`` file rows, so memory stays bounded by the block size, never by the file size.
    """
    chunk_rows = _check_chunk_rows(chunk_rows)
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise ValueError("no embedding files given")
    if ids is None:
        shapes = [dataset_shape(p, "features") for p in paths]
        if len({s[0] for s in shapes}) > 1:
            raise CacheError("the embedding files hold different numbers of rows "
                             f"({', '.join(f'{p.name}: {s[0]}' for p, s in zip(paths, shapes))}); "
                             "pass ids=... to align them by id")
        first, last = _row_range(shapes[0][0], start, stop)
        for a in range(first, last, chunk_rows):
            b = min(a + chunk_rows, last)
            yield a, b, read_feature_rows(paths, a, b)
        return
    wanted = [str(i) for i in ids]
    first, last = _row_range(len(wanted), start, stop)
    positions = [_aligned_positions(p, wanted) for p in paths]
    files = [_open_h5(p) for p in paths]
    try:
        dsets = [_open_dataset(f, p, "features") for f, p in zip(files, paths)]
        for a in range(first, last, chunk_rows):
            b = min(a + chunk_rows, last)
            blocks = [_gather_rows(d, pos[a:b], chunk_rows) for d, pos in zip(dsets, positions)]
            yield a, b, (blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1))
            del blocks
    finally:
        for f in files:
            f.close()


def _as_row_blocks(data):
    """A 2-D array, or an iterable of 2-D row blocks -> iterator of 2-D blocks."""
    if isinstance(data, np.ndarray) or hasattr(data, "__array__") and not hasattr(data, "__next__"):
        arr = np.asarray(data)
        if arr.ndim == 2:
            step = max(1, _H5_CHUNK_BYTES * 16 // max(1, arr.shape[1] * arr.itemsize))
            return (arr[i:i + step] for i in range(0, arr.shape[0], step))
    return iter(data)


def write_feature_file(path: str | Path, ids, data, *, dtype=np.float16, dataset_name: str = "features",
                       attrs: dict | None = None) -> Path:
    """Write ``ids`` and a 2-D ``dataset_name`` array to an HDF5 file, block by block.

    ``data`` is a 2-D array or an iterable of 2-D row blocks (e.g. a generator producing one block
    at a time), so a file of any number of rows is written with one block in memory. Stored as
    ``dtype`` (float16 by default: half the disk of float32; readers return float32) in
    row-chunked HDF5 layout. Written to a temporary name and renamed, like every cache file.
    The row count must equal ``len(ids)``.
    """
    path = Path(path)
    ids = np.asarray([str(i) for i in ids], dtype=object)
    n = len(ids)
    if n == 0:
        raise ValueError("cannot write an empty file (no ids)")
    blocks = _as_row_blocks(data)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("ids", data=ids, dtype=h5py.string_dtype("utf-8"),
                             chunks=(min(n, 65536),))
            dset, row = None, 0
            for block in blocks:
                block = np.asarray(block)
                if block.ndim != 2:
                    raise ValueError(f"row blocks must be 2-D, got shape {block.shape}")
                if dset is None:
                    width = block.shape[1]
                    rows_per_chunk = max(1, min(n, _H5_CHUNK_BYTES // max(1, width * np.dtype(dtype).itemsize)))
                    dset = f.create_dataset(dataset_name, shape=(n, width), dtype=dtype,
                                            chunks=(rows_per_chunk, width))
                if block.shape[1] != dset.shape[1]:
                    raise ValueError(f"row block has {block.shape[1]} columns, earlier blocks {dset.shape[1]}")
                if row + block.shape[0] > n:
                    raise ValueError(f"the row blocks hold more rows than the {n} ids")
                dset[row:row + block.shape[0]] = block.astype(dtype, copy=False)
                row += block.shape[0]
                del block
            if row != n:
                raise ValueError(f"the row blocks hold {row} rows but {n} ids were given")
            for name, value in (attrs or {}).items():
                f.attrs[name] = value if isinstance(value, (str, int, float, bool, np.number)) else json.dumps(value)
    return path
