"""Patch datasets: one interface ("ids, targets, groups, coords, image i") over two on-disk forms.

* Challenge layout: a CSV with ``ID``, ``path`` (image file relative to the CSV's folder),
  optional ``group``, ``x``, ``y``, and one numeric column per gene (training data only). A
  ``sample_submission.csv`` beside it (ID + gene columns) fixes the output genes and their order.
* HEST-style: ``patches/<sample>.h5`` (``img``, ``barcode``, ``coords``) with expression in
  ``st/<sample>.h5ad``; a folder holding ``patches/`` is every sample in it, concatenated.

**Bags.** A patch file may also hold ``bag`` (one observation id per patch, matching the obs names
of the ``.h5ad``): each observation is then measured over several patches (its sub-tiles; written
by ``hexpr import --pool-spots K`` or ``--subtile-um S``). ``ids``, ``coords``, ``groups`` and the
images stay per patch (so the embedding cache keys sub-tiles like any patch); ``targets`` holds one
row per observation, and ``bag_index[i]`` is the row of ``targets`` that patch ``i`` belongs to.
All samples of a dataset must be bagged, or none (a mix is refused: sub-tiles and whole spots would
otherwise be weighed as equals).

Rows are always joined by id, never by position. Every validation error names the file, the row
(1-based line number of the CSV, header = line 1) or id, and what to do.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd

from hexpr.embedder.errors import DataError
from hexpr.embedder.images import array_to_rgb_uint8, read_image_file
from hexpr.embedder.slides import SLIDE_SUFFIXES

ID_COLUMN = "ID"
PATH_COLUMN = "path"
GROUP_COLUMN = "group"
OBSERVATION_COLUMN = "observation"   # predictions of a bagged dataset: the observation each patch belongs to
COORD_COLUMNS = ("x", "y")
RESERVED_COLUMNS = {ID_COLUMN, PATH_COLUMN, GROUP_COLUMN, *COORD_COLUMNS}
TEMPLATE_NAME = "sample_submission.csv"
_MAX_LISTED = 5


class DatasetError(DataError):
    """Bad or inconsistent input data; the message says which file, which row and the fix."""


class DatasetWarning(UserWarning):
    """Something was dropped or adjusted while reading a dataset."""


def _listing(items, limit: int = _MAX_LISTED) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


@dataclass
class PatchDataset:
    """Base of every patch source. Subclasses fill the fields and implement ``read_image``."""

    name: str
    source: Path
    ids: list[str]
    targets: pd.DataFrame | None = None
    groups: pd.Series | None = None
    coords: np.ndarray | None = None
    template_genes: list[str] | None = None
    target_unit: str | None = None      # what the targets measure, when the source records it (e.g. "log1p CP10k")
    bag_index: np.ndarray | None = None   # (N,) row of ``targets`` each patch belongs to (None: one row per patch)
    subtile_um: float | None = None       # side of the sub-tiles in µm when bagged
    _fingerprint: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def genes(self) -> list[str] | None:
        return None if self.targets is None else list(self.targets.columns)

    def read_image(self, i: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def image_label(self, i: int) -> str:
        """Where image ``i`` comes from, for error messages."""
        return f"{self.source} id {self.ids[i]!r}"

    def _image_digests(self):  # pragma: no cover - abstract
        """Yield (id, bytes-like) pairs that determine the images."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Content hash of ids and image bytes, independent of row order."""
        if self._fingerprint is None:
            per_id = sorted(
                (sid, hashlib.blake2b(memoryview(data), digest_size=16).hexdigest())
                for sid, data in self._image_digests()
            )
            h = hashlib.blake2b(digest_size=16)
            h.update(type(self).__name__.encode())
            for sid, digest in per_id:
                h.update(sid.encode() + b"\0" + digest.encode() + b"\n")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def patch_scale(self) -> dict | None:
        """The patches' physical size when the source records it: {"patch_um", "patch_px", "um_per_px"}."""
        return None

    @property
    def is_bagged(self) -> bool:
        return self.bag_index is not None

    def patch_observations(self) -> list[str] | None:
        """The observation id of each patch (row of ``targets``) of a bagged dataset; None otherwise."""
        if self.bag_index is None or self.targets is None:
            return None
        labels = np.asarray(self.targets.index.astype(str))
        return labels[np.asarray(self.bag_index)].tolist()

    def observation_groups(self) -> pd.Series | None:
        """One group per row of ``targets`` (a bag's patches share their observation's group)."""
        if self.groups is None or not self.is_bagged:
            return self.groups
        first = pd.Series(np.arange(len(self.ids))).groupby(self.bag_index).first().to_numpy()
        return pd.Series(self.groups.to_numpy()[first], index=self.targets.index, name=GROUP_COLUMN)

    def describe(self) -> dict:
        info = {
            "name": self.name,
            "source": str(self.source),
            "kind": type(self).__name__,
            "n_spots": len(self),
            "n_genes": 0 if self.targets is None else self.targets.shape[1],
            "n_groups": 0 if self.groups is None else int(self.groups.nunique()),
            "has_coords": self.coords is not None,
        }
        if self.is_bagged:
            info.update(n_observations=int(len(self.targets)), subtile_um=self.subtile_um)
        return info


# ----------------------------------------------------------------------------- challenge CSV


class CsvPatchDataset(PatchDataset):
    """Challenge layout: one image file per row of a CSV."""

    image_paths: list[Path]

    def read_image(self, i: int) -> np.ndarray:
        path = self.image_paths[i]
        try:
            return read_image_file(path)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the same user problem
            raise DatasetError(
                f"{self.source}, line {i + 2} (ID {self.ids[i]!r}): cannot read image {path}: {exc}. "
                "Replace or remove the file and its row."
            ) from exc

    def image_label(self, i: int) -> str:
        return f"{self.image_paths[i]} ({self.source}, line {i + 2})"

    def _image_digests(self):
        for sid, path in zip(self.ids, self.image_paths):
            yield sid, path.read_bytes()


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={ID_COLUMN: str, PATH_COLUMN: str, GROUP_COLUMN: str}, low_memory=False)
    except pd.errors.EmptyDataError as exc:
        raise DatasetError(f"{path} is empty: expected a header with {ID_COLUMN!r} and {PATH_COLUMN!r}") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not a readable CSV: {exc}") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _check_ids(ids: pd.Series, path: Path) -> list[str]:
    missing = ids.isna() | (ids.astype(str).str.strip() == "")
    if missing.any():
        lines = (np.flatnonzero(missing.to_numpy()) + 2).tolist()
        raise DatasetError(f"{path}: empty {ID_COLUMN} on line(s) {_listing(lines)}. Give every row a unique ID.")
    ids = ids.astype(str).str.strip()
    dup = ids.duplicated(keep=False)
    if dup.any():
        first = ids[dup].iloc[0]
        lines = (np.flatnonzero((ids == first).to_numpy()) + 2).tolist()
        raise DatasetError(
            f"{path}: duplicate {ID_COLUMN} values ({int(ids[dup].nunique())} ids repeated), e.g. {first!r} on "
            f"lines {_listing(lines)}. IDs must be unique: rename or drop the repeated rows."
        )
    return ids.tolist()


def numeric_columns(frame: pd.DataFrame, columns: list[str], path: Path, what: str) -> pd.DataFrame:
    """Columns as float64; the first non-numeric / NaN / inf cell is reported with line and column.

    Only columns pandas did not already parse as numbers are coerced (thousands of gene columns
    are otherwise converted one by one).
    """
    block = frame[columns]
    is_text = ~block.dtypes.map(pd.api.types.is_numeric_dtype).to_numpy(dtype=bool)
    if is_text.any():  # only text columns can hold cells that are not numbers
        text = block.loc[:, is_text]
        coerced = text.apply(pd.to_numeric, errors="coerce")
        bad_text = (coerced.isna() & text.notna()).to_numpy()
        if bad_text.any():
            row, col = np.argwhere(bad_text)[0]
            raise DatasetError(
                f"{path}, line {row + 2}, column {text.columns[col]!r}: {what} value {text.iat[row, col]!r} is not a "
                f"number ({int(bad_text.sum())} such cells). Every {what} column must be numeric; "
                "non-gene columns other than ID, path, group, x, y are not allowed."
            )
        block = block.copy()
        block.loc[:, is_text] = coerced
    numeric = block.astype(np.float64)
    values = numeric.to_numpy()
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DatasetError(
            f"{path}, line {row + 2}, column {columns[col]!r}: {what} value is {'missing' if np.isnan(values[row, col]) else 'infinite'} "
            f"({int(bad.sum())} NaN/inf cells). Fill or drop these rows; hexpr does not impute."
        )
    return numeric


def _read_template(path: Path) -> list[str]:
    frame = _read_csv(path)
    if ID_COLUMN not in frame.columns:
        raise DatasetError(f"{path}: the submission template needs an {ID_COLUMN!r} column; found {_listing(frame.columns)}")
    genes = [c for c in frame.columns if c != ID_COLUMN]
    if not genes:
        raise DatasetError(f"{path}: the submission template has no gene columns")
    return genes


def check_genes_match(genes: list[str], template_genes: list[str], source: str, template: str) -> None:
    """Training genes and template genes must be the same set (order may differ)."""
    missing = [g for g in template_genes if g not in set(genes)]
    extra = [g for g in genes if g not in set(template_genes)]
    if missing or extra:
        raise DatasetError(
            f"genes differ between {source} and {template}: {len(missing)} template genes not in the data "
            f"({_listing(missing)}), {len(extra)} data genes not in the template ({_listing(extra)}). "
            "Use the template that belongs to this training set, or subset the CSV columns to match."
        )


def read_challenge_csv(path: Path, template: Path | None = None) -> CsvPatchDataset:
    frame = _read_csv(path)
    for column in (ID_COLUMN, PATH_COLUMN):
        if column not in frame.columns:
            raise DatasetError(
                f"{path}: missing required column {column!r} (found {_listing(frame.columns)}). "
                f"The challenge layout needs {ID_COLUMN!r}, {PATH_COLUMN!r} and, for training, one column per gene."
            )
    if frame.empty:
        raise DatasetError(f"{path} has a header but no rows: the dataset is empty")
    ids = _check_ids(frame[ID_COLUMN], path)

    rel = frame[PATH_COLUMN]
    if rel.isna().any():
        lines = (np.flatnonzero(rel.isna().to_numpy()) + 2).tolist()
        raise DatasetError(f"{path}: empty {PATH_COLUMN!r} on line(s) {_listing(lines)}")
    base = path.parent
    image_paths = [(base / p.strip()) if not Path(p.strip()).is_absolute() else Path(p.strip()) for p in rel]
    absent = [(i + 2, p) for i, p in enumerate(image_paths) if not p.is_file()]
    if absent:
        raise DatasetError(
            f"{path}: {len(absent)} image file(s) not found, e.g. line {absent[0][0]}: {absent[0][1]}. "
            f"Paths are read relative to {base}; fix the {PATH_COLUMN!r} column or restore the files."
        )

    gene_columns = [c for c in frame.columns if c not in RESERVED_COLUMNS]
    targets = None
    if gene_columns:
        targets = numeric_columns(frame, gene_columns, path, "expression")
        targets.index = pd.Index(ids, name=ID_COLUMN)
    groups = None
    if GROUP_COLUMN in frame.columns:
        if frame[GROUP_COLUMN].isna().any():
            lines = (np.flatnonzero(frame[GROUP_COLUMN].isna().to_numpy()) + 2).tolist()
            raise DatasetError(f"{path}: empty {GROUP_COLUMN!r} on line(s) {_listing(lines)}; give every row its slide/patient id")
        groups = pd.Series(frame[GROUP_COLUMN].astype(str).to_numpy(), index=pd.Index(ids, name=ID_COLUMN), name=GROUP_COLUMN)
    coords = None
    if all(c in frame.columns for c in COORD_COLUMNS):
        coords = numeric_columns(frame, list(COORD_COLUMNS), path, "coordinate").to_numpy()

    template_path = template if template is not None else (path.parent / TEMPLATE_NAME)
    template_genes = None
    if template is not None or (template_path.is_file() and template_path.resolve() != path.resolve()):
        if not template_path.is_file():
            raise DatasetError(f"submission template {template_path} not found")
        template_genes = _read_template(template_path)
        if targets is not None:
            check_genes_match(list(targets.columns), template_genes, str(path), str(template_path))

    dataset = CsvPatchDataset(
        name=path.stem, source=path, ids=ids, targets=targets, groups=groups, coords=coords,
        template_genes=template_genes,
    )
    dataset.image_paths = image_paths
    return dataset


# ----------------------------------------------------------------------------- HEST-style


class HestPatchDataset(PatchDataset):
    """Patches stored in HEST-style ``.h5`` files, one per sample, read lazily (picklable)."""

    patch_files: list[Path]
    rows: np.ndarray  # (N, 2): (file index, row in that file) per id
    _handles: dict | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = None  # h5py handles do not cross process boundaries
        return state

    def _handle(self, file_index: int):
        if self._handles is None:
            self._handles = {}
        if file_index not in self._handles:
            self._handles[file_index] = h5py.File(self.patch_files[file_index], "r")
        return self._handles[file_index]

    def read_image(self, i: int) -> np.ndarray:
        file_index, row = self.rows[i]
        try:
            return array_to_rgb_uint8(self._handle(int(file_index))["img"][int(row)])
        except Exception as exc:  # noqa: BLE001
            raise DatasetError(
                f"{self.patch_files[file_index]}: cannot read patch row {row} (id {self.ids[i]!r}): {exc}"
            ) from exc

    def image_label(self, i: int) -> str:
        file_index, row = self.rows[i]
        return f"{self.patch_files[file_index]} row {row} (id {self.ids[i]!r})"

    def patch_scale(self) -> dict | None:
        """From the first patch file's attrs (written by ``hexpr import``: patch_size_um, patch_size_px)."""
        try:
            attrs = self._handle(0).attrs
            patch_um, patch_px = float(attrs["patch_size_um"]), int(attrs["patch_size_px"])
        except (KeyError, TypeError, ValueError):
            return None
        if not (patch_um > 0 and patch_px > 0):
            return None
        return {"patch_um": patch_um, "patch_px": patch_px, "um_per_px": patch_um / patch_px}

    def _image_digests(self):
        for i, sid in enumerate(self.ids):
            file_index, row = self.rows[i]
            yield sid, np.ascontiguousarray(self._handle(int(file_index))["img"][int(row)])


def _read_patch_file(path: Path) -> tuple[list[str], np.ndarray | None, int, list[str] | None, float | None]:
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("img", "barcode") if k not in f]
            if missing:
                raise DatasetError(f"{path}: HEST patch file lacks dataset(s) {missing}; expected img, barcode, coords")
            img = f["img"]
            if img.ndim != 4 or img.shape[-1] not in (1, 3, 4):
                raise DatasetError(f"{path}: 'img' must be (N, H, W, 3); got shape {img.shape}")
            barcodes = [b.decode() if isinstance(b, bytes) else str(b) for b in np.asarray(f["barcode"]).reshape(-1)]
            coords = np.asarray(f["coords"], dtype=np.float64) if "coords" in f else None
            bags = ([b.decode() if isinstance(b, bytes) else str(b) for b in np.asarray(f["bag"]).reshape(-1)]
                    if "bag" in f else None)
            subtile_um = float(f.attrs["subtile_um"]) if "subtile_um" in f.attrs else None
            n = img.shape[0]
    except OSError as exc:
        raise DatasetError(f"{path} is not a readable HDF5 file: {exc}") from exc
    if len(barcodes) != n:
        raise DatasetError(f"{path}: {len(barcodes)} barcodes for {n} images; the two must match row for row")
    if n == 0:
        raise DatasetError(f"{path} holds no patches")
    if bags is not None and len(bags) != n:
        raise DatasetError(f"{path}: {len(bags)} bag labels for {n} images; 'bag' must name one observation per patch")
    return barcodes, coords, n, bags, subtile_um


def _find_expression(patch_file: Path) -> Path | None:
    """``<sample>.h5ad`` beside the patch file, in ``../st/`` (hexpr import, HEST-1k) or ``../adata/`` (HEST-Bench tasks)."""
    root = patch_file.parent.parent
    for candidate in (patch_file.with_suffix(".h5ad"), root / "st" / f"{patch_file.stem}.h5ad",
                      root / "adata" / f"{patch_file.stem}.h5ad"):
        if candidate.is_file():
            return candidate
    return None


# uns['hexpr_import']['normalization'] of an imported sample -> the unit its values are in
TARGET_UNITS = {"log1p_cp10k": "log1p CP10k", "none": "counts"}


def _read_expression(path: Path) -> tuple[pd.DataFrame, pd.Series | None, str | None]:
    try:
        adata = anndata.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"{path} is not a readable AnnData .h5ad file: {exc}") from exc
    matrix = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    frame = pd.DataFrame(np.asarray(matrix, dtype=np.float64), index=adata.obs_names.astype(str), columns=adata.var_names.astype(str))
    if frame.index.duplicated().any():
        raise DatasetError(f"{path}: duplicate obs names (barcodes), e.g. {frame.index[frame.index.duplicated()][0]!r}")
    bad = ~np.isfinite(frame.to_numpy())
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DatasetError(f"{path}: NaN/inf expression at barcode {frame.index[r]!r}, gene {frame.columns[c]!r} ({int(bad.sum())} cells)")
    group = adata.obs["group"].astype(str) if "group" in adata.obs.columns else None
    record = adata.uns.get("hexpr_import")
    unit = TARGET_UNITS.get(str(record.get("normalization"))) if isinstance(record, dict) else None
    return frame, group, unit


def read_hest(path: Path, with_expression: bool = True) -> HestPatchDataset:
    """HEST-style patches (a .h5 file, or a folder of them under patches/) with their expression
    (``with_expression=False``: patches only, e.g. to embed them without reading the .h5ad files)."""
    if path.is_dir():
        patch_dir = path / "patches" if (path / "patches").is_dir() else path
        patch_files = sorted(patch_dir.glob("*.h5"))
        if not patch_files:
            raise DatasetError(f"{path}: no HEST patch files (*.h5) found in {patch_dir}")
        prefix_ids = True
    else:
        patch_files = [path]
        prefix_ids = False

    ids, rows, coords, groups, expr_frames, units = [], [], [], [], [], set()
    bag_labels, bagged_files, subtile_sizes = [], [], set()
    has_coords = True
    for file_index, patch_file in enumerate(patch_files):
        barcodes, file_coords, n, bags, subtile_um = _read_patch_file(patch_file)
        bagged_files.append(bags is not None)
        if bags is not None:
            subtile_sizes.add(subtile_um)
        keys = barcodes if bags is None else bags   # the expression row of each patch
        sample = patch_file.stem
        expr_path = _find_expression(patch_file) if with_expression else None
        keep = np.arange(n)
        sample_group = pd.Series(sample, index=list(dict.fromkeys(keys)))
        if expr_path is not None:
            frame, obs_group, unit = _read_expression(expr_path)
            units.add(unit)
            present = np.array([b in frame.index for b in keys])
            if not present.all():
                warnings.warn(
                    f"{patch_file}: {int((~present).sum())} of {n} patches have no expression row in {expr_path} "
                    f"(e.g. {_listing(np.array(keys)[~present])}); they are left out of this dataset",
                    DatasetWarning, stacklevel=2,
                )
                keep = np.flatnonzero(present)
            unused = len(set(frame.index) - set(keys))
            if unused:
                warnings.warn(f"{expr_path}: {unused} expression rows have no patch in {patch_file}; ignored", DatasetWarning, stacklevel=2)
            kept_keys = list(dict.fromkeys(keys[k] for k in keep))
            expr_frames.append(frame.loc[kept_keys])
            if obs_group is not None:
                sample_group = obs_group
        elif expr_frames:
            raise DatasetError(f"{patch_file}: no expression file found ({patch_file.stem}.h5ad beside it or in ../st/) while other samples have one")
        if len(keep) == 0:
            raise DatasetError(f"{patch_file}: no patch has an expression row; check that barcodes match the .h5ad obs names")
        for k in keep:
            ids.append(f"{sample}/{barcodes[k]}" if prefix_ids else barcodes[k])
            rows.append((file_index, k))
            groups.append(str(sample_group.get(keys[k], sample)))
            if bags is not None:
                bag_labels.append(f"{sample}/{bags[k]}" if prefix_ids else bags[k])
        if file_coords is None:
            has_coords = False
        else:
            coords.append(file_coords[keep])

    if any(bagged_files) and not all(bagged_files):
        bagged = [p.name for p, b in zip(patch_files, bagged_files) if b]
        plain = [p.name for p, b in zip(patch_files, bagged_files) if not b]
        raise DatasetError(
            f"{path}: {_listing(bagged)} hold bags (observations measured over several sub-tiles) but "
            f"{_listing(plain)} hold one patch per spot; a mix would weigh sub-tiles and whole spots as equals. "
            "Import all samples together with the same --pool-spots / --subtile-um, or put them in separate folders.")
    if len(subtile_sizes) > 1:
        raise DatasetError(f"{path}: samples were cut into sub-tiles of different sizes ({sorted(map(str, subtile_sizes))} µm); "
                           "import them together with one --subtile-um")
    targets = None
    if expr_frames:
        genes = list(expr_frames[0].columns)
        common = set(genes).intersection(*[set(f.columns) for f in expr_frames[1:]])
        if len(common) < len(genes) or any(len(f.columns) != len(common) for f in expr_frames):
            warnings.warn(f"{path}: samples measure different genes; keeping the {len(common)} shared by all", DatasetWarning, stacklevel=2)
        shared = [g for g in genes if g in common]
        if not shared:
            raise DatasetError(f"{path}: the samples share no gene; import them together so they get one gene set")
        if bag_labels:
            obs_ids = list(dict.fromkeys(bag_labels))
            position = {o: i for i, o in enumerate(obs_ids)}
            bag_index = np.array([position[b] for b in bag_labels], dtype=np.int64)
        else:
            obs_ids, bag_index = ids, None
        targets = pd.DataFrame(np.vstack([f[shared].to_numpy() for f in expr_frames]), index=pd.Index(obs_ids, name=ID_COLUMN), columns=shared)
    else:
        bag_index = None
    dataset = HestPatchDataset(
        name=path.stem if path.is_file() else path.name,
        source=path,
        ids=ids,
        targets=targets,
        groups=pd.Series(groups, index=pd.Index(ids, name=ID_COLUMN), name=GROUP_COLUMN),
        coords=np.vstack(coords) if has_coords and coords else None,
        target_unit=units.pop() if len(units) == 1 else None,
        bag_index=bag_index,
        subtile_um=next(iter(subtile_sizes)) if bag_index is not None else None,
    )
    dataset.patch_files = patch_files
    dataset.rows = np.asarray(rows, dtype=np.int64)
    return dataset


# ----------------------------------------------------------------------------- entry point


def open_dataset(path: str | Path, template: str | Path | None = None) -> PatchDataset:
    """Open a dataset, detecting its form from the path (CSV file, HEST .h5 file or folder)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path} does not exist. Give a challenge CSV, a HEST .h5 patch file or a folder holding patches/.")
    template = Path(template) if template is not None else None
    if path.is_file() and path.suffix.lower() == ".csv":
        return read_challenge_csv(path, template)
    if path.is_file() and path.suffix.lower() in (".h5", ".hdf5"):
        return read_hest(path)
    if path.is_dir():
        if (path / "patches").is_dir() or any(path.glob("*.h5")):
            return read_hest(path)
        csvs = sorted(p for p in path.glob("*.csv") if p.name != TEMPLATE_NAME)
        hint = f" CSV files here: {_listing(p.name for p in csvs)}; pass one of them." if csvs else ""
        raise DatasetError(f"{path}: folder holds neither patches/*.h5 nor *.h5.{hint}")
    if path.suffix.lower() in SLIDE_SUFFIXES:
        raise DatasetError(f"{path} is a slide image, not a dataset of patches; to predict a whole slide use "
                           f"`hexpr predict-slide MODEL {path}` (predict reads a challenge CSV, a HEST .h5 or a folder)")
    raise DatasetError(f"{path}: unknown dataset form (expected .csv, .h5 or a folder)")
