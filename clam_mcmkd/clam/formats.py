"""CLAM's file formats, read, written and validated in one place.

Every stage goes through this module, so that our files and CLAM's are interchangeable:
coords h5 (``patches/<slide_id>.h5``), features (``h5_files/`` + ``pt_files/``), the dataset CSV,
the k-fold split CSVs and the results summary. All writes are atomic (temp name, then rename),
so a file that exists under its final name is complete. h5py, pandas and torch are imported where
they are used, so the CLI can import this module (through the stage configs) at once.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import ClamMcmkdError, atomic_path

SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
    ".dcm", ".jpg", ".jpeg", ".png",
)  # fmt: skip


class ClamFormatError(ClamMcmkdError):
    """A file that is not in the CLAM format it should be in; the message names the file."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def slide_id_of(name: str | os.PathLike, slide_ext: str | None = None) -> str:
    """Slide id = file name without directory and slide extension (CLAM strips `slide_ext`)."""
    base = Path(str(name)).name
    if slide_ext and base.endswith(slide_ext):
        return base[: -len(slide_ext)]
    low = base.lower()
    for ext in SLIDE_EXTENSIONS + (".h5", ".pt"):
        if low.endswith(ext):
            return base[: -len(ext)]
    return base


# ----------------------------------------------------------------------------- coords h5


@dataclass
class CoordsH5:
    """A CLAM coords file: level-0 top-left corners and the attributes CLAM's readers use."""

    coords: np.ndarray  # (N, 2) int64, (x, y) at level 0
    patch_size: int  # pixels at patch_level
    patch_level: int
    attrs: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def downsample(self) -> tuple[float, float]:
        ds = self.attrs.get("downsample", (1.0, 1.0))
        ds = np.atleast_1d(np.asarray(ds, dtype=float))
        return (float(ds[0]), float(ds[-1]))

    @property
    def patch_size_level0(self) -> int:
        """Patch side in level-0 pixels (what one grid step covers when step == size)."""
        return int(round(self.patch_size * self.downsample[0]))

    @property
    def name(self) -> str:
        return str(self.attrs.get("name", Path(self.path or "").stem))

    def __len__(self) -> int:
        return len(self.coords)


def write_coords_h5(
    path: str | os.PathLike,
    coords: np.ndarray,
    *,
    patch_size: int,
    patch_level: int,
    downsample: Sequence[float],
    downsampled_level_dim: Sequence[int],
    level_dim: Sequence[int],
    name: str,
    save_path: str | None = None,
    extra_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write coords exactly as CLAM's ``create_patches_fp.py`` does (dataset + attrs on it)."""
    import h5py

    path = Path(path)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            dset = f.create_dataset(
                "coords", data=coords, maxshape=(None, 2), chunks=(max(1, min(len(coords), 512)), 2)
            )
            dset.attrs["patch_size"] = int(patch_size)
            dset.attrs["patch_level"] = int(patch_level)
            dset.attrs["downsample"] = np.asarray(downsample, dtype=np.float64)
            dset.attrs["downsampled_level_dim"] = np.asarray(downsampled_level_dim, dtype=np.int64)
            dset.attrs["level_dim"] = np.asarray(level_dim, dtype=np.int64)
            dset.attrs["name"] = str(name)
            dset.attrs["save_path"] = str(save_path if save_path is not None else path.parent)
            for key, value in (extra_attrs or {}).items():
                dset.attrs[key] = value
    return path


def write_grid_coords_h5(
    path: str | os.PathLike, slide_size: int, *, name: str, patch_size: int = 256,
    n_patches: int | None = None,
) -> Path:  # fmt: skip
    """Every ``patch_size`` patch of a square slide at level 0, row by row as tiling writes
    them (the first ``n_patches`` only, if given): coords for generated slides that need no
    tissue mask (the doctor's probes, ``benchmarks/gpu_check.py``)."""
    ys, xs = np.mgrid[0 : slide_size // patch_size, 0 : slide_size // patch_size]
    coords = np.stack([xs.ravel(), ys.ravel()], 1) * patch_size
    return write_coords_h5(
        path, coords[:n_patches], patch_size=patch_size, patch_level=0, downsample=(1.0, 1.0),
        downsampled_level_dim=(slide_size,) * 2, level_dim=(slide_size,) * 2, name=name,
    )  # fmt: skip


def read_coords_h5(path: str | os.PathLike) -> CoordsH5:
    """Read and validate a coords h5 (ours or CLAM's own)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise ClamFormatError(path, "coords file does not exist")
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise ClamFormatError(path, f"no 'coords' dataset (found: {sorted(f.keys())})")
            dset = f["coords"]
            coords = np.asarray(dset[:])
            attrs = {k: _attr_value(v) for k, v in dset.attrs.items()}
    except ClamFormatError:
        raise
    except OSError as err:
        raise ClamFormatError(path, f"not a readable HDF5 file ({err})") from err
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ClamFormatError(path, f"'coords' must have shape (N, 2), got {coords.shape}")
    if not np.issubdtype(coords.dtype, np.number):
        raise ClamFormatError(path, f"'coords' must be numeric, got {coords.dtype}")
    for key in ("patch_size", "patch_level"):
        if key not in attrs:
            raise ClamFormatError(path, f"'coords' lacks the CLAM attribute '{key}'")
    if (coords < 0).any():
        raise ClamFormatError(path, "'coords' has negative values")
    return CoordsH5(
        coords=coords.astype(np.int64),
        patch_size=int(attrs["patch_size"]),
        patch_level=int(attrs["patch_level"]),
        attrs=attrs,
        path=str(path),
    )


def _attr_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.shape == ():
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def coords_path(h5_dir: str | os.PathLike, slide_id: str) -> Path:
    """CLAM's layout: ``<h5_dir>/patches/<slide_id>.h5`` (create_patches_fp.py's save_dir)."""
    return Path(h5_dir) / "patches" / f"{slide_id}.h5"


# ----------------------------------------------------------------------------- features


def feature_paths(feat_dir: str | os.PathLike, slide_id: str) -> tuple[Path, Path]:
    feat_dir = Path(feat_dir)
    return feat_dir / "h5_files" / f"{slide_id}.h5", feat_dir / "pt_files" / f"{slide_id}.pt"


def features_done(feat_dir: str | os.PathLike, slide_id: str) -> bool:
    """Both outputs exist under their final names (written atomically, so they are complete)."""
    h5_path, pt_path = feature_paths(feat_dir, slide_id)
    return h5_path.is_file() and pt_path.is_file()


def write_features(
    feat_dir: str | os.PathLike,
    slide_id: str,
    features: np.ndarray,
    coords: np.ndarray,
    attrs: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write CLAM's ``h5_files/<id>.h5`` (features + coords) and ``pt_files/<id>.pt``.

    The .pt is written last: CLAM treats an existing .pt as "slide done".
    """
    import h5py
    import torch

    features = np.asarray(features, dtype=np.float32)
    coords = np.asarray(coords).reshape(-1, 2)
    if len(coords) and coords.max() > np.iinfo(np.int32).max:
        raise ClamFormatError(slide_id, "coords do not fit int32")
    coords = coords.astype(np.int32)  # CLAM's extract_features_fp.py stores int32 coords
    if features.ndim != 2 or len(features) != len(coords):
        raise ClamFormatError(
            slide_id,
            f"features {features.shape} and coords {coords.shape} do not match row for row",
        )
    if not np.isfinite(features).all():
        raise ClamFormatError(slide_id, "features contain NaN or Inf")
    h5_path, pt_path = feature_paths(feat_dir, slide_id)
    with atomic_path(h5_path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            f.create_dataset("coords", data=coords)
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
    with atomic_path(pt_path) as tmp:
        torch.save(torch.from_numpy(features), tmp)
    return h5_path, pt_path


def read_features(
    path_or_dir: str | os.PathLike, slide_id: str | None = None, with_coords: bool = False
):
    """Read one slide's features as a float32 numpy array (N, D), optionally with coords.

    Accepts a feature directory + slide id (pt preferred, h5 fallback), or a direct .pt/.h5 path.
    """
    import h5py

    if slide_id is not None:
        h5_path, pt_path = feature_paths(path_or_dir, slide_id)
        path = h5_path if (with_coords or not pt_path.is_file()) and h5_path.is_file() else pt_path
    else:
        path = Path(path_or_dir)
    if not path.is_file():
        raise ClamFormatError(path, "feature file does not exist")
    coords = None
    if path.suffix == ".pt":
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt files
            raise ClamFormatError(path, f"not a readable torch file ({err})") from err
        if not isinstance(obj, torch.Tensor):
            raise ClamFormatError(path, f"expected a tensor, got {type(obj).__name__}")
        feats = obj.float().numpy()
    else:
        try:
            with h5py.File(path, "r") as f:
                if "features" not in f:
                    raise ClamFormatError(
                        path, f"no 'features' dataset (found: {sorted(f.keys())})"
                    )
                feats = np.asarray(f["features"][:], dtype=np.float32)
                if "coords" in f:
                    coords = np.asarray(f["coords"][:])
        except ClamFormatError:
            raise
        except OSError as err:
            raise ClamFormatError(path, f"not a readable HDF5 file ({err})") from err
        if coords is not None and len(coords) != len(feats):
            raise ClamFormatError(path, f"{len(feats)} feature rows but {len(coords)} coords rows")
    if feats.ndim != 2:
        raise ClamFormatError(path, f"features must be 2-D (N, D), got shape {feats.shape}")
    if len(feats) == 0:
        raise ClamFormatError(path, "empty bag: 0 feature rows")
    if not np.isfinite(feats).all():
        raise ClamFormatError(path, "features contain NaN or Inf")
    if with_coords:
        if coords is None:
            raise ClamFormatError(path, "no 'coords' dataset next to the features")
        return feats, coords
    return feats


# ----------------------------------------------------------------------------- dataset CSV


def read_dataset_csv(
    path: str | os.PathLike,
    require_label: bool = True,
    label_dict: Mapping[str, int] | None = None,
):
    """Read CLAM's dataset CSV (``case_id, slide_id, label``) as a pandas DataFrame.

    Slide ids may carry an extension (``a.svs``); it is stripped. A missing ``case_id`` column
    defaults to the slide id (one case per slide). Labels stay strings unless `label_dict` is
    given, in which case a ``label_index`` column is added and unknown labels are an error.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ClamFormatError(path, "dataset CSV does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:  # noqa: BLE001
        raise ClamFormatError(path, f"not a readable CSV ({err})") from err
    df.columns = [c.strip() for c in df.columns]
    if "slide_id" not in df.columns:
        raise ClamFormatError(path, f"no 'slide_id' column (columns: {list(df.columns)})")
    df["slide_id"] = [slide_id_of(s.strip()) for s in df["slide_id"]]
    if (df["slide_id"] == "").any():
        raise ClamFormatError(path, "empty slide_id")
    dup = df["slide_id"][df["slide_id"].duplicated()].tolist()
    if dup:
        raise ClamFormatError(path, f"duplicated slide_id {dup[:3]}")
    if "case_id" not in df.columns:
        df["case_id"] = df["slide_id"]
    if require_label:
        if "label" not in df.columns:
            raise ClamFormatError(path, f"no 'label' column (columns: {list(df.columns)})")
        df["label"] = df["label"].str.strip()
        if (df["label"] == "").any():
            missing = df["slide_id"][df["label"] == ""].tolist()
            raise ClamFormatError(path, f"empty label for slide(s) {missing[:3]}")
        if label_dict is not None:
            unknown = sorted(set(df["label"]) - set(label_dict))
            if unknown:
                raise ClamFormatError(
                    path, f"label(s) {unknown} not in the label dict {dict(label_dict)}"
                )
            df["label_index"] = [int(label_dict[v]) for v in df["label"]]
    cols = ["case_id", "slide_id"] + (["label"] if "label" in df.columns else [])
    return df[cols + [c for c in df.columns if c not in cols]].reset_index(drop=True)


def write_dataset_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    import pandas as pd

    df = pd.DataFrame(list(rows))
    for col in ("case_id", "slide_id", "label"):
        if col not in df.columns:
            raise ValueError(f"dataset rows need a '{col}' field")
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def default_label_dict(labels: Sequence[str]) -> dict[str, int]:
    """Sorted unique labels -> 0..C-1 (what a user gets without --label-dict)."""
    return {lab: i for i, lab in enumerate(sorted(set(labels)))}


# ----------------------------------------------------------------------------- splits


def split_paths(split_dir: str | os.PathLike, k: int) -> tuple[Path, Path, Path]:
    split_dir = Path(split_dir)
    return (
        split_dir / f"splits_{k}.csv",
        split_dir / f"splits_{k}_bool.csv",
        split_dir / f"splits_{k}_descriptor.csv",
    )


def write_splits(
    split_dir: str | os.PathLike,
    k: int,
    splits: Mapping[str, Sequence[str]],
    labels: Mapping[str, str],
    label_dict: Mapping[str, int],
) -> tuple[Path, Path, Path]:
    """Write one fold exactly as CLAM's ``save_splits`` does (three CSVs, pandas index kept)."""
    import pandas as pd

    keys = ["train", "val", "test"]
    for key in keys:
        if key not in splits:
            raise ValueError(f"splits need a '{key}' list")
    main_path, bool_path, desc_path = split_paths(split_dir, k)
    series = [pd.Series(list(splits[key]), dtype=object) for key in keys]
    df = pd.concat(series, ignore_index=True, axis=1)
    df.columns = keys
    all_ids = [s for key in keys for s in splits[key]]
    bool_array = np.zeros((len(all_ids), 3), dtype=bool)
    start = 0
    for j, key in enumerate(keys):
        n = len(splits[key])
        bool_array[start : start + n, j] = True
        start += n
    bool_df = pd.DataFrame(bool_array, index=all_ids, columns=keys)
    classes = sorted(label_dict, key=lambda c: label_dict[c])
    counts = {
        key: [sum(1 for s in splits[key] if labels[s] == cls) for cls in classes] for key in keys
    }
    desc_df = pd.DataFrame(counts, index=classes, columns=keys)
    for frame, path in ((df, main_path), (bool_df, bool_path), (desc_df, desc_path)):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp)
    return main_path, bool_path, desc_path


def read_splits(split_dir: str | os.PathLike, k: int) -> dict[str, list[str]]:
    """Read ``splits_<k>.csv`` (ours or CLAM's ``create_splits_seq.py``) as CLAM does."""
    import pandas as pd

    path = split_paths(split_dir, k)[0]
    if not path.is_file():
        raise ClamFormatError(path, "split file does not exist")
    try:
        df = pd.read_csv(path, dtype=str)
    except Exception as err:  # noqa: BLE001
        raise ClamFormatError(path, f"not a readable CSV ({err})") from err
    missing = [key for key in ("train", "val", "test") if key not in df.columns]
    if missing:
        raise ClamFormatError(path, f"missing split column(s) {missing}")
    out = {
        key: [slide_id_of(s) for s in df[key].dropna().tolist()] for key in ("train", "val", "test")
    }
    seen: dict[str, str] = {}
    for key, ids in out.items():
        for s in ids:
            if s in seen:
                raise ClamFormatError(path, f"slide '{s}' is in both '{seen[s]}' and '{key}'")
            seen[s] = key
    return out


# ----------------------------------------------------------------------------- results


SUMMARY_COLUMNS = ("folds", "test_auc", "val_auc", "test_acc", "val_acc")
SUMMARY_NAME = "summary.csv"


def fold_checkpoint_path(results_dir: str | os.PathLike, fold: int) -> Path:
    """CLAM's ``s_<k>_checkpoint.pt``: one fold's MIL model weights."""
    return Path(results_dir) / f"s_{int(fold)}_checkpoint.pt"


def fold_results_path(results_dir: str | os.PathLike, fold: int) -> Path:
    """CLAM's ``split_<k>_results.pkl``: one fold's per-slide test probabilities."""
    return Path(results_dir) / f"split_{int(fold)}_results.pkl"


def write_summary(
    results_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]], name: str = SUMMARY_NAME
) -> Path:
    """CLAM's ``summary.csv`` (pandas index kept, as CLAM's main.py writes it)."""
    import pandas as pd

    df = pd.DataFrame(
        [{c: row[c] for c in SUMMARY_COLUMNS} for row in rows], columns=list(SUMMARY_COLUMNS)
    )
    path = Path(results_dir) / name
    with atomic_path(path) as tmp:
        df.to_csv(tmp)
    return path


def read_summary(path: str | os.PathLike):
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ClamFormatError(path, "summary file does not exist")
    df = pd.read_csv(path)
    missing = [c for c in SUMMARY_COLUMNS if c not in df.columns]
    if missing:
        raise ClamFormatError(path, f"missing column(s) {missing}")
    return df


def write_pkl(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f)
    return Path(path)


def read_pkl(path: str | os.PathLike) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)
