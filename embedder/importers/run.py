"""The import driver: every sample of one call written with one gene set, all or nothing.

Per sample: spots without a coordinate or outside the slide are dropped, a patch is cut (or
copied from HEST's ready patches) for each remaining spot, background patches are optionally
dropped, expression is normalised and the HEST-style or challenge-layout files are written under
a temporary folder (:class:`~.staging.Staging`), swapped in as a whole only when every sample succeeded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hexpr.embedder.slides import SlideError, SlideImage

from .bags import check_bag_options, check_subtile_pixels, observations, pool_labels, subtile_layout
from .challenge_output import PNGSink, csv_leading_fields, write_csv_header, write_csv_rows
from .errors import ImporterError, warn
from .expression import gene_columns, normalize_counts
from .genes import common_genes
from .hest_output import H5PatchSink, expression_file_path, patch_file_path, spot_table, write_h5ad
from .options import ImportSettings, check_options
from .patches import BACKGROUND_MAX_WHITE_FRACTION, PatchFlags, copy_ready_patches, cut_slide_patches, patch_size_px
from .progress import Progress
from .provenance import patch_file_attrs, sample_provenance
from .sample import SampleData, SampleSpec
from .slide_image import drop_spots_outside, open_image
from .staging import Staging, check_import_target
from .thumbnails import write_thumbnail


@dataclass
class Spots:
    """The spots of a sample that get a patch: rows of the sample's tables, ids, centres."""

    idx: np.ndarray
    barcodes: list[str]
    coords: np.ndarray
    bag: list[str] | None = None        # the observation (spot barcode) of each sub-tile patch


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
    overwrite: bool = False,
    pool_spots: int | None = None,
    subtile_um: float | None = None,
) -> dict:
    """Write all samples of ``specs`` with one common gene set; returns the summary dict. The dataset
    folder is written whole: a non-empty ``out_dir`` is refused unless ``overwrite``, which replaces it.
    ``pool_spots`` / ``subtile_um``: write bags (``importers.bags``); sub-tiles set the patch size."""
    t0 = time.perf_counter()
    check_bag_options(pool_spots, subtile_um, output)
    if subtile_um is not None:
        patch_um = float(subtile_um)
    check_options(patch_um, target_um_per_px, normalize, output)
    check_import_target(Path(out_dir), overwrite)
    messages = [] if messages is None else messages
    ids = [s.sample_id for s in specs]
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups:
        raise ImporterError(f"sample id(s) {dups} occur more than once; give distinct sample_ids")
    cfg = ImportSettings(kind=kind, out_dir=Path(out_dir), patch_um=patch_um, target_um_per_px=target_um_per_px,
                         size=patch_size_px(patch_um, target_um_per_px), normalize=normalize,
                         filter_background=filter_background, output=output, max_inmemory_bytes=max_inmemory_bytes,
                         pool_spots=None if pool_spots in (None, 1) else int(pool_spots), subtile_um=subtile_um)
    genes, gene_info = common_genes(specs, messages)
    staging = Staging(cfg.out_dir, output)
    try:
        samples = _import_all(specs, genes, cfg, staging, progress, messages)
        staging.commit()
    except BaseException as exc:
        staging.abort()
        if isinstance(exc, SlideError) and not isinstance(exc, ImporterError):
            raise ImporterError(str(exc)) from exc
        raise
    return _summary(cfg, samples, gene_info, messages, time.perf_counter() - t0)


def _summary(cfg: ImportSettings, samples: dict[str, dict], gene_info: dict, messages: list[str],
             seconds: float) -> dict:
    summary = {
        "kind": cfg.kind,
        "out_dir": str(cfg.out_dir),
        "output": cfg.output,
        "n_samples": len(samples),
        "n_patches": int(sum(s["n_patches"] for s in samples.values())),
        "n_genes": gene_info["n_genes"],
        "n_genes_dropped": gene_info["n_genes_dropped"],
        "genes_dropped_per_sample": gene_info["dropped_per_sample"],
        "patch_um": float(cfg.patch_um),
        "target_um_per_px": float(cfg.target_um_per_px),
        "patch_size_px": cfg.size,
        "normalize": cfg.normalize,
        "filter_background": bool(cfg.filter_background),
        "pool_spots": cfg.pool_spots,
        "subtile_um": cfg.subtile_um,
        "n_observations": int(sum(s.get("n_observations", s["n_patches"]) for s in samples.values())),
        "samples": samples,
        "warnings": list(messages),
        "seconds": round(seconds, 3),
    }
    if cfg.output == "challenge":
        summary["dataset_csv"] = str(cfg.out_dir / "dataset.csv")
    return summary


def _import_all(specs: Sequence[SampleSpec], genes: list[str], cfg: ImportSettings, staging: Staging,
                progress: bool, messages: list[str]) -> dict[str, dict]:
    """Load and write each sample in turn (challenge rows go to one staged dataset.csv)."""
    samples: dict[str, dict] = {}
    csv_fh = tmp_csv = None
    try:
        if cfg.output == "challenge":
            assert staging.stage_dir is not None
            tmp_csv = staging.stage_dir / "dataset.csv"
            csv_fh = open(tmp_csv, "w", newline="")
            write_csv_header(csv_fh, genes)
        with Progress(progress) as prog:
            for spec in specs:
                ts = time.perf_counter()
                data = spec.load()
                res, csv_part = import_sample(data, genes, staging, prog, cfg)
                res["seconds"] = round(time.perf_counter() - ts, 3)
                samples[data.sample_id] = res
                messages.extend(data.warnings)
                if csv_part is not None:
                    write_csv_rows(csv_fh, *csv_part)
    finally:
        if csv_fh is not None:
            csv_fh.close()
    return samples


def import_sample(data: SampleData, genes: list[str], staging: Staging, prog: Progress,
                  cfg: ImportSettings) -> tuple[dict, tuple | None]:
    """Write one sample; returns (its summary, challenge CSV rows or None)."""
    spots, res, image = _select_spots(data, cfg)
    flags = PatchFlags.empty(len(spots.idx))
    sink = None
    try:
        sink = _new_sink(cfg, staging, data.sample_id, spots)
        advance = prog.task(data.sample_id, len(spots.idx))
        thumb = _fill_sink(data, spots, image, sink, flags, staging, advance, cfg, res)
    except BaseException:
        if sink is not None:
            sink.close()
        raise
    finally:
        if image is not None:
            image.close()
    try:
        return _finish_sample(data, genes, spots, flags, sink, thumb, staging, cfg, res)
    except BaseException:
        sink.close()
        raise


def _select_spots(data: SampleData, cfg: ImportSettings) -> tuple[Spots, dict, SlideImage | None]:
    """Spots with a valid centre (inside the slide when there is one), the counts so far, the open slide."""
    sid, msgs = data.sample_id, data.warnings
    n0 = len(data.barcodes)
    coords = np.asarray(data.coords, np.float64).reshape(-1, 2)
    if coords.shape[0] != n0 or data.counts.shape[0] != n0:
        raise ImporterError(f"{sid}: internal mismatch of spots/coords/counts rows")
    keep = np.isfinite(coords).all(axis=1)
    n_nan = int((~keep).sum())
    if n_nan:
        warn(msgs, f"{sid}: {n_nan} spot(s) have no valid pixel coordinate and are skipped")
    res: dict = {"n_spots_matched": n0, "n_no_coords": n_nan, "n_outside_dropped": 0}
    if data.image_path is None:
        image = None
    elif not data.source_um_per_px:
        raise ImporterError(f"{sid}: the slide's µm/px is unknown; pass source_um_per_px=...")
    else:
        image = open_image(data.image_path, msgs, cfg.max_inmemory_bytes)
    try:
        if image is not None:
            keep, res["n_outside_dropped"] = drop_spots_outside(image, coords, keep, sid, data.image_path, msgs)
            res["image_size"] = [int(image.width), int(image.height)]
            res["image_read"] = image.mode
        idx = np.flatnonzero(keep)
        if len(idx) == 0:
            raise ImporterError(f"{sid}: no spot left to cut a patch for")
        spots = Spots(idx, [data.barcodes[i] for i in idx], coords[idx])
        if cfg.subtile_um is not None:
            spots = _subtiles(data, spots, image, cfg)
    except BaseException:
        if image is not None:
            image.close()
        raise
    return spots, res, image


def _subtiles(data: SampleData, spots: Spots, image: SlideImage | None, cfg: ImportSettings) -> Spots:
    """Each spot's footprint as a grid of sub-tile patches (importers.bags), bagged by spot."""
    if image is None:
        raise ImporterError(f"{data.sample_id}: --subtile-um cuts sub-tiles from the whole slide, and this sample "
                            "has only ready patches; put the slide beside it (HEST wsis/)")
    check_subtile_pixels(cfg.subtile_um, data.source_um_per_px, cfg.target_um_per_px, data.sample_id)
    layout = subtile_layout(len(spots.idx), (data.provenance or {}).get("spot_diameter_um"), cfg.subtile_um,
                            data.source_um_per_px, data.sample_id)
    return Spots(spots.idx[layout.spot], [spots.barcodes[s] + suffix for s, suffix in zip(layout.spot, layout.suffixes)],
                 spots.coords[layout.spot] + layout.offsets, bag=[spots.barcodes[s] for s in layout.spot])


def _bag_labels(data: SampleData, spots: Spots, cfg: ImportSettings) -> list[str] | None:
    """The observation of every patch (None: each patch is its own spot)."""
    if spots.bag is not None:
        return spots.bag
    if cfg.pool_spots is None:
        return None
    obs = None if data.obs is None else data.obs.iloc[spots.idx].reset_index(drop=True)
    return pool_labels(obs, cfg.pool_spots, data.sample_id)


def _new_sink(cfg: ImportSettings, staging: Staging, sid: str, spots: Spots) -> Any:
    if cfg.output == "hest":
        return H5PatchSink(staging.temp_file(patch_file_path(cfg.out_dir, sid)), len(spots.idx), cfg.size)
    return PNGSink(staging.sample_dir(sid), spots.barcodes)


def _fill_sink(data: SampleData, spots: Spots, image: SlideImage | None, sink: Any, flags: PatchFlags,
               staging: Staging, advance: Callable[[int], None], cfg: ImportSettings, res: dict) -> dict:
    """Cut (or copy) every spot's patch into ``sink``; returns the thumbnail record ({} without a slide)."""
    if image is None:
        copy_ready_patches(data, spots.idx, sink, flags, cfg.size, cfg.patch_um, cfg.target_um_per_px,
                           cfg.filter_background, advance)
        return {}
    thumb = write_thumbnail(image, data.sample_id, staging, cfg.out_dir)
    res.update(thumbnail=str(cfg.out_dir / thumb["thumbnail"]), thumbnail_scale=thumb["thumbnail_scale"])
    side_src = cfg.patch_um / data.source_um_per_px
    cut_slide_patches(image, spots.coords, side_src, cfg.size, sink, flags, cfg.filter_background, advance)
    res["tiles_decoded"] = getattr(image, "tiles_decoded", None)
    return thumb


def _report_dropped(sid: str, flags: PatchFlags, msgs: list[str]) -> tuple[int, int]:
    """(background patches dropped, kept patches padded beyond the slide edge), warned with counts."""
    n_bg = int((~flags.kept).sum())
    if n_bg:
        warn(msgs, f"{sid}: {n_bg} background patch(es) (near-white fraction > "
                   f"{BACKGROUND_MAX_WHITE_FRACTION}) dropped")
    n_pad = int(flags.padded[flags.kept].sum())
    if n_pad:
        warn(msgs, f"{sid}: {n_pad} patch(es) reach beyond the image edge and were padded with white")
    if not flags.kept.any():
        raise ImporterError(f"{sid}: every patch was dropped as background; check the image or "
                            f"import with filter_background=False")
    return n_bg, n_pad


def _finish_sample(data: SampleData, genes: list[str], spots: Spots, flags: PatchFlags, sink: Any, thumb: dict,
                   staging: Staging, cfg: ImportSettings, res: dict) -> tuple[dict, tuple | None]:
    sid, msgs = data.sample_id, data.warnings
    n_bg, n_pad = _report_dropped(sid, flags, msgs)
    kidx = np.flatnonzero(flags.kept)
    rows = spots.idx[kidx]
    labels = _bag_labels(data, spots, cfg)
    obs_coords, obs_barcodes, bag_info = spots.coords[kidx], [spots.barcodes[i] for i in kidx], None
    if labels is None:
        counts = sp.csr_matrix(data.counts[rows])
        obs_extra = data.obs.iloc[rows] if data.obs is not None else None
    else:  # one row per observation: the raw counts of its spots summed (a spot's sub-tiles count it once)
        obs_barcodes, member = observations([labels[i] for i in kidx], rows)
        counts = sp.csr_matrix(member @ sp.csr_matrix(data.counts[:member.shape[1]]))
        n_spots = np.asarray(member.sum(axis=1)).ravel()
        obs_coords = np.asarray(member @ np.asarray(data.coords, np.float64)[:member.shape[1]]) / n_spots[:, None]
        obs_extra = pd.DataFrame({"n_spots": n_spots.astype(np.int64),
                                  "n_subtiles": pd.Series([labels[i] for i in kidx]).value_counts()
                                  .reindex(obs_barcodes).to_numpy(np.int64)})
        bag_info = {"bag": labels, "subtile_um": float(cfg.patch_um),
                    "bag_kind": f"pool {cfg.pool_spots}x{cfg.pool_spots} spots" if cfg.pool_spots else
                    f"spot footprint in {cfg.subtile_um:g} µm sub-tiles"}
    X, counts_sub, norm_details = normalize_counts(counts, gene_columns(data.genes, genes), cfg.normalize, msgs, sid)
    csv_part = None
    if cfg.output == "hest":
        tallies = {"n_background_dropped": n_bg, "n_padded": n_pad, "n_outside_dropped": res["n_outside_dropped"]}
        if bag_info is not None:
            tallies.update(bag_kind=bag_info["bag_kind"], subtile_um=bag_info["subtile_um"])
        prov = sample_provenance(data, cfg, norm_details=norm_details, n_genes=len(genes), counts=tallies, thumb=thumb)
        attrs = patch_file_attrs(data, cfg.patch_um, cfg.size, thumb)
        if bag_info is not None:
            attrs.update(subtile_um=bag_info["subtile_um"], bag_kind=bag_info["bag_kind"])
        sink.finish(flags.kept, spots.barcodes, spots.coords, attrs, bags=None if bag_info is None else bag_info["bag"])
        obs = spot_table(sid, obs_barcodes, obs_extra)
        h5ad_final = expression_file_path(cfg.out_dir, sid)
        write_h5ad(staging.temp_file(h5ad_final), X, counts_sub, obs, genes, obs_coords, prov)
        res["files"] = {"patches": str(patch_file_path(cfg.out_dir, sid)), "st": str(h5ad_final)}
    else:
        for i in np.flatnonzero(~flags.kept):
            sink.drop(i)
        files = [sink.files[i] for i in kidx]
        csv_part = (csv_leading_fields(sid, [spots.barcodes[i] for i in kidx], files, spots.coords[kidx]), X)
        res["files"] = {"dir": str(cfg.out_dir / sid)}
    res.update({
        "n_patches": int(len(kidx)),
        "n_observations": int(len(obs_barcodes)),
        "n_background_dropped": n_bg,
        "n_padded": n_pad,
        "source_um_per_px": float(data.source_um_per_px) if data.source_um_per_px else None,
        "scale": data.scale_info,
        "patch_size_px": cfg.size,
        "n_genes_sample": len(data.genes),
        "warnings": list(msgs),
    })
    return res, csv_part
