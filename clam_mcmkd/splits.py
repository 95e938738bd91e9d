"""k-fold train/val/test splits in CLAM's format, drawn the way CLAM's ``create_splits_seq.py`` does.

Same algorithm and random stream as CLAM (one legacy NumPy ``RandomState(seed)`` for all folds;
per class, ``round(n * val_frac)`` validation units, then ``round(n * test_frac)`` test units, the
rest (or its first ``ceil(n * label_frac)``) for training), so the same CSV, seed and fractions
give CLAM's own splits. Units are cases with ``patient_strat`` (a case's label is the max of its
slides' labels, CLAM's MIL convention), slides otherwise. ``fixed_test`` keeps an official test
set in every fold (CLAM's ``custom_test_ids``), as CAMELYON16 has one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .clam import formats
from .utils import ClamMcmkdError, check_output_path, save_config

log = logging.getLogger(__name__)


class SplitError(ClamMcmkdError):
    """Splits cannot be drawn from this dataset with these settings."""


@dataclass
class SplitConfig:
    csv_path: str
    split_dir: str
    k: int = 10
    val_frac: float = 0.1
    test_frac: float = 0.1
    label_frac: float = 1.0
    seed: int = 1
    patient_strat: bool = False
    fixed_test: str | None = None  # CSV of slide ids (a slide_id column, a test column, or col 0)
    label_dict: dict[str, int] | None = None  # default: sorted labels -> 0..C-1


def canonical_labels(label_dict: Mapping[str, int]) -> dict[int, str]:
    """Class index -> the first label name mapped to it (CLAM's descriptor row names)."""
    names: dict[int, str] = {}
    for name, index in label_dict.items():
        names.setdefault(int(index), name)
    return dict(sorted(names.items()))


def read_slide_list(path: str | Path) -> list[str]:
    """Slide ids from a CSV: its ``slide_id`` column, else a ``test`` column, else column 0."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise SplitError(f"{path}: slide list does not exist")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in ("slide_id", "test"):
        if col in df.columns:
            values = df[col]
            break
    else:
        values = pd.read_csv(path, dtype=str, header=None, keep_default_na=False)[0]
        if len(values) and values.iloc[0].strip().lower() in {"slide", "slide_id", "id", "name"}:
            values = values.iloc[1:]
    ids = [formats.slide_id_of(v.strip()) for v in values if v.strip()]
    if not ids:
        raise SplitError(f"{path}: no slide ids")
    return ids


def _units(df, patient_strat: bool) -> tuple[list[list[int]], np.ndarray]:
    """Sampling units: (slide row indices of each unit, unit label index)."""
    if not patient_strat:
        return [[i] for i in range(len(df))], df["label_index"].to_numpy()
    cases = np.unique(df["case_id"].to_numpy())  # sorted, as CLAM's patient_data_prep
    rows = [df.index[df["case_id"] == c].tolist() for c in cases]
    labels = np.array([df["label_index"].to_numpy()[r].max() for r in rows])
    return rows, labels


def _fixed_test_units(df, unit_rows, cfg: SplitConfig) -> np.ndarray:
    test_ids = read_slide_list(cfg.fixed_test)
    known = set(df["slide_id"])
    unknown = [s for s in test_ids if s not in known]
    if unknown:
        raise SplitError(
            f"{cfg.fixed_test}: {len(unknown)} test slide(s) not in {cfg.csv_path}, e.g. {unknown[:3]}"
        )
    in_test = set(test_ids)
    units = []
    for u, rows in enumerate(unit_rows):
        flags = {df["slide_id"].iat[r] in in_test for r in rows}
        if flags == {True, False}:
            raise SplitError(
                f"{cfg.fixed_test}: case '{df['case_id'].iat[rows[0]]}' has slides both in and "
                "out of the fixed test set; with --patient-strat a case must be in one set"
            )
        if True in flags:
            units.append(u)
    return np.array(units, dtype=int)


def draw_folds(
    unit_labels: np.ndarray,
    n_classes: int,
    k: int,
    val_frac: float,
    test_frac: float,
    label_frac: float = 1.0,
    seed: int = 1,
    fixed_test_units: np.ndarray | None = None,
):
    """Yield (train, val, test) unit indices per fold, in CLAM's ``generate_split`` order."""
    counts = np.array([(unit_labels == c).sum() for c in range(n_classes)])
    val_num = np.round(counts * val_frac).astype(int)
    test_num = np.round(counts * test_frac).astype(int)
    indices = np.arange(len(unit_labels))
    if fixed_test_units is not None:
        indices = np.setdiff1d(indices, fixed_test_units)
    cls_ids = [np.where(unit_labels == c)[0] for c in range(n_classes)]
    rng = np.random.RandomState(seed)
    for _ in range(k):
        train, val = [], []
        test = list(fixed_test_units) if fixed_test_units is not None else []
        for c in range(n_classes):
            pool = np.intersect1d(cls_ids[c], indices)
            need = val_num[c] + (0 if fixed_test_units is not None else test_num[c])
            if need > len(pool):
                raise SplitError(
                    f"class {c} has {len(pool)} unit(s) outside the test set, fewer than the "
                    f"{need} that val_frac/test_frac ask for"
                )
            val_ids = rng.choice(pool, val_num[c], replace=False)
            rest = np.setdiff1d(pool, val_ids)
            val.extend(val_ids)
            if fixed_test_units is None:
                test_ids = rng.choice(rest, test_num[c], replace=False)
                rest = np.setdiff1d(rest, test_ids)
                test.extend(test_ids)
            if label_frac != 1:
                rest = rest[: math.ceil(len(rest) * label_frac)]
            train.extend(rest)
        yield [int(i) for i in train], [int(i) for i in val], [int(i) for i in test]


def _check_set_sizes(cfg: SplitConfig, unit_labels: np.ndarray, names: dict[int, str],
                     fixed_test: bool) -> None:  # fmt: skip
    """Refuse, before any draw, a dataset too small for its fractions: CLAM takes
    ``round(n * frac)`` units per class, which is 0 for every class of a small CSV, and would
    write an empty validation or test set in every fold without a word."""
    counts = np.array([(unit_labels == c).sum() for c in names])
    units = "cases" if cfg.patient_strat else "slides"
    per_class = ", ".join(f"{n} {names[c]}" for c, n in zip(names, counts))
    sets = [("val", cfg.val_frac)] + ([] if fixed_test else [("test", cfg.test_frac)])
    for key, frac in sets:
        if frac > 0 and not np.round(counts * frac).astype(int).any():
            raise SplitError(
                f"{cfg.csv_path}: {len(unit_labels)} {units} ({per_class}) are too few for "
                f"--{key}-frac {frac}: round({units} per class x {frac}) is 0 for every class, "
                f"so every fold's {key} set would be empty; use more {units} or a larger "
                f"--{key}-frac (0 asks for no {key} set)"
            )
    n_val, n_test = (np.round(counts * f).astype(int) for f in (cfg.val_frac, cfg.test_frac))
    if (counts - n_val - (0 if fixed_test else n_test) == 0).all():  # (< 0: draw_folds says so)
        raise SplitError(
            f"{cfg.csv_path}: {len(unit_labels)} {units} ({per_class}) leave no training "
            f"{units} after --val-frac {cfg.val_frac} and --test-frac {cfg.test_frac}"
        )


def make_splits(cfg: SplitConfig) -> list[Path]:
    """Write ``splits_<i>.csv`` (+ ``_bool``, ``_descriptor``) for i < k and the config JSON."""
    check_output_path(cfg.split_dir)
    if cfg.k < 1:
        raise SplitError(f"k must be >= 1, got {cfg.k}")
    for name in ("val_frac", "test_frac"):
        if not 0 <= getattr(cfg, name) < 1:
            raise SplitError(f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    if not 0 < cfg.label_frac <= 1:
        raise SplitError(f"label_frac must be in (0, 1], got {cfg.label_frac}")
    raw = formats.read_dataset_csv(cfg.csv_path)
    label_dict = cfg.label_dict or formats.default_label_dict(raw["label"].tolist())
    df = formats.read_dataset_csv(cfg.csv_path, label_dict=label_dict)
    names = canonical_labels(label_dict)
    unit_rows, unit_labels = _units(df, cfg.patient_strat)
    fixed = _fixed_test_units(df, unit_rows, cfg) if cfg.fixed_test else None

    slide_ids = df["slide_id"].to_numpy()
    labels = {s: names[i] for s, i in zip(slide_ids, df["label_index"])}
    canon_dict = {name: i for i, name in names.items()}
    _check_set_sizes(cfg, unit_labels, names, fixed is not None)
    paths = []
    folds = draw_folds(
        unit_labels, len(names), cfg.k, cfg.val_frac, cfg.test_frac, cfg.label_frac, cfg.seed, fixed
    )
    for i, unit_split in enumerate(folds):
        split = {
            key: [str(slide_ids[r]) for u in units for r in unit_rows[u]]
            for key, units in zip(("train", "val", "test"), unit_split)
        }
        paths.append(formats.write_splits(cfg.split_dir, i, split, labels, canon_dict)[0])
        log.info(
            "fold %d: %d train, %d val, %d test slides",
            i,
            *(len(split[key]) for key in ("train", "val", "test")),
        )
    save_config(cfg, Path(cfg.split_dir) / "split_config.json")
    return paths
