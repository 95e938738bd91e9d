"""CLAM's formats: round trips, CLAM's own reading conventions, and clear errors for bad files."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from clam_mcmkd.clam import formats
from clam_mcmkd.clam.formats import ClamFormatError


def _coords(n=7, seed=0):
    return np.random.default_rng(seed).integers(0, 5000, size=(n, 2)) // 256 * 256


def _write_coords(path, coords):
    return formats.write_coords_h5(
        path,
        coords,
        patch_size=256,
        patch_level=1,
        downsample=(2.0, 2.0),
        downsampled_level_dim=(3000, 2000),
        level_dim=(3000, 2000),
        name="slide_a",
        extra_attrs={"target_patch_size": 256},
    )


def _no_temp_files(directory):
    return not [p for p in directory.rglob("*") if ".tmp" in p.name]


# --------------------------------------------------------------------------- coords h5


def test_coords_h5_round_trip_in_clam_layout(tmp_path):
    coords = _coords()
    path = _write_coords(tmp_path / "patches" / "slide_a.h5", coords)
    # read it the way CLAM's Whole_Slide_Bag_FP / create_patches_fp do: raw h5py
    with h5py.File(path, "r") as f:
        assert list(f.keys()) == ["coords"]
        dset = f["coords"]
        assert dset.shape == (7, 2) and np.issubdtype(dset.dtype, np.integer)
        assert dset.attrs["patch_size"] == 256 and dset.attrs["patch_level"] == 1
        assert set(dset.attrs) >= {"downsample", "downsampled_level_dim", "level_dim", "name",
                                   "save_path"}  # fmt: skip
        np.testing.assert_array_equal(dset[:], coords)
    h5 = formats.read_coords_h5(path)
    np.testing.assert_array_equal(h5.coords, coords)
    assert h5.coords.dtype == np.int64
    assert (h5.patch_size, h5.patch_level, h5.patch_size_level0) == (256, 1, 512)
    assert h5.downsample == (2.0, 2.0) and h5.name == "slide_a" and len(h5) == 7
    assert h5.attrs["target_patch_size"] == 256
    assert h5.attrs["save_path"] == str(tmp_path / "patches")
    assert _no_temp_files(tmp_path)


def test_coords_h5_written_by_clam_itself_is_read(tmp_path):
    """CLAM's save_hdf5 writes int64 coords with scalar attrs; level 0 downsample (1, 1)."""
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("coords", data=_coords(3).astype(np.int64), maxshape=(None, 2))
        dset.attrs.update(patch_size=256, patch_level=0, downsample=np.array([1.0, 1.0]),
                          downsampled_level_dim=np.array([2220, 2967]),
                          level_dim=np.array([2220, 2967]), name="CMU", save_path="x")  # fmt: skip
    h5 = formats.read_coords_h5(path)
    assert h5.patch_size_level0 == 256 and h5.name == "CMU"


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("not_hdf5", "not a readable HDF5"),
        ("no_coords", "no 'coords' dataset"),
        ("wrong_shape", "shape (N, 2)"),
        ("no_attrs", "lacks the CLAM attribute 'patch_size'"),
        ("negative", "negative"),
    ],
)
def test_broken_coords_h5_errors_name_the_file(tmp_path, case, message):
    path = tmp_path / f"{case}.h5"
    if case == "not_hdf5":
        path.write_text("hello")
    elif case != "missing":
        with h5py.File(path, "w") as f:
            if case == "no_coords":
                f.create_dataset("features", data=np.zeros((2, 4)))
            else:
                data = {"wrong_shape": np.zeros((4, 3)), "negative": -np.ones((2, 2))}
                dset = f.create_dataset("coords", data=data.get(case, np.zeros((2, 2))))
                if case != "no_attrs":
                    dset.attrs.update(patch_size=256, patch_level=0)
    with pytest.raises(ClamFormatError) as err:
        formats.read_coords_h5(path)
    assert str(path) in str(err.value) and message in str(err.value)


# --------------------------------------------------------------------------- features


def test_features_round_trip_h5_and_pt(tmp_path):
    feats = np.random.default_rng(1).normal(size=(7, 16)).astype(np.float32)
    coords = _coords()
    h5_path, pt_path = formats.write_features(tmp_path, "slide_a", feats, coords)
    assert (h5_path, pt_path) == formats.feature_paths(tmp_path, "slide_a")
    assert formats.features_done(tmp_path, "slide_a")
    assert not formats.features_done(tmp_path, "slide_b")
    # CLAM's readers: torch.load(pt) and h5py features/coords
    np.testing.assert_array_equal(torch.load(pt_path).numpy(), feats)
    with h5py.File(h5_path, "r") as f:
        np.testing.assert_array_equal(f["features"][:], feats)
        np.testing.assert_array_equal(f["coords"][:], coords)
        assert f["features"].dtype == np.float32 and f["coords"].dtype == np.int32  # as CLAM
    np.testing.assert_array_equal(formats.read_features(tmp_path, "slide_a"), feats)
    got, got_coords = formats.read_features(tmp_path, "slide_a", with_coords=True)
    np.testing.assert_array_equal(got, feats)
    np.testing.assert_array_equal(got_coords, coords)
    np.testing.assert_array_equal(formats.read_features(h5_path), feats)
    assert _no_temp_files(tmp_path)


def test_features_write_rejects_nan_and_mismatched_rows(tmp_path):
    feats = np.ones((3, 4), np.float32)
    with pytest.raises(ClamFormatError, match="row for row"):
        formats.write_features(tmp_path, "s", feats, _coords(4))
    feats[1, 2] = np.nan
    with pytest.raises(ClamFormatError, match="NaN"):
        formats.write_features(tmp_path, "s", feats, _coords(3))
    assert not (tmp_path / "h5_files" / "s.h5").exists()
    assert _no_temp_files(tmp_path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("nan", "NaN or Inf"),
        ("rows", "3 feature rows but 2 coords rows"),
        ("no_features", "no 'features' dataset"),
        ("one_d", "2-D"),
        ("empty", "empty bag"),
        ("not_hdf5", "not a readable HDF5"),
    ],
)
def test_broken_feature_h5_errors_name_the_file(tmp_path, case, message):
    path = tmp_path / f"{case}.h5"
    if case == "not_hdf5":
        path.write_bytes(b"\x00" * 64)
    else:
        feats = {"nan": np.array([[np.nan, 1.0]] * 3), "one_d": np.ones(3),
                 "empty": np.zeros((0, 4))}.get(case, np.ones((3, 4)))  # fmt: skip
        with h5py.File(path, "w") as f:
            if case != "no_features":
                f.create_dataset("features", data=feats)
            n_coords = {"rows": 2, "empty": 0}.get(case, 3)
            f.create_dataset("coords", data=np.zeros((n_coords, 2)))
    with pytest.raises(ClamFormatError) as err:
        formats.read_features(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_broken_pt_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not torch")
    with pytest.raises(ClamFormatError, match="not a readable torch file") as err:
        formats.read_features(bad)
    assert str(bad) in str(err.value)
    not_tensor = tmp_path / "dict.pt"
    torch.save({"a": 1}, not_tensor)
    with pytest.raises(ClamFormatError, match="expected a tensor"):
        formats.read_features(not_tensor)
    nan = tmp_path / "nan.pt"
    torch.save(torch.tensor([[float("nan"), 1.0]]), nan)
    with pytest.raises(ClamFormatError, match="NaN"):
        formats.read_features(nan)


# --------------------------------------------------------------------------- dataset CSV


def test_dataset_csv_round_trip_and_extensions(tmp_path):
    rows = [
        {"case_id": "p1", "slide_id": "a.svs", "label": "tumor"},
        {"case_id": "p1", "slide_id": "b", "label": "tumor"},
        {"case_id": "p2", "slide_id": "c.tif", "label": "normal"},
    ]
    path = formats.write_dataset_csv(tmp_path / "data.csv", rows)
    raw = pd.read_csv(path)  # what CLAM's Generic_WSI_Classification_Dataset reads
    assert list(raw.columns[:3]) == ["case_id", "slide_id", "label"]
    df = formats.read_dataset_csv(path, label_dict={"normal": 0, "tumor": 1})
    assert list(df["slide_id"]) == ["a", "b", "c"]
    assert list(df["label_index"]) == [1, 1, 0]
    assert formats.default_label_dict(df["label"]) == {"normal": 0, "tumor": 1}
    assert formats.slide_id_of("dir/x.ndpi") == "x" and formats.slide_id_of("x.v2.svs") == "x.v2"
    # no case_id column: one case per slide
    (tmp_path / "nocase.csv").write_text("slide_id,label\na,tumor\nb,normal\n")
    df2 = formats.read_dataset_csv(tmp_path / "nocase.csv")
    assert list(df2["case_id"]) == ["a", "b"]
    assert _no_temp_files(tmp_path)


@pytest.mark.parametrize(
    "text, message, kwargs",
    [
        ("case_id,label\np,tumor\n", "no 'slide_id' column", {}),
        ("case_id,slide_id\np,a\n", "no 'label' column", {}),
        ("case_id,slide_id,label\np,a,tumor\nq,a.svs,normal\n", "duplicated slide_id", {}),
        ("case_id,slide_id,label\np,a,tumor\nq,b,\n", "empty label", {}),
        ("case_id,slide_id,label\np,a,tumour\n", "not in the label dict",
         {"label_dict": {"normal": 0, "tumor": 1}}),
    ],
)  # fmt: skip
def test_broken_dataset_csv_errors_name_the_file(tmp_path, text, message, kwargs):
    path = tmp_path / "data.csv"
    path.write_text(text)
    with pytest.raises(ClamFormatError) as err:
        formats.read_dataset_csv(path, **kwargs)
    assert str(path) in str(err.value) and message in str(err.value)
    with pytest.raises(ClamFormatError, match="does not exist"):
        formats.read_dataset_csv(tmp_path / "missing.csv")


def test_write_dataset_csv_needs_columns(tmp_path):
    with pytest.raises(ValueError, match="label"):
        formats.write_dataset_csv(tmp_path / "d.csv", [{"case_id": "p", "slide_id": "a"}])
    assert not (tmp_path / "d.csv").exists()


# --------------------------------------------------------------------------- splits


def test_splits_round_trip_in_clam_conventions(tmp_path):
    splits = {"train": ["a", "b", "c", "d"], "val": ["e"], "test": ["f", "g"]}
    labels = dict(zip("abcdefg", ["tumor", "normal"] * 3 + ["tumor"], strict=True))
    label_dict = {"normal": 0, "tumor": 1}
    main_p, bool_p, desc_p = formats.write_splits(tmp_path, 3, splits, labels, label_dict)
    assert main_p.name == "splits_3.csv" and bool_p.name == "splits_3_bool.csv"
    # CLAM's return_splits: pd.read_csv(csv_path) then df[split].dropna()
    df = pd.read_csv(main_p)
    assert list(df.columns) == ["Unnamed: 0", "train", "val", "test"]
    for key in ("train", "val", "test"):
        assert df[key].dropna().reset_index(drop=True).tolist() == splits[key]
    bools = pd.read_csv(bool_p, index_col=0)
    assert bools.shape == (7, 3) and bools.sum().tolist() == [4, 1, 2]
    assert bools.loc["e", "val"] and not bools.loc["e", "train"]
    desc = pd.read_csv(desc_p, index_col=0)
    assert desc.loc["tumor", "train"] == 2 and desc.loc["normal", "test"] == 1
    assert formats.read_splits(tmp_path, 3) == splits
    assert _no_temp_files(tmp_path)


def test_broken_splits_errors_name_the_file(tmp_path):
    path = tmp_path / "splits_0.csv"
    path.write_text(",train,val\n0,a,b\n")
    with pytest.raises(ClamFormatError, match="missing split column") as err:
        formats.read_splits(tmp_path, 0)
    assert str(path) in str(err.value)
    path.write_text(",train,val,test\n0,a,b,a\n")
    with pytest.raises(ClamFormatError, match="both 'train' and 'test'"):
        formats.read_splits(tmp_path, 0)
    with pytest.raises(ClamFormatError, match="does not exist"):
        formats.read_splits(tmp_path, 9)


# --------------------------------------------------------------------------- results


def test_summary_and_pkl_round_trip(tmp_path):
    rows = [
        {"folds": k, "test_auc": 0.8 + k / 100, "val_auc": 0.7, "test_acc": 0.75, "val_acc": 0.7}
        for k in range(3)
    ]
    path = formats.write_summary(tmp_path, rows)
    df = formats.read_summary(path)
    assert df["folds"].tolist() == [0, 1, 2]
    assert df["test_auc"].tolist() == pytest.approx([0.8, 0.81, 0.82])
    assert pd.read_csv(path).columns[0] == "Unnamed: 0"  # pandas index kept, as CLAM writes it
    (tmp_path / "bad.csv").write_text("folds,test_auc\n0,0.5\n")
    with pytest.raises(ClamFormatError, match="missing column"):
        formats.read_summary(tmp_path / "bad.csv")
    obj = {"slide_a": {"prob": np.array([0.2, 0.8]), "label": 1}}
    pkl = formats.write_pkl(tmp_path / "split_0_results.pkl", obj)
    back = formats.read_pkl(pkl)
    np.testing.assert_array_equal(back["slide_a"]["prob"], obj["slide_a"]["prob"])
    assert _no_temp_files(tmp_path)


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = _write_coords(tmp_path / "a.h5", _coords(3))
    with pytest.raises(TypeError):
        formats.write_coords_h5(
            path, _coords(5), patch_size=256, patch_level=0, downsample=(1, 1),
            downsampled_level_dim=(1, 1), level_dim=(1, 1), name="a",
            extra_attrs={"bad": object()},
        )  # fmt: skip
    assert len(formats.read_coords_h5(path)) == 3  # the old, complete file is intact
    assert _no_temp_files(tmp_path)
