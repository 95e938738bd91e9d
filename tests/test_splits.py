"""k-fold splits: CLAM's files, stratification, patient grouping, fixed test set, CLAM parity."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from clam_mcmkd.clam import formats
from clam_mcmkd.cli import main
from clam_mcmkd.splits import SplitConfig, SplitError, make_splits

KEYS = ("train", "val", "test")


def _golden_cohort(path):
    """12 cases (every 4th from c01 has two slides), every 3rd case tumour."""
    rows = []
    for c in range(12):
        label = "tumor" if c % 3 == 0 else "normal"
        for j in range(1 + (c % 4 == 1)):
            rows.append({"case_id": f"c{c:02d}", "slide_id": f"c{c:02d}_{j}", "label": label})
    return formats.write_dataset_csv(path, rows)


def _cohort(path, n_cases=60, seed=0, labels=("a", "b", "c")):
    """Cases with 1-3 slides each and imbalanced classes."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_cases):
        label = labels[0] if c % 2 else labels[1 + (c % 4 == 0)]
        for j in range(int(rng.integers(1, 4))):
            rows.append({"case_id": f"case{c}", "slide_id": f"case{c}_s{j}", "label": label})
    return formats.write_dataset_csv(path, rows)


def _all_folds(split_dir, k):
    return [formats.read_splits(split_dir, i) for i in range(k)]


# CLAM's own output for _golden_cohort: its create_splits_seq.py logic (Generic_WSI_Classification
# _Dataset(patient_strat=True, seed=1, label_dict={'normal':0,'tumor':1}) with
# val_num = test_num = round(n_cases_per_class * 0.25), create_splits(k=2), save_splits), run on
# mahmoodlab/CLAM@53e2409d. Written by CLAM, not by this project.
CLAM_SPLITS_0 = """,train,val,test
0,c01_0,c11_0,c05_0
1,c01_1,c04_0,c05_1
2,c02_0,c06_0,c07_0
3,c08_0,,c00_0
4,c10_0,,
5,c03_0,,
6,c09_0,,
7,c09_1,,
"""
CLAM_SPLITS_1 = """,train,val,test
0,c01_0,c02_0,c07_0
1,c01_1,c10_0,c11_0
2,c04_0,c03_0,c00_0
3,c05_0,,
4,c05_1,,
5,c08_0,,
6,c06_0,,
7,c09_0,,
8,c09_1,,
"""
CLAM_DESCRIPTOR_0 = """,train,val,test
normal,5,2,3
tumor,3,1,1
"""


def test_same_files_as_clam_create_splits(tmp_path):
    csv = _golden_cohort(tmp_path / "data.csv")
    cfg = SplitConfig(
        csv_path=str(csv), split_dir=str(tmp_path / "s"), k=2, val_frac=0.25, test_frac=0.25,
        patient_strat=True,
    )  # fmt: skip
    make_splits(cfg)
    assert (tmp_path / "s" / "splits_0.csv").read_text() == CLAM_SPLITS_0
    assert (tmp_path / "s" / "splits_1.csv").read_text() == CLAM_SPLITS_1
    assert (tmp_path / "s" / "splits_0_descriptor.csv").read_text() == CLAM_DESCRIPTOR_0
    bool_df = pd.read_csv(tmp_path / "s" / "splits_0_bool.csv", index_col=0)
    main_df = pd.read_csv(tmp_path / "s" / "splits_0.csv", dtype=str)
    for key in KEYS:
        assert sorted(bool_df.index[bool_df[key]]) == sorted(main_df[key].dropna())


def test_disjoint_stratified_complete(tmp_path):
    csv = _cohort(tmp_path / "data.csv")
    df = formats.read_dataset_csv(csv)
    cfg = SplitConfig(csv_path=str(csv), split_dir=str(tmp_path / "s"), k=5, seed=3)
    paths = make_splits(cfg)
    assert len(paths) == 5
    per_class = df["label"].value_counts()
    label_of = dict(zip(df["slide_id"], df["label"]))
    vals = []
    for i, split in enumerate(_all_folds(cfg.split_dir, 5)):
        sets = [set(split[key]) for key in KEYS]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert set().union(*sets) == set(df["slide_id"])
        for key in ("val", "test"):
            counts = pd.Series([label_of[s] for s in split[key]]).value_counts()
            for cls, n in per_class.items():
                assert counts.get(cls, 0) == round(n * 0.1), (i, key, cls)
        desc = pd.read_csv(formats.split_paths(cfg.split_dir, i)[2], index_col=0)
        assert list(desc.index) == ["a", "b", "c"]
        for key in KEYS:
            expected = pd.Series([label_of[s] for s in split[key]]).value_counts()
            assert desc[key].to_dict() == {c: int(expected.get(c, 0)) for c in desc.index}
        vals.append(tuple(sorted(split["val"])))
    assert len(set(vals)) == 5  # folds differ
    saved = json.loads((tmp_path / "s" / "split_config.json").read_text())
    assert saved["k"] == 5 and saved["seed"] == 3


def test_patient_strat_keeps_cases_together(tmp_path):
    csv = _cohort(tmp_path / "data.csv", seed=1)
    df = formats.read_dataset_csv(csv)
    case_of = dict(zip(df["slide_id"], df["case_id"]))
    assert df["case_id"].value_counts().max() > 1
    cfg = SplitConfig(
        csv_path=str(csv), split_dir=str(tmp_path / "s"), k=4, val_frac=0.2, test_frac=0.2,
        patient_strat=True,
    )  # fmt: skip
    make_splits(cfg)
    for split in _all_folds(cfg.split_dir, 4):
        cases = [{case_of[s] for s in split[key]} for key in KEYS]
        assert not (cases[0] & cases[1] or cases[0] & cases[2] or cases[1] & cases[2])
        assert set().union(*cases) == set(df["case_id"])


def test_seeded_and_label_frac(tmp_path):
    csv = _cohort(tmp_path / "data.csv")
    df = formats.read_dataset_csv(csv)
    runs = {}
    for name, seed, frac in (("a", 7, 1.0), ("b", 7, 1.0), ("c", 8, 1.0), ("d", 7, 0.5)):
        cfg = SplitConfig(str(csv), str(tmp_path / name), k=2, seed=seed, label_frac=frac)
        make_splits(cfg)
        runs[name] = _all_folds(cfg.split_dir, 2)
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
    label_of = dict(zip(df["slide_id"], df["label"]))
    for full, half in zip(runs["a"], runs["d"]):
        assert half["val"] == full["val"] and half["test"] == full["test"]
        assert set(half["train"]) < set(full["train"])
        for cls in ("a", "b", "c"):
            n_full = sum(label_of[s] == cls for s in full["train"])
            assert sum(label_of[s] == cls for s in half["train"]) == math.ceil(n_full * 0.5)


def test_fixed_test_set_in_every_fold(tmp_path):
    csv = _cohort(tmp_path / "data.csv", n_cases=50)
    df = formats.read_dataset_csv(csv)
    official = df["slide_id"].iloc[::5].tolist()
    pd.DataFrame({"slide_id": [s + ".tif" for s in official]}).to_csv(
        tmp_path / "test.csv", index=False
    )
    cfg = SplitConfig(
        str(csv), str(tmp_path / "s"), k=3, val_frac=0.2, fixed_test=str(tmp_path / "test.csv")
    )
    make_splits(cfg)
    for split in _all_folds(cfg.split_dir, 3):
        assert sorted(split["test"]) == sorted(official)
        assert not set(split["val"]) & set(official)
        assert set(split["train"]) | set(split["val"]) == set(df["slide_id"]) - set(official)


def test_errors_are_clear(tmp_path):
    csv = _cohort(tmp_path / "data.csv", n_cases=12)
    with pytest.raises(SplitError, match="fewer than"):
        make_splits(SplitConfig(str(csv), str(tmp_path / "s"), k=2, val_frac=0.6, test_frac=0.5))
    (tmp_path / "t.csv").write_text("slide_id\nnot_a_slide\n")
    with pytest.raises(SplitError, match="not_a_slide"):
        make_splits(SplitConfig(str(csv), str(tmp_path / "s"), fixed_test=str(tmp_path / "t.csv")))
    df = formats.read_dataset_csv(csv)
    multi = df["case_id"].value_counts().index[0]
    one_slide = df.loc[df["case_id"] == multi, "slide_id"].iloc[0]
    (tmp_path / "t.csv").write_text(f"slide_id\n{one_slide}\n")
    with pytest.raises(SplitError, match="both in and out"):
        make_splits(
            SplitConfig(
                str(csv),
                str(tmp_path / "s"),
                patient_strat=True,
                fixed_test=str(tmp_path / "t.csv"),
            )  # fmt: skip
        )
    with pytest.raises(formats.ClamFormatError, match="not in the label dict"):
        make_splits(SplitConfig(str(csv), str(tmp_path / "s"), label_dict={"a": 0, "b": 1}))


def test_cli_splits(tmp_path):
    csv = _cohort(tmp_path / "data.csv", labels=("tumor", "normal", "other"))
    out = tmp_path / "s"
    result = CliRunner().invoke(
        main,
        ["splits", "--csv_path", str(csv), "--split-dir", str(out), "--k", "3", "--patient-strat",
         "--label-dict", '{"tumor": 0, "normal": 1, "other": 2}'],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("splits_*.csv")) == sorted(
        f"splits_{i}{s}.csv" for i in range(3) for s in ("", "_bool", "_descriptor")
    )
    desc = pd.read_csv(out / "splits_0_descriptor.csv", index_col=0)
    assert list(desc.index) == ["tumor", "normal", "other"]
    bad = CliRunner().invoke(
        main, ["splits", "--csv-path", str(csv), "--split-dir", str(out), "--label-dict", "{x"]
    )
    assert bad.exit_code != 0 and "not valid JSON" in bad.output


def test_a_csv_too_small_for_its_fractions_is_refused_in_one_line(tmp_path):
    """Six slides, three per class (the size of the test cohort), default fractions 0.1: CLAM's
    round(3 x 0.1) is 0 for both classes, so every fold would have no val and no test slide."""
    rows = [{"case_id": f"c{i}", "slide_id": f"s{i}", "label": ("normal", "tumor")[i % 2]}
            for i in range(6)]  # fmt: skip
    csv = formats.write_dataset_csv(tmp_path / "six.csv", rows)
    result = CliRunner().invoke(main, ["splits", "--csv-path", str(csv), "--split-dir",
                                       str(tmp_path / "s")])  # fmt: skip
    assert result.exit_code != 0 and "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and str(csv) in error[0]
    assert "6 slides (3 normal, 3 tumor) are too few for --val-frac 0.1" in error[0]
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").iterdir())
    with pytest.raises(SplitError, match="too few for --test-frac 0.1"):
        make_splits(SplitConfig(str(csv), str(tmp_path / "s"), k=2, val_frac=0.34))
    with pytest.raises(SplitError, match="leave no training slides"):
        make_splits(SplitConfig(str(csv), str(tmp_path / "s"), k=2, val_frac=0.34, test_frac=0.67))
    # big enough (one val and one test slide per class): CLAM's draws, as before
    paths = make_splits(SplitConfig(str(csv), str(tmp_path / "s"), k=2, val_frac=0.34,
                                    test_frac=0.34))  # fmt: skip
    assert len(paths) == 2
    for split in _all_folds(tmp_path / "s", 2):
        assert [len(split[key]) for key in KEYS] == [2, 2, 2]
    val_frac_zero = make_splits(SplitConfig(str(csv), str(tmp_path / "z"), k=1, val_frac=0.0,
                                            test_frac=0.34))  # fmt: skip
    assert len(val_frac_zero) == 1  # 0 asks for no val set: that is not refused
