"""What a MIL run writes per fold, and the numbers in it; every file name is spelled here.

CLAM's own files (``s_<k>_checkpoint.pt``, ``split_<k>_results.pkl``, ``summary.csv``) come from
:mod:`clam_mcmkd.clam.formats`; ours sit next to them: ``fold_<k>_metrics.json`` (so a resumed
run need not re-evaluate), ``fold_<k>_predictions.csv`` (for ROC curves), ``s_<k>_feature_norm.npz``
(``--feature-norm zscore``) and the run's config.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..clam import formats
from ..utils import ClamMcmkdError, atomic_path, atomic_write_text

TRAIN_CONFIG_NAME = "train_config.json"
EVAL_CONFIG_NAME = "eval_config.json"
checkpoint_path = formats.fold_checkpoint_path
results_path = formats.fold_results_path


def metrics_path(run_dir: Path, fold: int) -> Path:
    return Path(run_dir) / f"fold_{fold}_metrics.json"


def predictions_path(run_dir: Path, fold: int) -> Path:
    return Path(run_dir) / f"fold_{fold}_predictions.csv"


def feature_norm_path(run_dir: str | Path, fold: int) -> Path:
    """``train --feature-norm zscore``'s statistics of one fold (beside its checkpoint)."""
    return Path(run_dir) / f"s_{fold}_feature_norm.npz"


RUN_NORM_NAME = "feature_norm.npz"  # one set of statistics for every fold (user-supplied)


def summary_name(folds: Sequence[int], k: int) -> str:
    if len(folds) == k:
        return formats.SUMMARY_NAME
    return f"summary_partial_{folds[0]}_{folds[-1] + 1}.csv"


def fold_done(run_dir: Path, fold: int) -> bool:
    """A fold whose checkpoint and results pkl both exist is finished (written atomically)."""
    return checkpoint_path(run_dir, fold).is_file() and results_path(run_dir, fold).is_file()


@dataclass
class SetResult:
    """One pass over a set of bags: per-slide probabilities and CLAM's summary numbers."""

    slide_ids: list[str]
    labels: np.ndarray  # (n,) int
    probs: np.ndarray  # (n, C)
    loss: float = float("nan")

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def acc(self) -> float:
        return float((self.preds == self.labels).mean()) if len(self.labels) else float("nan")

    @property
    def auc(self) -> float:
        return bag_auc(self.labels, self.probs)

    def patient_results(self) -> dict:
        """CLAM's ``split_<k>_results.pkl`` dict."""
        return {
            s: {
                "slide_id": np.array(s),
                "prob": self.probs[i : i + 1].astype(np.float32),
                "label": int(y),
            }
            for i, (s, y) in enumerate(zip(self.slide_ids, self.labels))
        }


def bag_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """CLAM's AUC; NaN where it is undefined (a set with one class), where CLAM would crash."""
    from sklearn.metrics import auc, roc_auc_score, roc_curve

    labels = np.asarray(labels)
    n_classes = probs.shape[1]
    if len(np.unique(labels)) < 2:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    aucs = []
    for c in range(n_classes):
        if c in labels:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fpr, tpr, _ = roc_curve(labels == c, probs[:, c])
            aucs.append(auc(fpr, tpr))
        else:
            aucs.append(float("nan"))
    return float(np.nanmean(aucs))


def write_predictions(path: Path, result: SetResult, class_names: Mapping[int, str]) -> Path:
    """Per-slide probabilities for ROC curves (CLAM's eval ``fold_<k>.csv`` columns + label)."""
    import pandas as pd

    df = pd.DataFrame(
        {
            "slide_id": result.slide_ids,
            "label": [class_names[int(y)] for y in result.labels],
            "Y": result.labels,
            "Y_hat": result.preds,
        }
    )
    for c in range(result.probs.shape[1]):
        df[f"p_{c}"] = result.probs[:, c]
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def fold_row(fold: int, test: SetResult, val: SetResult | None) -> dict:
    """One row of CLAM's summary.csv."""
    nan = float("nan")
    return {
        "folds": fold,
        "test_auc": test.auc,
        "val_auc": val.auc if val is not None else nan,
        "test_acc": test.acc,
        "val_acc": val.acc if val is not None else nan,
    }


def write_fold_outputs(run_dir: Path, fold: int, row: dict, test: SetResult, class_names):
    write_predictions(predictions_path(run_dir, fold), test, class_names)
    atomic_write_text(metrics_path(run_dir, fold), json.dumps(row, indent=2) + "\n")
    formats.write_pkl(results_path(run_dir, fold), test.patient_results())  # last


def saved_metrics(run_dir: Path, fold: int) -> dict | None:
    """A finished fold's metrics JSON, or None (folds trained by CLAM's main.py have none)."""
    path = metrics_path(run_dir, fold)
    return json.loads(path.read_text()) if path.is_file() else None


def run_config(models_dir: Path) -> dict:
    """A train run's saved config, or {} (a run of CLAM's own main.py has none)."""
    path = Path(models_dir) / TRAIN_CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ClamMcmkdError(f"{path}: not a readable train config ({err}); train again") from None
    if not isinstance(config, dict):
        raise ClamMcmkdError(f"{path}: not a train config (a JSON object); train again")
    return config
