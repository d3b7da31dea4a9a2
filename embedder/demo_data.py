"""Synthetic H&E-like demo dataset in the challenge layout.

``write_demo_dataset(out_dir)`` writes::

    out_dir/train/<ID>.png        RGB uint8 patches
    out_dir/train.csv             ID, path, group, <gene columns...>
    out_dir/test/<ID>.png
    out_dir/test.csv              ID, path
    out_dir/test_truth.csv        ID, <gene columns...>   (held-out truth for ``hexpr evaluate``)
    out_dir/sample_submission.csv ID, <gene columns...>   (zeros; defines output columns/order)

``path`` is relative to the CSV's folder (``out_dir``), with forward slashes.

Generative model
----------------
Spots live on ``n_groups`` "slides" (jittered grids in the unit square).  Each spot has
six latent factors: a smooth spatial Gaussian-process-like field (random Fourier features)
plus an i.i.d. part plus a per-slide offset (a biological batch effect).  Five factors are
visible in the image, one is hidden (affects expression only, so the task is not trivial):

  z0 cellularity      -> number of tumour-like nuclei (clustered in "nests")
  z1 atypia           -> nuclear size, hematoxylin intensity of tumour nuclei
  z2 stroma           -> eosin intensity and amplitude of fibre texture
  z3 immune           -> number of small, round, very dark lymphocyte nuclei
  z4 empty space      -> fraction of white (fat / lumen) area; also lowers library size
  z5 hidden           -> expression only

Images are composed in optical-density space (Beer-Lambert) with Macenko-style reference
stain vectors, so nuclei are purple and stroma is pink.  Per-slide technical nuisance
(stain vector drift, stain strength, blur) is added on top and does *not* affect
expression.  Expression of gene g at spot i is::

    mu = lib_i * exp(b_g + W_g . z_i + slide_g)         (low-rank, non-negative)
    counts ~ NegativeBinomial(mean=mu, dispersion)       (gamma-Poisson)
    value = log1p(counts)

with a handful of highly expressed genes (large b_g) and some highly variable ones (large
loadings); ~10% of genes carry no signal at all.

Everything is drawn from ``numpy.random.default_rng`` seeded from ``seed`` (the image of
spot k from ``default_rng([seed, 1, k])``), so the output is byte-identical across runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from hexpr.embedder.datasets import DatasetError
from hexpr.embedder.errors import OutputExistsError
from hexpr.embedder.files import atomic_dir

__all__ = ["write_demo_dataset", "N_LATENT", "VISIBLE_LATENT"]

N_LATENT = 6  # latent factors per spot (z0..z5)
VISIBLE_LATENT = 5  # z0..z4 drive the image, z5 is hidden

# Macenko-style reference stain vectors (optical density per unit concentration, R, G, B).
_H_REF = np.array([0.5626, 0.7201, 0.4062])
_E_REF = np.array([0.2159, 0.8012, 0.5581])
_I0 = 245.0  # background light intensity (slides are never pure white)
_N_POLY = 14  # vertices per nucleus polygon


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _unit(v):
    return v / np.linalg.norm(v)


# --------------------------------------------------------------------------- latent model


def _spot_layout(rng, n_total, n_groups):
    """Split spots across slides; positions on a jittered grid per slide."""
    base = np.full(n_groups, n_total // n_groups)
    base[: n_total % n_groups] += 1
    group = np.repeat(np.arange(n_groups), base)
    pos = np.empty((n_total, 2))
    start = 0
    for n in base:
        side = int(np.ceil(np.sqrt(n)))
        cells = rng.permutation(side * side)[:n]
        xy = np.stack([cells % side, cells // side], axis=1).astype(float)
        xy = (xy + 0.5 + rng.uniform(-0.3, 0.3, size=xy.shape)) / side
        pos[start : start + n] = xy
        start += n
    return group, pos


def _latent_factors(rng, group, pos, n_groups, lengthscale=0.25, n_features=32):
    """(N, N_LATENT) factors: smooth spatial field + iid noise + slide offsets."""
    n = len(group)
    z = np.empty((n, N_LATENT))
    for k in range(N_LATENT):
        # random Fourier features -> stationary GP with RBF kernel, independent per slide
        field = np.zeros(n)
        for g in range(n_groups):
            m = group == g
            w = rng.normal(0.0, 1.0 / lengthscale, size=(n_features, 2))
            b = rng.uniform(0.0, 2 * np.pi, size=n_features)
            field[m] = np.sqrt(2.0 / n_features) * np.cos(pos[m] @ w.T + b).sum(axis=1)
        iid = rng.standard_normal(n)
        offsets = rng.normal(0.0, 0.5, size=n_groups)
        z[:, k] = np.sqrt(0.75) * field + np.sqrt(0.25) * iid + offsets[group]
    return z


def _expression(rng, z, group, n_genes, n_groups):
    """Counts-like, non-negative expression (N, G) = log1p(NB draws)."""
    n, k = z.shape
    # baseline log-means: most genes lowly expressed, a few very high
    b = rng.normal(1.0, 0.9, size=n_genes)
    n_high = max(1, n_genes // 25)
    high = rng.choice(n_genes, size=n_high, replace=False)
    b[high] = rng.uniform(4.0, 6.0, size=n_high)  # means of ~50-400 counts
    # sparse low-rank loadings: each gene driven by 1-2 factors, plus weak dense part
    W = rng.normal(0.0, 0.08, size=(n_genes, k))
    n_main = rng.integers(1, 3, size=n_genes)
    for g in range(n_genes):
        fac = rng.choice(k, size=n_main[g], replace=False)
        W[g, fac] += rng.normal(0.0, 0.55, size=n_main[g])
    # highly variable genes: much stronger loadings
    hv = rng.choice(n_genes, size=max(1, n_genes // 8), replace=False)
    W[hv] *= 2.0
    # genes with no signal at all
    null = rng.choice(n_genes, size=n_genes // 10, replace=False)
    W[null] = 0.0
    slide = rng.normal(0.0, 0.15, size=(n_groups, n_genes))
    # library size: lower where there is empty space (z4)
    lib = np.exp(rng.normal(0.0, 0.2, size=n) - 0.25 * z[:, 4])
    log_mu = np.log(lib)[:, None] + b[None, :] + z @ W.T + slide[group]
    mu = np.exp(np.clip(log_mu, -10, 9))
    theta = 6.0  # NB size; dispersion 1/theta
    lam = rng.gamma(theta, mu / theta)
    counts = rng.poisson(lam)
    return np.log1p(counts)


# --------------------------------------------------------------------------- image drawing


class _Canvas:
    """Precomputed per-size helpers (coordinate grids, smoothing basis)."""

    def __init__(self, size):
        self.size = size
        self.s = size / 224.0
        ax = np.arange(size, dtype=np.float64)
        self.yy, self.xx = np.meshgrid(ax, ax, indexing="ij")
        self.bases = {}
        t = np.linspace(0.0, 2 * np.pi, _N_POLY, endpoint=False)
        self.cos_t, self.sin_t = np.cos(t), np.sin(t)

    def smooth_field(self, rng, n_ctrl=5):
        """Smooth random field (size, size), roughly unit variance, via an RBF basis."""
        if n_ctrl not in self.bases:
            c = np.linspace(-0.1, 1.1, n_ctrl) * (self.size - 1)
            sd = self.size / (n_ctrl - 1) * 0.7
            B = np.exp(-0.5 * ((np.arange(self.size)[:, None] - c[None, :]) / sd) ** 2)
            B /= np.sqrt((B**2).sum(axis=1, keepdims=True))
            self.bases[n_ctrl] = B
        B = self.bases[n_ctrl]
        return B @ rng.standard_normal((n_ctrl, n_ctrl)) @ B.T


def _draw_nuclei(canvas, mask_draw, rng, n, radius, aspect, intensity, accept):
    """Draw up to n nuclei as filled rotated-ellipse polygons; accept(x, y) -> prob."""
    if n <= 0:
        return
    size = canvas.size
    x = rng.uniform(-2, size + 2, size=n)
    y = rng.uniform(-2, size + 2, size=n)
    u = rng.uniform(size=n)
    r = radius * np.exp(rng.normal(0.0, 0.15, size=n))
    asp = 1.0 + aspect * rng.uniform(0.0, 1.0, size=n)
    rot = rng.uniform(0.0, np.pi, size=n)
    val = np.clip(intensity * np.exp(rng.normal(0.0, 0.1, size=n)), 0, 255)
    xi = np.clip(x.astype(int), 0, size - 1)
    yi = np.clip(y.astype(int), 0, size - 1)
    keep = u < accept[yi, xi]
    if not keep.any():
        return
    x, y, r, asp, rot, val = x[keep], y[keep], r[keep], asp[keep], rot[keep], val[keep]
    ex = (r * asp)[:, None] * canvas.cos_t[None, :]
    ey = (r / np.sqrt(asp))[:, None] * canvas.sin_t[None, :]
    c, s_ = np.cos(rot)[:, None], np.sin(rot)[:, None]
    px = x[:, None] + c * ex - s_ * ey
    py = y[:, None] + s_ * ex + c * ey
    pts = np.stack([px, py], axis=2).reshape(len(x), -1)
    fills = val.round().astype(int).tolist()
    for i, p in enumerate(pts.tolist()):
        mask_draw.polygon(p, fill=fills[i])


def _render_patch(canvas, z, batch, rng):
    """One RGB uint8 patch for latent vector z (visible part) and slide nuisance `batch`."""
    size, s = canvas.size, canvas.s
    area = (size / 224.0) ** 2

    # ---- empty (white) space: fat / lumen
    f_empty = canvas.smooth_field(rng, 4)
    empty_thr = 1.3 - 0.55 * z[4]
    empty = _sigmoid((f_empty - empty_thr) * 20.0)
    tissue = 1.0 - empty

    # ---- tumour nests and nuclei
    f_nest = canvas.smooth_field(rng, 6)
    nest = _sigmoid(4.0 * (f_nest + 0.4 * z[0] - 0.3))
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    n_tumour = rng.poisson(110.0 * area * np.exp(0.55 * z[0]))
    _draw_nuclei(
        canvas,
        draw,
        rng,
        int(n_tumour * 1.6),
        radius=4.2 * s * np.exp(0.14 * z[1]),
        aspect=0.6,
        intensity=150.0 * np.exp(0.08 * z[1]),
        accept=nest * tissue,
    )
    # stromal fibroblast nuclei: thin, elongated, sparse
    _draw_nuclei(
        canvas,
        draw,
        rng,
        rng.poisson(14.0 * area),
        radius=2.6 * s,
        aspect=2.0,
        intensity=160.0,
        accept=(1.0 - nest) * tissue,
    )
    # lymphocytes: small, round, very dark, loosely clustered
    f_imm = canvas.smooth_field(rng, 5)
    n_imm = rng.poisson(35.0 * area * np.exp(0.8 * z[3] - 0.3))
    _draw_nuclei(
        canvas,
        draw,
        rng,
        int(n_imm * 1.8),
        radius=2.6 * s,
        aspect=0.1,
        intensity=225.0,
        accept=_sigmoid(1.5 * f_imm + 0.5) * tissue,
    )
    mask = mask.filter(ImageFilter.GaussianBlur(0.7 * s))
    nuc = np.asarray(mask, dtype=np.float64) / 255.0
    # chromatin texture
    nuc *= 1.0 + 0.18 * rng.standard_normal((size, size))

    # ---- eosin: stroma fibres + pale cytoplasm in nests
    theta = rng.uniform(0.0, np.pi)
    period = 9.0 * s * np.exp(rng.normal(0.0, 0.2))
    warp = 4.0 * canvas.smooth_field(rng, 6) + 1.5 * canvas.smooth_field(rng, 11)
    phase = 2 * np.pi * (canvas.xx * np.cos(theta) + canvas.yy * np.sin(theta)) / period
    fibre = (0.5 + 0.5 * np.sin(phase + warp)) ** 3
    fibre *= _sigmoid(2.0 * canvas.smooth_field(rng, 7) + 1.0)
    amp = _sigmoid(1.2 * z[2])
    e_stroma = 0.75 * np.exp(0.18 * z[2]) * (0.55 + 0.9 * amp * fibre)
    e_nest = 0.45 * np.exp(0.05 * z[1])
    E = tissue * (nest * e_nest + (1.0 - nest) * e_stroma)
    E *= 1.0 + 0.08 * canvas.smooth_field(rng, 9)
    H = 1.9 * nuc + tissue * (0.05 + 0.18 * nest)

    # ---- compose in optical density with slide-specific stains
    od = batch["strength"] * (H[..., None] * batch["h_vec"] + E[..., None] * batch["e_vec"])
    rgb = _I0 * np.exp(-od)
    rgb += rng.normal(0.0, 2.0, size=rgb.shape)
    img = Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8), "RGB")
    blur = float(batch["blur"] * s * np.exp(rng.normal(0.0, 0.2)))
    if blur > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    return img


def _slide_batches(rng, n_groups):
    """Technical (non-biological) per-slide stain/focus nuisance."""
    out = []
    for _ in range(n_groups):
        out.append(
            {
                "h_vec": _unit(_H_REF + rng.normal(0.0, 0.04, size=3)),
                "e_vec": _unit(_E_REF + rng.normal(0.0, 0.04, size=3)),
                "strength": float(np.exp(rng.normal(0.0, 0.1))),
                "blur": float(rng.uniform(0.3, 0.9)),
            }
        )
    return out


# --------------------------------------------------------------------------- public API


def write_demo_dataset(
    out_dir,
    n_train: int = 600,
    n_test: int = 200,
    n_genes: int = 200,
    size: int = 224,
    seed: int = 0,
    n_groups: int = 3,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic H&E + expression dataset in the challenge layout.

    Returns a dict of the paths written (final locations): ``root``, ``train_csv``,
    ``test_csv``, ``test_truth_csv``, ``sample_submission_csv``, ``train_dir``,
    ``test_dir``.  Build happens in a temporary folder beside ``out_dir`` that is renamed
    at the end; a non-empty ``out_dir`` is refused unless ``overwrite=True``.
    Example::

        >>> hexpr.write_demo_dataset("demo", n_train=40, n_test=10, n_genes=20, size=32)
        # -> demo/train.csv, test.csv, test_truth.csv, sample_submission.csv and PNG patches
    """
    for name, v, lo in (
        ("n_train", n_train, 4),
        ("n_test", n_test, 1),
        ("n_genes", n_genes, 2),
        ("size", size, 16),
        ("n_groups", n_groups, 1),
        ("seed", seed, 0),
    ):
        if isinstance(v, bool) or int(v) != v or v < lo:
            raise DatasetError(f"demo data: {name} (--{name.replace('_', '-')}) must be an integer >= {lo}, got {v!r}")
    if n_groups > n_train:
        raise DatasetError(f"demo data: n_groups ({n_groups}) must not exceed n_train ({n_train})")
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise OutputExistsError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            raise OutputExistsError(
                f"{out_dir} is not empty; pass --overwrite (overwrite=True) to replace it, or pick another folder"
            )
    with atomic_dir(out_dir) as tmp:  # built beside out_dir, swapped in when complete
        _build(tmp, n_train, n_test, n_genes, size, seed, n_groups)

    return {
        "root": out_dir,
        "train_csv": out_dir / "train.csv",
        "test_csv": out_dir / "test.csv",
        "test_truth_csv": out_dir / "test_truth.csv",
        "sample_submission_csv": out_dir / "sample_submission.csv",
        "train_dir": out_dir / "train",
        "test_dir": out_dir / "test",
    }


def _build(root: Path, n_train, n_test, n_genes, size, seed, n_groups):
    rng = np.random.default_rng([seed, 0])
    n_total = n_train + n_test
    group, pos = _spot_layout(rng, n_total, n_groups)
    z = _latent_factors(rng, group, pos, n_groups)
    expr = _expression(rng, z, group, n_genes, n_groups)
    batches = _slide_batches(rng, n_groups)

    # random train/test split across slides; every slide keeps >= 1 training spot
    reserved = np.array([rng.choice(np.flatnonzero(group == g)) for g in range(n_groups)])
    pool = np.setdiff1d(np.arange(n_total), reserved)
    is_test = np.zeros(n_total, dtype=bool)
    is_test[rng.choice(pool, size=n_test, replace=False)] = True
    train_idx = np.flatnonzero(~is_test)
    test_idx = rng.permutation(np.flatnonzero(is_test))

    width = max(3, len(str(n_genes)))
    genes = [f"GENE{g + 1:0{width}d}" for g in range(n_genes)]
    train_ids = [f"TR{i + 1:05d}" for i in range(len(train_idx))]
    test_ids = [f"TE{i + 1:05d}" for i in range(len(test_idx))]
    group_names = [f"slide{g + 1}" for g in range(n_groups)]

    canvas = _Canvas(size)
    for sub, ids, idx in (("train", train_ids, train_idx), ("test", test_ids, test_idx)):
        (root / sub).mkdir()
        for sid, k in zip(ids, idx):
            img = _render_patch(
                canvas, z[k], batches[group[k]], np.random.default_rng([seed, 1, int(k)])
            )
            img.save(root / sub / f"{sid}.png", compress_level=1)

    fmt = "%.6g"
    train = pd.DataFrame({"ID": train_ids, "path": [f"train/{i}.png" for i in train_ids]})
    train["group"] = [group_names[g] for g in group[train_idx]]
    train = pd.concat([train, pd.DataFrame(expr[train_idx], columns=genes)], axis=1)
    train.to_csv(root / "train.csv", index=False, float_format=fmt)

    pd.DataFrame({"ID": test_ids, "path": [f"test/{i}.png" for i in test_ids]}).to_csv(
        root / "test.csv", index=False
    )
    truth = pd.concat(
        [pd.DataFrame({"ID": test_ids}), pd.DataFrame(expr[test_idx], columns=genes)], axis=1
    )
    truth.to_csv(root / "test_truth.csv", index=False, float_format=fmt)
    zeros = pd.DataFrame(0.0, index=range(len(test_ids)), columns=genes)
    sub_df = pd.concat([pd.DataFrame({"ID": test_ids}), zeros], axis=1)
    sub_df.to_csv(root / "sample_submission.csv", index=False, float_format=fmt)
