"""hexpr view: the browser viewer of maps predict-slide already wrote (OUT/<slide>/predictions.h5ad)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from hexpr.embedder.datasets import DatasetError
from hexpr.embedder.files import atomic_dir
from hexpr.embedder.slides import SlideError
from hexpr.workflow.outputs.slide_maps import SlideMap
from hexpr.workflow.outputs.viewer import VIEWER_DIR, write_run_index, write_viewer

PREDICTIONS = "predictions.h5ad"


def _plain(value):
    """h5ad's uns values (numpy scalars and arrays) as plain Python values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_slide_map(slide_dir: Path) -> SlideMap:
    """The SlideMap of a slide folder written by predict-slide, from its predictions.h5ad. Example::

        >>> m = hexpr.read_slide_map("maps/C3")       # m.predictions: tiles x genes; m.centres: level-0 px
    """
    import anndata

    path = Path(slide_dir) / PREDICTIONS
    try:
        adata = anndata.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 - h5py/anndata raise many kinds
        raise DatasetError(f"{path}: cannot read it as predict-slide's predictions ({exc})") from None
    provenance = _plain(dict(adata.uns.get("hexpr", {})))
    spatial = dict(adata.uns.get("spatial", {}))
    if not spatial or "spatial" not in adata.obsm or "tile_px_level0" not in provenance:
        raise DatasetError(f"{path} lacks the slide geometry predict-slide records (uns['spatial'], obsm['spatial'], "
                           f"uns['hexpr']['tile_px_level0']); pass a folder that hexpr predict-slide wrote")
    name, library = next(iter(spatial.items()))
    thumbnail = np.asarray(library["images"]["hires"], np.uint8)
    scale = float(library["scalefactors"]["tissue_hires_scalef"])
    predictions = pd.DataFrame(np.asarray(adata.X, np.float32), index=adata.obs_names, columns=adata.var_names)
    scores = [c for c in adata.obs.columns if str(c).startswith("score_")]
    layers = {k: pd.DataFrame(np.asarray(v, np.float32), index=adata.obs_names, columns=adata.var_names)
              for k, v in adata.layers.items()}
    tile_px = float(provenance["tile_px_level0"])
    return SlideMap(str(name), predictions, np.asarray(adata.obsm["spatial"], float), tile_px,
                    float(provenance.get("stride_px_level0") or tile_px), thumbnail, scale,
                    adata.obs.drop(columns=scores).reset_index(drop=True), provenance,
                    scores=adata.obs[scores].reset_index(drop=True), layers=layers)


def _slide_folders(path: Path) -> list[Path]:
    if (path / PREDICTIONS).is_file():
        return [path]
    inside = sorted(p for p in path.iterdir() if (p / PREDICTIONS).is_file()) if path.is_dir() else []
    if not inside:
        what = "does not exist" if not path.exists() else f"holds no {PREDICTIONS}"
        raise DatasetError(f"{path} {what}: pass a slide folder that predict-slide wrote (OUT/<slide>, with the h5ad "
                           f"output, the default), or the --out folder holding such slide folders")
    return inside


def view(path, *, slide=None, pyramid: bool = True, progress: bool = True) -> dict:
    """Write ``<slide folder>/viewer/`` (see ``workflow.outputs.viewer``) for maps predict-slide wrote.

    ``path``: a slide folder (OUT/<slide>) or a run folder (OUT) of them; with several, OUT/index.html
    links every viewer. ``slide``: where the slide file is now (one slide folder only; default: the
    place recorded in predictions.h5ad). ``pyramid=False`` draws the maps over the stored thumbnail.
    An existing viewer/ is replaced (it is derived from the h5ad). Example::

        >>> hexpr.view("maps/C3")                      # then open maps/C3/viewer/index.html
    """
    path = Path(path)
    folders = _slide_folders(path)
    if slide is not None and len(folders) > 1:
        raise DatasetError(f"--slide names one slide file, but {path} holds {len(folders)} slide folders; "
                           f"pass one slide folder (e.g. {folders[0]})")
    maps = []
    for folder in folders:          # every check before any writing
        m = read_slide_map(folder)
        if slide is not None:
            m.provenance["slide"] = str(Path(slide))
        if pyramid:
            recorded = m.provenance.get("slide")
            if slide is not None and not Path(slide).is_file():
                raise SlideError(f"--slide {slide}: no such file; pass the slide file predict-slide read for {folder}, "
                                 f"or --no-pyramid to view the maps over the thumbnail stored in the h5ad")
            if not recorded or not Path(str(recorded)).is_file():
                hint = "--slide NEW_PATH" if len(folders) == 1 else f"one slide folder ({folder}) with --slide NEW_PATH"
                raise SlideError(f"slide file {recorded or '(not recorded)'} of {folder / PREDICTIONS} is not there: "
                                 f"pass {hint}, or --no-pyramid to view the maps over the thumbnail stored in the h5ad")
        maps.append((folder, m))
    report = {"viewers": {}}
    for folder, m in maps:
        started = time.perf_counter()
        with atomic_dir(folder / VIEWER_DIR) as tmp, _bar(progress, f"{folder.name}: pyramid blocks") as step:
            written = write_viewer(m, tmp, pyramid=pyramid, progress=step)
        written["seconds"] = round(time.perf_counter() - started, 2)
        report["viewers"][str(folder / VIEWER_DIR / "index.html")] = written
    index = write_run_index(folders[0].parent)
    report["index"] = str(index) if index else None
    return report



@contextmanager
def _bar(show: bool, title: str):
    """A progress bar (rich) over the pyramid's blocks: yields the ``progress(done, total)`` callback."""
    if not show:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task(title, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
