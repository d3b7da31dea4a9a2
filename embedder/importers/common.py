"""Shared machinery of the dataset importers.

* image access: :func:`open_image` gives a :class:`~embedder.slides.SlideImage` whose ``region()``
  returns any integer box of the full-resolution image (white-padded outside it); the readers
  (tifffile, OpenSlide, Pillow) live in :mod:`embedder.slides`, shared with ``predict-slide``.
* patch cutting: :func:`cut_patch` cuts a square of ``patch_um`` µm centred on a spot and
  resamples it to ``round(patch_um / target_um_per_px)`` pixels (Lanczos).
* expression: :func:`normalize_counts` (log1p of counts per 10k, or none).
* writing: :func:`run_import` drives a whole import (common gene set, patch cutting, background
  filter, HEST-style or challenge-layout output written under temporary names and renamed only
  when every sample succeeded).
* thumbnails: every sample cut from a slide also gets ``out_dir/thumbnails/<sample>.png``, the
  slide reduced by an integer factor ``f`` (longest side <= :data:`THUMBNAIL_MAX_SIDE`), so
  thumbnail pixel ``j`` covers full-resolution pixels ``[j*f, (j+1)*f)`` and a full-resolution
  position ``p`` lies at ``p * thumbnail_scale`` (``thumbnail_scale = 1/f``, thumbnail px per
  full-res px).  The scale and the path (relative to ``out_dir``) are stored in the patch file's
  attrs (``thumbnail_scale``, ``thumbnail``), in the .h5ad's ``uns['hexpr_import']`` and as PNG text
  chunks (``hexpr_thumbnail_scale``).  Big TIFFs use a pyramid level or band-wise reads.

Pixel-coordinate convention: a spot coordinate ``(x, y)`` names the pixel at column ``x``, row
``y`` (numpy ``img[y, x]``); its centre is at continuous position ``(x + 0.5, y + 0.5)`` where
pixel ``i`` spans ``[i, i + 1)`` (Pillow's convention).  The patch is centred there, so a
marker drawn as ``img[y-k:y+k+1, x-k:x+k+1]`` lands centred in the patch (centroid at
``((P-1)/2, (P-1)/2)``).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import os
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from PIL import Image

from embedder import slides as _slides
from embedder.slides import (
    THUMBNAIL_MAX_SIDE,
    WHITE,
    ArraySlide,
    SlideError,
    SlideImage,
    SlideWarning,
    _to_rgb8,
    read_square,
    record_warning,
    thumbnail_factor,
)

# --------------------------------------------------------------------------------------------
# constants (module level so tests / callers can tune them)
# --------------------------------------------------------------------------------------------
NEAR_WHITE_LEVEL = 220                  # a pixel is "near-white" when all channels >= this
BACKGROUND_MAX_WHITE_FRACTION = 0.9     # patches whiter than this are background
DENSE_X_MAX_ELEMENTS = 50_000_000       # .h5ad X is dense float32 up to this many values
OUTSIDE_ERROR_FRACTION = 0.5            # more spots than this outside the image -> error
THUMBNAIL_DIR = "thumbnails"            # folder of the thumbnails, under the import's out_dir

NORMALIZATIONS = ("log1p_cp10k", "none")
OUTPUTS = ("hest", "challenge")


class ImporterError(SlideError):
    """Bad or inconsistent importer input; the message names the file and the fix."""


class ImporterWarning(SlideWarning):
    """Recoverable inconsistency in importer input (counts are in the message)."""


def warn(messages: list[str] | None, msg: str) -> None:
    """Emit an :class:`ImporterWarning` and remember it in ``messages``."""
    record_warning(messages, msg, ImporterWarning, stacklevel=4)


def hexpr_version() -> str:
    try:
        from importlib.metadata import version

        return version("hexpr")
    except Exception:
        return "0+unknown"


# --------------------------------------------------------------------------------------------
# sample description shared by all importers
# --------------------------------------------------------------------------------------------
@dataclass
class SampleData:
    """Everything needed to write one sample (produced by an importer's loader)."""

    sample_id: str
    barcodes: list[str]                 # spot ids, one per row of counts
    genes: list[str]                    # unique gene symbols, one per column of counts
    counts: sp.csr_matrix               # (N, G) raw counts
    coords: np.ndarray                  # (N, 2) float64 spot centre, full-res px (x=col, y=row)
    source_um_per_px: float | None      # slide µm/px (None only for ready patches)
    scale_info: dict                    # how source_um_per_px was obtained
    image_path: Path | None = None      # full-resolution slide to cut from ...
    patches_h5: Path | None = None      # ... or ready patches (HEST)
    patches_rows: np.ndarray | None = None   # row of each spot in patches_h5['img']
    patches_um_per_px: float | None = None   # pixel size of the ready patches
    obs: pd.DataFrame | None = None     # extra per-spot columns (same row order)
    source_files: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    counts_info: dict = field(default_factory=dict)


@dataclass
class SampleSpec:
    """A sample found in a source: its genes are known before the (costlier) load."""

    sample_id: str
    kind: str
    genes: list[str]
    load: Callable[[], SampleData]
    source_files: dict = field(default_factory=dict)


def make_unique(names: Sequence[str]) -> tuple[list[str], int]:
    """AnnData-style unique names: second 'A' -> 'A-1', third -> 'A-2'. Returns (names, n_renamed)."""
    names = [str(n) for n in names]
    seen: dict[str, int] = {}
    taken = set(names)
    out = []
    n_renamed = 0
    for n in names:
        if n not in seen:
            seen[n] = 0
            out.append(n)
            continue
        k = seen[n]
        while True:
            k += 1
            cand = f"{n}-{k}"
            if cand not in taken:
                break
        seen[n] = k
        taken.add(cand)
        out.append(cand)
        n_renamed += 1
    return out, n_renamed


def match_ids(
    count_ids: Sequence[str],
    pos_ids: Sequence[str],
    count_file: Any,
    pos_file: Any,
    messages: list[str] | None,
    what: str = "spot",
) -> list[str]:
    """Ids present in both tables (count-table order); warns with counts about the rest."""
    pos_set = set(pos_ids)
    count_set = set(count_ids)
    common = [i for i in count_ids if i in pos_set]
    only_counts = [i for i in count_ids if i not in pos_set]
    only_pos = [i for i in pos_ids if i not in count_set]
    if only_counts:
        warn(messages, f"{len(only_counts)} {what}(s) of {count_file} have no position in "
                       f"{pos_file} and are skipped (e.g. {only_counts[:3]})")
    if only_pos:
        warn(messages, f"{len(only_pos)} {what}(s) listed in {pos_file} have no counts in "
                       f"{count_file} and are skipped (e.g. {only_pos[:3]})")
    if not common:
        raise ImporterError(
            f"no {what} id is shared by {count_file} ({len(count_set)} ids, e.g. "
            f"{list(count_ids)[:3]}) and {pos_file} ({len(pos_set)} ids, e.g. {list(pos_ids)[:3]});"
            f" check that both files belong to the same sample")
    return common


def counts_to_csr(values: Any) -> tuple[sp.csr_matrix, bool]:
    """Raw counts as CSR (int32/int64 when integral, else float32) + integrality flag."""
    m = sp.csr_matrix(values)
    m.eliminate_zeros()
    data = m.data
    integral = bool(data.size == 0 or np.all(np.mod(data, 1) == 0))
    if data.size and np.any(data < 0):
        raise ImporterError("count matrix holds negative values; raw (non-negative) counts are needed")
    if integral:
        mx = data.max() if data.size else 0
        m = m.astype(np.int32 if mx < 2**31 else np.int64)
    else:
        m = m.astype(np.float32)
    return m, integral


# --------------------------------------------------------------------------------------------
# images (the readers live in embedder/slides.py, shared with predict-slide)
# --------------------------------------------------------------------------------------------
def open_image(path: Path | str, messages: list[str] | None = None,
               max_inmemory_bytes: int | None = None) -> SlideImage:
    """Open a full-resolution slide (TIFF / pyramidal TIFF / OpenSlide formats / JPEG / PNG)."""
    try:
        s = _slides.open_image(path, messages, max_inmemory_bytes)
    except ImporterError:
        raise
    except SlideError as e:
        raise ImporterError(str(e)) from e
    if getattr(s, "exif_orientation", 1) not in (1, None):
        warn(messages, f"{path}: EXIF orientation {s.exif_orientation} is ignored; spot "
                       f"coordinates are taken in the stored pixel layout")
    return s


# --------------------------------------------------------------------------------------------
# patch cutting
# --------------------------------------------------------------------------------------------
def patch_size_px(patch_um: float, target_um_per_px: float) -> int:
    p = int(round(patch_um / target_um_per_px))
    if p < 8:
        raise ImporterError(f"patch of {patch_um} µm at {target_um_per_px} µm/px is only {p} px; "
                            f"increase patch_um or lower target_um_per_px")
    return p


def cut_patch(image: SlideImage, x: float, y: float, side_src: float, size: int) -> tuple[np.ndarray, bool]:
    """Square patch of ``side_src`` source pixels centred on pixel (x, y), resampled to ``size``.

    Returns ((size, size, 3) uint8, padded) where padded says the square reached outside the image.
    """
    return read_square(image, x + 0.5, y + 0.5, side_src, size)


def white_fraction(patch: np.ndarray, level: int = NEAR_WHITE_LEVEL) -> float:
    return float((patch >= level).all(axis=-1).mean())


# --------------------------------------------------------------------------------------------
# expression
# --------------------------------------------------------------------------------------------
def normalize_counts(counts: sp.csr_matrix, cols: np.ndarray | None, method: str,
                     messages: list[str] | None = None, name: str = "") -> tuple[Any, sp.csr_matrix, dict]:
    """Returns (X float32 normalised, raw counts subset, details).

    The library size of log1p_cp10k is the spot's total over ALL genes of the sample (before any
    gene intersection), as with scanpy's normalize_total run before gene selection.
    """
    if method not in NORMALIZATIONS:
        raise ImporterError(f"normalize={method!r} is not one of {NORMALIZATIONS}")
    lib = np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
    sub = counts[:, cols] if cols is not None else counts
    sub = sp.csr_matrix(sub)
    details: dict = {"method": method}
    if method == "none":
        Xs = sub.astype(np.float32)
    else:
        zero = int((lib <= 0).sum())
        if zero:
            warn(messages, f"{name}: {zero} spot(s) have zero total counts; their normalised "
                           f"expression is all zeros")
        scale = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
        Xs = sp.csr_matrix(sp.diags(scale) @ sub.astype(np.float64))
        Xs.data = np.log1p(Xs.data)
        Xs = Xs.astype(np.float32)
        details.update(target_sum=1e4, library_size="total counts over all genes of the sample",
                       transform="log1p")
    n, g = Xs.shape
    if n * g <= DENSE_X_MAX_ELEMENTS:
        X = Xs.toarray()
    else:
        X = Xs
    details["X_storage"] = "dense" if isinstance(X, np.ndarray) else "csr"
    return X, sub, details


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(s: str) -> str:
    s = _SAFE.sub("_", str(s)).strip("._")
    return s or "x"


def _clean(obj: Any) -> Any:
    """Provenance dicts -> what AnnData can write (no None, paths as str)."""
    if obj is None:
        return ""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        vals = [_clean(v) for v in obj]
        if all(isinstance(v, str) for v in vals) or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            return vals if vals else ""
        return [str(v) for v in vals]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (str, int, float)):
        return obj
    return str(obj)


class _Staging:
    """Temporary outputs, renamed into place only by commit()."""

    def __init__(self, out_dir: Path, output: str):
        self.out_dir = out_dir
        self.output = output
        self.token = uuid.uuid4().hex[:8]
        self.moves: list[tuple[Path, Path]] = []
        self.temps: list[Path] = []
        self.stage_dir: Path | None = None
        out_dir.mkdir(parents=True, exist_ok=True)
        if output == "hest":
            (out_dir / "patches").mkdir(exist_ok=True)
            (out_dir / "st").mkdir(exist_ok=True)
        else:
            self.stage_dir = out_dir / f".hexpr-import-{self.token}"
            self.stage_dir.mkdir()

    def temp_file(self, final: Path) -> Path:
        tmp = final.with_name(f".{final.name}.tmp-{self.token}")
        self.temps.append(tmp)
        self.moves.append((tmp, final))
        return tmp

    def sample_dir(self, sample: str) -> Path:
        assert self.stage_dir is not None
        d = self.stage_dir / sample
        d.mkdir()
        self.moves.append((d, self.out_dir / sample))
        return d

    def commit(self) -> None:
        old: list[Path] = []
        for src, dst in self.moves:
            if src.is_dir():
                if dst.exists():
                    aside = dst.with_name(f".{dst.name}.old-{self.token}")
                    os.replace(dst, aside)
                    old.append(aside)
                os.replace(src, dst)
            else:
                os.replace(src, dst)
        for o in old:
            shutil.rmtree(o, ignore_errors=True)
        if self.stage_dir is not None:
            shutil.rmtree(self.stage_dir, ignore_errors=True)

    def abort(self) -> None:
        for t in self.temps:
            try:
                t.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                pass
        if self.stage_dir is not None:
            shutil.rmtree(self.stage_dir, ignore_errors=True)


class _H5PatchSink:
    def __init__(self, path: Path, n: int, size: int):
        import h5py

        self.path = path
        self.f = h5py.File(path, "w")
        self.size = size
        self.img = self.f.create_dataset("img", shape=(n, size, size, 3), maxshape=(None, size, size, 3),
                                         dtype=np.uint8, chunks=(1, size, size, 3))

    def put(self, i: int, patch: np.ndarray) -> None:
        self.img[i] = patch

    def finish(self, keep: np.ndarray, barcodes: list[str], coords: np.ndarray, attrs: dict) -> None:
        idx = np.flatnonzero(keep)
        if len(idx) != len(keep):
            for j, i in enumerate(idx):        # in-place compaction (j <= i)
                if i != j:
                    self.img[j] = self.img[i]
            self.img.resize((len(idx), self.size, self.size, 3))
        b = [barcodes[i].encode("utf-8") for i in idx]
        width = max(1, max((len(x) for x in b), default=1))
        self.f.create_dataset("barcode", data=np.array(b, dtype=f"S{width}").reshape(-1, 1))
        self.f.create_dataset("coords", data=np.asarray(coords, np.float64)[idx].reshape(-1, 2))
        for k, v in attrs.items():
            self.f.attrs[k] = v
        self.f.close()

    def close(self):
        try:
            self.f.close()
        except Exception:  # noqa: BLE001
            pass


class _PNGSink:
    def __init__(self, folder: Path, barcodes: list[str]):
        self.folder = folder
        names: dict[str, int] = {}
        self.files = []
        for b in barcodes:
            n = safe_name(b)
            if n in names:
                names[n] += 1
                n = f"{n}_{names[n]}"
            names.setdefault(n, 0)
            self.files.append(f"{n}.png")

    def put(self, i: int, patch: np.ndarray) -> None:
        Image.fromarray(patch).save(self.folder / self.files[i], compress_level=1)

    def drop(self, i: int) -> None:
        try:
            (self.folder / self.files[i]).unlink()
        except FileNotFoundError:
            pass

    def close(self):
        pass


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._p = None
        if enabled:
            try:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                   MofNCompleteColumn(), TimeElapsedColumn())
            except Exception:  # noqa: BLE001
                self._p = None

    def __enter__(self):
        if self._p is not None:
            self._p.start()
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.stop()

    def task(self, name: str, total: int) -> Callable[[int], None]:
        if self._p is None:
            return lambda n=1: None
        tid = self._p.add_task(name, total=total)
        return lambda n=1: self._p.update(tid, advance=n)


def common_genes(specs: Sequence[SampleSpec], messages: list[str] | None) -> tuple[list[str], dict]:
    """Genes present in every sample (order of the first sample)."""
    if not specs:
        raise ImporterError("no sample to import")
    sets = [set(s.genes) for s in specs]
    inter = set.intersection(*sets)
    genes = [g for g in specs[0].genes if g in inter]
    union = set.union(*sets)
    info = {
        "n_genes": len(genes),
        "n_genes_union": len(union),
        "n_genes_dropped": len(union) - len(genes),
        "dropped_per_sample": {s.sample_id: len(s.genes) - len(genes) for s in specs},
    }
    if len(specs) > 1 and info["n_genes_dropped"]:
        warn(messages, f"gene intersection over {len(specs)} samples keeps {len(genes)} genes and "
                       f"drops {info['n_genes_dropped']} of {len(union)} "
                       f"(per sample: {info['dropped_per_sample']})")
    if not genes:
        raise ImporterError("the samples share no gene symbol; check that they use the same gene "
                            "naming (symbols vs Ensembl ids) or import them separately")
    return genes, info


def check_options(patch_um, target_um_per_px, normalize, output, source_um_per_px=None) -> None:
    if not (isinstance(patch_um, (int, float)) and patch_um > 0):
        raise ImporterError(f"patch_um must be a positive number of µm, got {patch_um!r}")
    if not (isinstance(target_um_per_px, (int, float)) and target_um_per_px > 0):
        raise ImporterError(f"target_um_per_px must be positive, got {target_um_per_px!r}")
    if source_um_per_px is not None and not (isinstance(source_um_per_px, (int, float)) and source_um_per_px > 0):
        raise ImporterError(f"source_um_per_px must be positive, got {source_um_per_px!r}")
    if normalize not in NORMALIZATIONS:
        raise ImporterError(f"normalize={normalize!r}; use one of {NORMALIZATIONS}")
    if output not in OUTPUTS:
        raise ImporterError(f"output={output!r}; use one of {OUTPUTS}")
    patch_size_px(patch_um, target_um_per_px)


def run_import(
    specs: Sequence[SampleSpec],
    out_dir: Path | str,
    *,
    kind: str,
    patch_um: float = 112.0,
    target_um_per_px: float = 0.5,
    normalize: str = "log1p_cp10k",
    filter_background: bool = False,
    output: str = "hest",
    progress: bool = True,
    messages: list[str] | None = None,
    max_inmemory_bytes: int | None = None,
) -> dict:
    """Write all samples of ``specs`` with one common gene set; returns the summary dict."""
    t0 = time.perf_counter()
    check_options(patch_um, target_um_per_px, normalize, output)
    messages = [] if messages is None else messages
    ids = [s.sample_id for s in specs]
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups:
        raise ImporterError(f"sample id(s) {dups} occur more than once; give distinct sample_ids")
    out_dir = Path(out_dir)
    genes, gene_info = common_genes(specs, messages)
    size = patch_size_px(patch_um, target_um_per_px)
    staging = _Staging(out_dir, output)
    samples: dict[str, dict] = {}
    csv_fh = None
    try:
        if output == "challenge":
            assert staging.stage_dir is not None
            tmp_csv = staging.stage_dir / "dataset.csv"
            csv_fh = open(tmp_csv, "w", newline="")
            csv.writer(csv_fh).writerow(["ID", "path", "group", "x", "y"] + list(genes))
        with _Progress(progress) as prog:
            for spec in specs:
                ts = time.perf_counter()
                data = spec.load()
                res, csv_part = _import_sample(data, genes, staging, prog, kind=kind, patch_um=patch_um,
                                               target_um_per_px=target_um_per_px, size=size,
                                               normalize=normalize, filter_background=filter_background,
                                               output=output, out_dir=out_dir,
                                               max_inmemory_bytes=max_inmemory_bytes)
                res["seconds"] = round(time.perf_counter() - ts, 3)
                samples[data.sample_id] = res
                messages.extend(data.warnings)
                if csv_part is not None:
                    _write_csv_rows(csv_fh, *csv_part)
        if csv_fh is not None:
            csv_fh.close()
            staging.moves.append((tmp_csv, out_dir / "dataset.csv"))
        staging.commit()
    except BaseException as exc:
        if csv_fh is not None:
            csv_fh.close()
        staging.abort()
        if isinstance(exc, SlideError) and not isinstance(exc, ImporterError):
            raise ImporterError(str(exc)) from exc
        raise
    summary = {
        "kind": kind,
        "out_dir": str(out_dir),
        "output": output,
        "n_samples": len(samples),
        "n_patches": int(sum(s["n_patches"] for s in samples.values())),
        "n_genes": gene_info["n_genes"],
        "n_genes_dropped": gene_info["n_genes_dropped"],
        "genes_dropped_per_sample": gene_info["dropped_per_sample"],
        "patch_um": float(patch_um),
        "target_um_per_px": float(target_um_per_px),
        "patch_size_px": size,
        "normalize": normalize,
        "filter_background": bool(filter_background),
        "samples": samples,
        "warnings": list(messages),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if output == "challenge":
        summary["dataset_csv"] = str(out_dir / "dataset.csv")
    return summary


def _import_sample(data: SampleData, genes: list[str], staging: _Staging, prog: _Progress, *, kind: str,
                   patch_um: float, target_um_per_px: float, size: int, normalize: str,
                   filter_background: bool, output: str, out_dir: Path,
                   max_inmemory_bytes: int | None) -> tuple[dict, tuple | None]:
    sid = data.sample_id
    msgs = data.warnings
    n0 = len(data.barcodes)
    coords = np.asarray(data.coords, np.float64).reshape(-1, 2)
    if coords.shape[0] != n0 or data.counts.shape[0] != n0:
        raise ImporterError(f"{sid}: internal mismatch of spots/coords/counts rows")
    keep = np.isfinite(coords).all(axis=1)
    n_nan = int((~keep).sum())
    if n_nan:
        warn(msgs, f"{sid}: {n_nan} spot(s) have no valid pixel coordinate and are skipped")
    res: dict = {"n_spots_matched": n0, "n_no_coords": n_nan}

    image = None
    if data.image_path is not None:
        if not data.source_um_per_px:
            raise ImporterError(f"{sid}: the slide's µm/px is unknown; pass source_um_per_px=...")
        image = open_image(data.image_path, msgs, max_inmemory_bytes)
        W, H = image.width, image.height
        inside = (coords[:, 0] >= 0) & (coords[:, 0] < W) & (coords[:, 1] >= 0) & (coords[:, 1] < H)
        out = keep & ~inside
        n_out = int(out.sum())
        if n_out and n_out > OUTSIDE_ERROR_FRACTION * max(1, int(keep.sum())):
            image.close()
            raise ImporterError(
                f"{sid}: {n_out} of {int(keep.sum())} spot centres lie outside the {W}x{H} image "
                f"{data.image_path} (x range {np.nanmin(coords[:, 0]):.0f}..{np.nanmax(coords[:, 0]):.0f}, "
                f"y range {np.nanmin(coords[:, 1]):.0f}..{np.nanmax(coords[:, 1]):.0f}); the coordinates "
                f"are probably for a different (full-resolution) image: pass the slide the spot "
                f"positions refer to")
        if n_out:
            warn(msgs, f"{sid}: {n_out} spot centre(s) lie outside the {W}x{H} image "
                       f"{data.image_path} and are skipped")
        keep &= inside
        res["n_outside_dropped"] = n_out
        res["image_size"] = [int(W), int(H)]
        res["image_read"] = image.mode
    else:
        res["n_outside_dropped"] = 0

    idx = np.flatnonzero(keep)
    if len(idx) == 0:
        raise ImporterError(f"{sid}: no spot left to cut a patch for")
    barcodes = [data.barcodes[i] for i in idx]
    coords = coords[idx]
    n = len(idx)

    # ---- patches ---------------------------------------------------------------------------
    if output == "hest":
        h5_final = out_dir / "patches" / f"{sid}.h5"
        sink: Any = _H5PatchSink(staging.temp_file(h5_final), n, size)
    else:
        sink = _PNGSink(staging.sample_dir(sid), barcodes)
    kept = np.ones(n, bool)
    padded = np.zeros(n, bool)
    white = np.zeros(n, np.float32)
    advance = prog.task(sid, n)
    thumb: dict = {}
    try:
        if image is not None:
            thumb = _write_thumbnail(image, sid, staging, out_dir)
            res.update(thumbnail=str(out_dir / thumb["thumbnail"]), thumbnail_scale=thumb["thumbnail_scale"])
            side_src = patch_um / data.source_um_per_px
            for i in image.order(coords):
                patch, padded[i] = cut_patch(image, coords[i, 0], coords[i, 1], side_src, size)
                white[i] = white_fraction(patch)
                if filter_background and white[i] > BACKGROUND_MAX_WHITE_FRACTION:
                    kept[i] = False
                else:
                    sink.put(i, patch)
                advance(1)
            res["tiles_decoded"] = getattr(image, "tiles_decoded", None)
        else:
            _copy_ready_patches(data, idx, sink, kept, white, size, patch_um, target_um_per_px,
                                filter_background, advance)
    except BaseException:
        sink.close()
        raise
    finally:
        if image is not None:
            image.close()
    try:
        n_bg = int((~kept).sum())
        if n_bg:
            warn(msgs, f"{sid}: {n_bg} background patch(es) (near-white fraction > "
                       f"{BACKGROUND_MAX_WHITE_FRACTION}) dropped")
        n_pad = int(padded[kept].sum())
        if n_pad:
            warn(msgs, f"{sid}: {n_pad} patch(es) reach beyond the image edge and were padded with white")
        if not kept.any():
            sink.close()
            raise ImporterError(f"{sid}: every patch was dropped as background; check the image or "
                                f"import with filter_background=False")
        kidx = np.flatnonzero(kept)
        k_barcodes = [barcodes[i] for i in kidx]
        k_coords = coords[kidx]

        # ---- expression ------------------------------------------------------------------------
        col_of = {g: j for j, g in enumerate(data.genes)}
        cols = np.array([col_of[g] for g in genes], dtype=np.int64)
        rows = idx[kidx]
        X, counts_sub, norm_details = normalize_counts(sp.csr_matrix(data.counts[rows]), cols, normalize, msgs, sid)

        src_mpp = data.source_um_per_px
        patch_mpp = patch_um / size
        prov = {
            "hexpr_version": hexpr_version(),
            "importer": kind,
            "sample_id": sid,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source_files": {k: str(v) for k, v in data.source_files.items()},
            "source_um_per_px": float(src_mpp) if src_mpp else "",
            "scale": data.scale_info,
            "patch_size_um": float(patch_um),
            "patch_size_px": int(size),
            "patch_um_per_px": float(patch_mpp),
            "target_um_per_px": float(target_um_per_px),
            "resample": "lanczos",
            "pad_value": WHITE,
            "pixel_centre_convention": "coordinate (x, y) = pixel img[y, x], centre at (x+0.5, y+0.5)",
            "normalization": normalize,
            "normalization_details": norm_details,
            "n_genes_sample": len(data.genes),
            "n_genes": len(genes),
            "counts": data.counts_info,
            "filter_background": bool(filter_background),
            "n_background_dropped": n_bg,
            "n_padded": n_pad,
            "n_outside_dropped": res["n_outside_dropped"],
            **thumb,
            **data.provenance,
        }
        prov = _clean(prov)
        attrs = {
            "sample_id": sid,
            "pixel_size_um": float(patch_mpp),
            "patch_size_um": float(patch_um),
            "source_pixel_size_um": float(src_mpp) if src_mpp else float("nan"),
            "patch_size_px": int(size),
        }
        if thumb:
            attrs["thumbnail"] = thumb["thumbnail"]
            attrs["thumbnail_scale"] = float(thumb["thumbnail_scale"])
        csv_part = None
        if output == "hest":
            sink.finish(kept, barcodes, coords, attrs)
            import anndata as ad

            obs = pd.DataFrame(index=pd.Index(k_barcodes, dtype=object))
            obs["group"] = sid
            if data.obs is not None:
                extra = data.obs.iloc[rows]
                for c in extra.columns:
                    if c != "group":
                        obs[c] = extra[c].to_numpy()
            var = pd.DataFrame(index=pd.Index(genes, dtype=object))
            adata = ad.AnnData(X=X, obs=obs, var=var, layers={"counts": counts_sub})
            adata.obsm["spatial"] = np.asarray(k_coords, np.float64)
            adata.uns["hexpr_import"] = prov
            h5ad_final = out_dir / "st" / f"{sid}.h5ad"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # anndata's str->categorical notices
                adata.write_h5ad(staging.temp_file(h5ad_final))
            res["files"] = {"patches": str(h5_final), "st": str(h5ad_final)}
        else:
            for i in np.flatnonzero(~kept):
                sink.drop(i)
            files = [sink.files[i] for i in kidx]
            head = [[f"{sid}/{b}", f"{sid}/{f}", sid, _fmt(x), _fmt(y)]
                    for b, f, (x, y) in zip(k_barcodes, files, k_coords)]
            csv_part = (head, X)
            res["files"] = {"dir": str(out_dir / sid)}
        res.update({
            "n_patches": int(len(kidx)),
            "n_background_dropped": n_bg,
            "n_padded": n_pad,
            "source_um_per_px": float(src_mpp) if src_mpp else None,
            "scale": data.scale_info,
            "patch_size_px": size,
            "n_genes_sample": len(data.genes),
            "warnings": list(msgs),
        })
    except BaseException:
        sink.close()
        raise
    return res, csv_part


def _write_thumbnail(image: SlideImage, sid: str, staging: _Staging, out_dir: Path) -> dict:
    """Write out_dir/thumbnails/<sid>.png (under a temporary name until commit); returns its record."""
    from PIL.PngImagePlugin import PngInfo

    f = thumbnail_factor(image.width, image.height, THUMBNAIL_MAX_SIDE)
    arr = image.thumbnail(f)
    rel = f"{THUMBNAIL_DIR}/{sid}.png"
    final = out_dir / THUMBNAIL_DIR / f"{sid}.png"
    final.parent.mkdir(parents=True, exist_ok=True)
    scale = 1.0 / f
    info = PngInfo()
    info.add_text("hexpr_thumbnail_scale", repr(scale))
    info.add_text("hexpr_image_size", f"{int(image.width)}x{int(image.height)}")
    info.add_text("hexpr_sample_id", str(sid))
    Image.fromarray(arr).save(staging.temp_file(final), format="PNG", pnginfo=info, compress_level=3)
    return {"thumbnail": rel, "thumbnail_scale": scale, "thumbnail_factor": int(f),
            "thumbnail_size": [int(arr.shape[1]), int(arr.shape[0])]}


def _fmt(v: float) -> str:
    return repr(float(v))


def _write_csv_rows(fh, head: list[list[str]], X) -> None:
    """Fast wide-CSV rows: csv-quoted leading fields + '%.6g' values ('0' for zeros)."""
    buf = io.StringIO()
    hw = csv.writer(buf)
    for i, h in enumerate(head):
        row = X[i] if isinstance(X, np.ndarray) else X[i].toarray().ravel()
        buf.seek(0)
        buf.truncate()
        hw.writerow(h)
        fh.write(buf.getvalue().rstrip("\r\n"))
        fh.write(",")
        fh.write(",".join(["0" if v == 0 else "%.6g" % v for v in row.tolist()]))
        fh.write("\n")


def _copy_ready_patches(data: SampleData, idx: np.ndarray, sink: Any, kept: np.ndarray, white: np.ndarray,
                        size: int, patch_um: float, target_um_per_px: float, filter_background: bool,
                        advance: Callable[[int], None]) -> None:
    """HEST ready patches: copy (or resample/centre-crop) rows of patches_h5['img']."""
    import h5py

    assert data.patches_h5 is not None and data.patches_rows is not None
    rows = np.asarray(data.patches_rows)[idx]
    with h5py.File(data.patches_h5, "r") as f:
        img = f["img"]
        src_size = int(img.shape[1])
        src_mpp = float(data.patches_um_per_px or target_um_per_px)
        src_um = src_size * src_mpp
        if patch_um > src_um * 1.001:
            raise ImporterError(
                f"{data.patches_h5}: ready patches cover {src_um:.1f} µm but patch_um={patch_um}; "
                f"cut from the whole-slide image instead (put wsis/{data.sample_id}.tif beside st/) "
                f"or use patch_um <= {src_um:.1f}")
        same = src_size == size and abs(src_um - patch_um) < 1e-6 * max(1.0, patch_um)
        side_src = patch_um / src_mpp
        for i, r in enumerate(rows):
            p = np.asarray(img[int(r)])
            if p.ndim != 3 or p.shape[-1] < 3:
                raise ImporterError(f"{data.patches_h5}: img rows must be (H, W, 3) RGB, got {p.shape}")
            p = _to_rgb8(p, data.patches_h5)
            if not same:
                c = (src_size - 1) / 2.0
                p, _ = cut_patch(ArraySlide(p), c, c, side_src, size)
            white[i] = white_fraction(p)
            if filter_background and white[i] > BACKGROUND_MAX_WHITE_FRACTION:
                kept[i] = False
            else:
                sink.put(i, p)
            advance(1)
