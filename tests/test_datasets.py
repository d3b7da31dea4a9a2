"""Data layer: both dataset forms, image modes, and a clear error for each kind of bad input."""
import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import write_challenge_dataset
from PIL import Image

from hexpr.embedder.datasets import DatasetError, DatasetWarning, open_dataset
from hexpr.embedder.images import read_image_file


def test_challenge_csv_reads_ids_targets_groups(tmp_path):
    csv = write_challenge_dataset(tmp_path, n=6, n_genes=3, groups=2)
    ds = open_dataset(csv)
    assert ds.ids == [f"spot{i}" for i in range(6)]
    assert list(ds.targets.columns) == ["G0", "G1", "G2"]
    assert list(ds.targets.index) == ds.ids
    assert set(ds.groups) == {"slide0", "slide1"}
    image = ds.read_image(3)
    assert image.shape == (40, 40, 3) and image.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_any_image_mode_becomes_rgb_uint8(tmp_path, mode):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((rng.random((9, 7)) * 65535).astype(np.uint16))
    else:
        img = base.convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    arr = read_image_file(path)
    assert arr.shape == (9, 7, 3) and arr.dtype == np.uint8


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    img = np.full((4, 4), 65535, dtype=np.uint16)
    Image.fromarray(img).save(tmp_path / "w.png")
    assert read_image_file(tmp_path / "w.png").min() == 255
    img[:] = 32768
    Image.fromarray(img).save(tmp_path / "g.png")
    assert 126 <= read_image_file(tmp_path / "g.png").mean() <= 129


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((3, 3, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert (read_image_file(tmp_path / "t.png") == 255).all()


def _rewrite(csv, edit):
    frame = pd.read_csv(csv)
    frame = edit(frame)
    frame.to_csv(csv, index=False)
    return csv


def test_missing_image_names_file_and_line(tmp_path):
    csv = write_challenge_dataset(tmp_path)
    (tmp_path / "img" / "spot4.png").unlink()
    with pytest.raises(DatasetError, match=r"line 6.*spot4\.png"):
        open_dataset(csv)


def test_duplicate_ids(tmp_path):
    csv = _rewrite(write_challenge_dataset(tmp_path), lambda f: f.assign(ID=["a", "b"] + ["a"] + [f"x{i}" for i in range(len(f) - 3)]))
    with pytest.raises(DatasetError, match=r"duplicate ID.*'a'.*lines 2, 4"):
        open_dataset(csv)


def test_non_numeric_target(tmp_path):
    def edit(f):
        f["G1"] = f["G1"].astype(object)
        f.loc[2, "G1"] = "high"
        return f
    with pytest.raises(DatasetError, match=r"line 4, column 'G1'.*'high'"):
        open_dataset(_rewrite(write_challenge_dataset(tmp_path), edit))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_targets(tmp_path, bad):
    def edit(f):
        f.loc[5, "G2"] = bad
        return f
    with pytest.raises(DatasetError, match=r"line 7, column 'G2'.*(missing|infinite)"):
        open_dataset(_rewrite(write_challenge_dataset(tmp_path), edit))


def test_empty_dataset(tmp_path):
    (tmp_path / "e.csv").write_text("ID,path,G0\n")
    with pytest.raises(DatasetError, match="empty"):
        open_dataset(tmp_path / "e.csv")


def test_missing_required_column(tmp_path):
    (tmp_path / "e.csv").write_text("name,file\na,b.png\n")
    with pytest.raises(DatasetError, match="missing required column 'ID'"):
        open_dataset(tmp_path / "e.csv")


def test_template_genes_must_match_training(tmp_path):
    csv = write_challenge_dataset(tmp_path, n_genes=3)
    pd.DataFrame({"ID": ["t1"], "G0": [0], "G1": [0], "OTHER": [0]}).to_csv(tmp_path / "sample_submission.csv", index=False)
    with pytest.raises(DatasetError, match=r"genes differ.*1 template genes not in the data \(OTHER\).*1 data genes not in the template \(G2\)"):
        open_dataset(csv)


def test_template_sets_output_gene_order(tmp_path):
    csv = write_challenge_dataset(tmp_path, n_genes=3)
    pd.DataFrame({"ID": ["t1"], "G2": [0], "G0": [0], "G1": [0]}).to_csv(tmp_path / "sample_submission.csv", index=False)
    assert open_dataset(csv).template_genes == ["G2", "G0", "G1"]


def test_test_csv_has_no_targets(tmp_path):
    ds = open_dataset(write_challenge_dataset(tmp_path, with_targets=False))
    assert ds.targets is None and len(ds) == 12


def test_fingerprint_tracks_image_content_not_row_order(tmp_path):
    csv = write_challenge_dataset(tmp_path)
    fp = open_dataset(csv).fingerprint()
    _rewrite(csv, lambda f: f.iloc[::-1])
    assert open_dataset(csv).fingerprint() == fp
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "img" / "spot0.png")
    assert open_dataset(csv).fingerprint() != fp


def _write_hest(root, sample, barcodes, images, expr_order, genes=("A", "B")):
    import anndata

    (root / "patches").mkdir(parents=True, exist_ok=True)
    (root / "st").mkdir(exist_ok=True)
    with h5py.File(root / "patches" / f"{sample}.h5", "w") as f:
        f["img"] = images
        f["barcode"] = np.array([[b.encode()] for b in barcodes], dtype="S16")
        f["coords"] = np.arange(len(barcodes) * 2, dtype=float).reshape(-1, 2)
    # expression rows in a different order: value = index of the barcode in `barcodes`
    X = np.array([[barcodes.index(b), 10 * barcodes.index(b)] for b in expr_order], dtype=np.float32)
    adata = anndata.AnnData(X=X, obs=pd.DataFrame(index=list(expr_order)), var=pd.DataFrame(index=list(genes)))
    adata.write_h5ad(root / "st" / f"{sample}.h5ad")


def test_hest_rows_joined_by_barcode_not_position(tmp_path):
    barcodes = ["AAA-1", "CCC-1", "GGG-1", "TTT-1"]
    images = np.stack([np.full((8, 8, 3), 10 * i, np.uint8) for i in range(4)])
    _write_hest(tmp_path, "S1", barcodes, images, expr_order=barcodes[::-1])
    ds = open_dataset(tmp_path / "patches" / "S1.h5")
    assert ds.ids == barcodes
    assert ds.targets.loc["GGG-1", "A"] == 2 and ds.targets.loc["AAA-1", "B"] == 0
    assert ds.read_image(2)[0, 0, 0] == 20
    assert ds.coords.shape == (4, 2)


def test_hest_folder_concatenates_samples_with_groups(tmp_path):
    images = np.zeros((3, 8, 8, 3), np.uint8)
    _write_hest(tmp_path, "S1", ["a", "b", "c"], images, ["a", "b", "c"])
    _write_hest(tmp_path, "S2", ["a", "b", "c"], images, ["c", "a", "b"])
    ds = open_dataset(tmp_path)
    assert ds.ids == ["S1/a", "S1/b", "S1/c", "S2/a", "S2/b", "S2/c"]
    assert ds.groups.tolist() == ["S1"] * 3 + ["S2"] * 3
    assert ds.targets.loc["S2/c", "A"] == 2


def test_hest_patches_without_expression_warned_and_dropped(tmp_path):
    images = np.zeros((3, 8, 8, 3), np.uint8)
    _write_hest(tmp_path, "S1", ["a", "b", "c"], images, ["a", "c"])
    with pytest.warns(DatasetWarning, match="1 of 3 patches have no expression"):
        ds = open_dataset(tmp_path / "patches" / "S1.h5")
    assert ds.ids == ["a", "c"]


def test_unknown_path_is_explained(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nope.csv")
