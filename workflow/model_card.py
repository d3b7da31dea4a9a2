"""The model card: ``README.md`` with Hugging Face model-card YAML front matter, written at fit time.

``card_facts(...)`` gathers what a user of a shared model needs (what goes in, what comes out and in
which units, what it was trained on, how well it scored, how to run it); ``render_card(facts)``
writes it as the hub shows it. The front matter holds ``library_name: hexpr``, an empty ``license``
(the owner's choice), tags and the CV metrics (``model-index``). ``units_of(dataset)`` reads the
expression units an importer recorded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from hexpr.embedder.files import atomic_write
from hexpr.heads.metrics import pearson_per_gene
from hexpr.heads.model_files import hexpr_version
from hexpr.heads.uncertainty import CONFORMAL_KEY, RANGE_KEY

CARD_FILE = "README.md"
N_TOP_GENES = 10
UNITS = {"log1p_cp10k": "log1p(counts per 10,000), per spot", "none": "the imported values, not normalised"}
UNKNOWN_UNITS = "the training targets' own scale (not recorded by the data)"
TILE_DEFAULT = "not recorded (predict-slide uses 112 µm at 0.5 µm/px unless told)"


def _import_records(dataset) -> list[dict]:
    """``uns['hexpr_import']`` of the expression files ``hexpr import`` wrote beside the dataset (may be empty)."""
    source = Path(dataset.source)
    folder = source if source.is_dir() else source.parent
    records = []
    for path in sorted([*folder.glob("*.h5ad"), *folder.glob("*/*.h5ad")])[:64]:   # hexpr import: st/<sample>.h5ad
        try:
            import h5py

            with h5py.File(path, "r") as f:
                group = f.get("uns/hexpr_import")
                if group is None:
                    continue
                records.append({key: _text(group[key][()]) for key in ("normalization", "technology") if key in group})
        except (OSError, KeyError, TypeError, ValueError):
            continue
    return records


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def units_of(dataset) -> dict:
    """{"units", "normalization", "platforms"} of a dataset's expression, from its import records."""
    records = _import_records(dataset)
    norms = sorted({r["normalization"] for r in records if r.get("normalization")})
    platforms = sorted({r["technology"] for r in records if r.get("technology")})
    units = UNITS.get(norms[0], norms[0]) if len(norms) == 1 else UNKNOWN_UNITS
    return {"units": units, "normalization": norms[0] if len(norms) == 1 else None, "platforms": platforms}


def top_gene_scores(oof: np.ndarray, truth: np.ndarray, genes: list[str], n: int = N_TOP_GENES) -> list[dict]:
    """The ``n`` genes with the highest out-of-fold Pearson r (spots never predicted are skipped)."""
    held = ~np.isnan(oof).any(axis=1)
    r = np.nan_to_num(pearson_per_gene(oof[held], truth[held]), nan=-1.0)
    order = np.argsort(-r, kind="stable")[:n]
    return [{"gene": genes[i], "r": round(float(r[i]), 4)} for i in order]


def _backbones(meta: dict) -> list[dict]:
    """Each backbone's preset, its weights identity and the sha256 of the weights file the features came from."""
    n = len(meta.get("backbones", []))
    identities = meta.get("identities") or [None] * n
    checksums = meta.get("weights_sha256") or [""] * n
    return [{"preset": spec.get("preset") or spec.get("name"), "spec": spec.get("name"),
             "weights": identity.get("weights", "not recorded") if isinstance(identity, dict) else "not recorded",
             "sha256": checksum or "not recorded"}
            for spec, identity, checksum in zip(meta.get("backbones", []), identities, checksums)]


def card_facts(model, *, name: str, training: list[dict] | None = None, cv_scheme: str | None = None,
               top_genes: list[dict] | None = None, units: str | None = None) -> dict:
    """What the card says about a ``FittedModel`` (or a fine-tuned model, which records less)."""
    meta = getattr(model, "feature_meta", None) or {"backbones": [s.to_dict() for s in getattr(model, "specs", [])],
                                                   "patch": getattr(model, "info", {}).get("patch")}
    extra = getattr(model, "extra", None) or {}
    config = getattr(model, "config", None) or {"head": "finetuned", "transform": getattr(model.transform, "name", "none")}
    value_range, calibration = extra.get(RANGE_KEY), extra.get(CONFORMAL_KEY)
    patch = meta.get("patch") or {}
    return {
        "name": name, "head": config.get("head"), "params": config.get("params", {}), "transform": config.get("transform"),
        "genes": list(model.genes), "units": units or extra.get("units") or UNKNOWN_UNITS,
        "backbones": _backbones(meta), "tta": bool(meta.get("tta")), "neighbours": int(meta.get("neighbours", 0) or 0),
        "slide_centred": bool(meta.get("slide_centred")),
        "tile": {"um": patch.get("patch_um"), "px": patch.get("patch_px"), "um_per_px": patch.get("um_per_px")},
        "clip": None if value_range is None else {"min": float(np.min(value_range["min"])), "max": float(np.max(value_range["max"]))},
        "training": training or extra.get("training") or [],
        "cv": getattr(model, "cv", None) or {}, "cv_scheme": cv_scheme or extra.get("cv_scheme") or "not recorded",
        "top_genes": top_genes or extra.get("top_genes") or [],
        "calibration": None if calibration is None else {"levels": list(calibration["levels"]),
                                                         "n_calibration": calibration.get("n_calibration"),
                                                         "score": calibration.get("score")},
        "hexpr_version": hexpr_version(),
    }


def _front_matter(f: dict) -> dict:
    cv = f["cv"]
    metrics = [{"type": "pearsonr", "name": "CV mean Pearson r, all genes", "value": round(float(cv[k]), 4)}
               for k in ("pearson_all_genes",) if cv.get(k) is not None]
    metrics += [{"type": "hest-challenge-score", "name": "CV challenge score", "value": round(float(cv["score"]), 4)}
                for _ in [0] if cv.get("score") is not None]
    datasets = ", ".join(t["name"] for t in f["training"]) or "training data"
    tags = ["hexpr", "histology", "H&E", "spatial-transcriptomics", "gene-expression", f"head-{f['head']}",
            *[b["preset"] for b in f["backbones"] if b["preset"]]]
    front = {"library_name": "hexpr", "license": "", "tags": list(dict.fromkeys(tags)),
             "metrics": ["pearsonr"] if metrics else []}
    if metrics:
        front["model-index"] = [{"name": f["name"], "results": [{
            "task": {"type": "spatial-gene-expression", "name": "gene expression from H&E patches"},
            "dataset": {"name": datasets, "type": "spatial-transcriptomics"}, "metrics": metrics}]}]
    return front


def render_card(f: dict, model_ref: str = "MODEL") -> str:
    """The card as Markdown with YAML front matter."""
    tile = f["tile"]
    tile_text = (f"{tile['um']:g} µm at {tile['um_per_px']:g} µm/px ({tile['px']} px)" if tile.get("um") and tile.get("um_per_px")
                 else TILE_DEFAULT)
    lines = ["---", yaml.safe_dump(_front_matter(f), sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {f['name']}", "",
             f"A hexpr `{f['head']}` head: it predicts the expression of {len(f['genes'])} genes from H&E image "
             "patches embedded by the backbone(s) below.", "",
             "## Use it", "", "```bash", "pip install hexpr",
             f"hexpr predict-slide {model_ref} SLIDE.svs --out maps",
             f"hexpr predict {model_ref} patches.csv --out predictions.h5ad", "```", "",
             "`license` in the front matter is left empty: the model's owner chooses it before sharing.", "",
             "## Inputs", ""]
    for b in f["backbones"]:
        lines.append(f"- backbone `{b['spec']}` (preset `{b['preset']}`), weights `{b['weights']}`, "
                     f"weights file sha256 `{b['sha256']}`")
    lines += [f"- tile: {tile_text}", f"- test-time augmentation: {'yes' if f['tta'] else 'no'}; "
              f"neighbour context: {f['neighbours'] or 'none'}; slide centring: "
              f"{'yes (each slide minus its mean embedding; give all of a slide in one call)' if f.get('slide_centred') else 'no'}", "",
              "## Outputs", "",
              f"- {len(f['genes'])} genes: {', '.join(f['genes'][:20])}{' ...' if len(f['genes']) > 20 else ''} "
              "(all of them in `model.json`)",
              f"- units: {f['units']}; target transform during training: `{f['transform']}` (predictions are mapped "
              "back to the units)",
              f"- clipped to each gene's training range (overall {f['clip']['min']:.4g} to {f['clip']['max']:.4g})"
              if f["clip"] else "- not clipped (no training range recorded)",
              f"- calibration (split-conformal intervals): "
              f"{'levels ' + ', '.join(f'{v:g}' for v in f['calibration']['levels']) + ' from ' + str(f['calibration']['n_calibration']) + ' out-of-fold spots' if f['calibration'] else 'none'}",
              "", "## Training data", ""]
    for t in f["training"]:
        lines.append(f"- {t.get('name')}: {t.get('n_spots')} spots, {t.get('n_slides') or 'unknown number of'} slide(s), "
                     f"platform {', '.join(t.get('platforms') or []) or 'not recorded'}")
    if not f["training"]:
        lines.append("- not recorded")
    cv = f["cv"]
    lines += ["", "## Cross-validation", "", f"- scheme: {f['cv_scheme']}"]
    for key, label in (("score", "challenge score"), ("pearson_all_genes", "mean Pearson r, all genes"),
                       ("pearson_hvg", "mean Pearson r, top variable genes")):
        if cv.get(key) is not None:
            lines.append(f"- {label}: {float(cv[key]):.4f}")
    if f["top_genes"]:
        lines += ["", f"Best-predicted genes (out-of-fold Pearson r, top {len(f['top_genes'])}):", "",
                  "| gene | r |", "|---|---|", *[f"| {g['gene']} | {g['r']:.3f} |" for g in f["top_genes"]]]
    lines += ["", "## Files", "",
              "`config.json` (schema-versioned model config) and `model.safetensors` (arrays) hold the model; "
              "nothing in them runs code when loaded. `model.json` lists the genes and features.", "",
              f"Written by hexpr {f['hexpr_version']}.", ""]
    return "\n".join(lines)


def write_card(folder, facts: dict, model_ref: str | None = None) -> Path:
    folder = Path(folder)
    text = render_card(facts, model_ref or str(folder))
    return atomic_write(folder / CARD_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def retarget_card(text: str, model_ref: str) -> str:
    """The card with its ``hexpr predict...`` lines pointing at ``model_ref`` (e.g. the hub id it is exported for)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        parts = line.split(" ")
        if len(parts) > 2 and parts[0] == "hexpr" and parts[1] in ("predict", "predict-slide"):
            lines[i] = " ".join([parts[0], parts[1], model_ref, *parts[3:]])
    return "\n".join(lines) + "\n"


def write_card_for(folder, model, name: str, model_ref: str | None = None) -> Path:
    """A card from what the model itself records (conversion, export)."""
    return write_card(folder, card_facts(model, name=name), model_ref)
