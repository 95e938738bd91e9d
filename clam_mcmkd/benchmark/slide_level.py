"""The report's numbers at the slide level, from CLAM results directories.

1. Every test slide gets ONE probability per (MIL model, arm): the mean over the folds and MIL
   seeds in which it was a test slide (with a fixed test set, every fold; with k-fold test
   sets, the folds that held it out). Folds and seeds are training noise; slides are the sample.
2. Test AUC of those probabilities; for each pair of arms, ΔAUC on the slides both predicted,
   DeLong's p for correlated AUCs and a paired, label-stratified bootstrap CI
   (:mod:`.stats`; 2000 resamples and a fixed seed by default, so a rerun writes the same).

Inputs are ``split_<k>_results.pkl`` files ({slide_id: {prob, label}}, what CLAM's ``main.py``
and ``clam-mcmkd train`` both write), so runs of either can be compared.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..clam.formats import (
    SUMMARY_NAME,
    ClamFormatError,
    fold_results_path,
    read_pkl,
    read_summary,
)
from ..mil.results import bag_auc, run_config
from . import stats


@dataclass(frozen=True)
class ResultRun:
    """One MIL model trained on one arm's features (one MIL seed): where its results live.

    `encoder` is the report's name for what extracted the features; `arm` the arm's id
    (default: the encoder name); runs of one (arm, model) with several seeds are averaged."""

    encoder: str
    model: str
    results_dir: Path
    arm: str | None = None
    mil_seed: int | None = None

    @property
    def key(self) -> str:
        return self.arm or self.encoder

    @property
    def feature_norm(self) -> str:
        """What the run fed its MIL model (its saved config; CLAM's main.py: raw features)."""
        return str(run_config(Path(self.results_dir)).get("feature_norm", "none"))


def read_fold_predictions(results_dir: str | os.PathLike, fold: int) -> list[tuple]:
    """(slide_id, label, probabilities) per test slide of one fold's ``split_<k>_results.pkl``."""
    path = fold_results_path(results_dir, fold)
    if not path.is_file():
        raise ClamFormatError(path, "per-fold predictions file does not exist")
    try:
        results = read_pkl(path)
    except Exception as err:  # noqa: BLE001 - pickle raises many types
        raise ClamFormatError(path, f"not a readable pickle ({err})") from err
    if not isinstance(results, Mapping):
        raise ClamFormatError(
            path, f"expected {{slide_id: {{prob, label}}}}, got {type(results).__name__}"
        )
    rows = []
    for slide_id, rec in results.items():
        try:
            prob = np.asarray(rec["prob"], dtype=float).reshape(-1)
            label = int(np.asarray(rec["label"]).reshape(-1)[0])
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise ClamFormatError(
                path, f"slide {slide_id!r}: no usable 'prob'/'label' ({err})"
            ) from err
        rows.append((str(slide_id), label, prob))
    return rows


def collect_predictions(runs: Sequence[ResultRun]):
    """Long table: model, arm, mil_seed, fold, slide_id, label, p_0 .. p_{C-1}, for the folds
    each run's ``summary.csv`` lists."""
    import pandas as pd

    rows, widths = [], set()
    for run in runs:
        for fold in read_summary(Path(run.results_dir) / SUMMARY_NAME)["folds"].astype(int):
            for slide_id, label, prob in read_fold_predictions(run.results_dir, int(fold)):
                rec = {"model": run.model, "arm": run.key, "mil_seed": run.mil_seed,
                       "fold": int(fold), "slide_id": slide_id, "label": label}  # fmt: skip
                rec.update({f"p_{c}": float(p) for c, p in enumerate(prob)})
                rows.append(rec)
                widths.add(len(prob))
    if len(widths) > 1:
        raise ClamFormatError(
            runs[0].results_dir, f"predictions have differing class counts {sorted(widths)}"
        )
    return pd.DataFrame(rows)


def average_over_runs(preds):
    """One row per (model, arm, slide): each class probability averaged over folds and seeds."""
    classes = [c for c in preds.columns if c.startswith("p_")]
    out = None
    for c in classes:
        avg = stats.average_slide_probabilities(preds, keys=["model", "arm"], prob_col=c)
        out = avg if out is None else out.merge(avg[["model", "arm", "slide_id", c]])
    return out[["model", "arm", "slide_id", "label", *classes, "n_runs"]]


def slide_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """CLAM's AUC (:func:`~clam_mcmkd.mil.results.bag_auc`: class 1's with two classes, the
    one-vs-rest mean otherwise); NaN where a class has no slide."""
    labels = np.asarray(labels, dtype=int)
    if len(np.unique(labels)) < max(2, probs.shape[1]):
        return math.nan
    return bag_auc(labels, probs)


def _arrays(avg, model: str, arm: str):
    sel = avg[(avg["model"] == model) & (avg["arm"] == arm)].set_index("slide_id")
    return sel["label"].to_numpy(int), sel[
        [c for c in sel.columns if c.startswith("p_")]
    ].to_numpy()


def arm_row(avg, model: str, arm: str) -> dict:
    """Slide-level test AUC and accuracy of one (model, arm)."""
    labels, probs = _arrays(avg, model, arm)
    acc = float((probs.argmax(axis=1) == labels).mean()) if len(labels) else math.nan
    return {"n_test_slides": len(labels), "test_auc": slide_auc(labels, probs), "test_acc": acc}


@dataclass(frozen=True)
class Comparison:
    delta_auc: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    p_delong: float = math.nan
    n_test_slides: int = 0


def compare(avg, model: str, arm_a: str, arm_b: str, settings) -> Comparison:
    """ΔAUC(a − b) on the test slides both arms predicted: DeLong p and the paired stratified
    bootstrap CI (`settings`: n_resamples, confidence, seed). NaN where undefined (more than
    two classes; a class with no slide)."""
    a = avg[(avg["model"] == model) & (avg["arm"] == arm_a)].set_index("slide_id")
    b = avg[(avg["model"] == model) & (avg["arm"] == arm_b)].set_index("slide_id")
    common = a.index.intersection(b.index)
    a, b = a.loc[common], b.loc[common]
    y = a["label"].to_numpy(int)
    if "p_2" in a.columns or len(np.unique(y)) < 2:
        return Comparison(n_test_slides=len(common))
    pa, pb = a["p_1"].to_numpy(), b["p_1"].to_numpy()
    delong = stats.delong_test(y, pa, pb)
    boot = stats.paired_bootstrap_delta_auc(
        y, pa, pb, n_resamples=settings.n_resamples, seed=settings.seed,
        confidence=settings.confidence,
    )  # fmt: skip
    return Comparison(delong.delta, boot.ci_low, boot.ci_high, delong.p, len(common))


def roc_curve_points(avg, model: str, arm: str):
    """(fpr, tpr) of the averaged predictions (class 1; micro one-vs-rest for more classes)."""
    from sklearn.metrics import roc_curve

    labels, probs = _arrays(avg, model, arm)
    if len(np.unique(labels)) < 2:
        return None
    if probs.shape[1] == 2:
        y, score = labels == 1, probs[:, 1]
    else:
        y = (labels[:, None] == np.arange(probs.shape[1])[None, :]).ravel()
        score = probs.ravel()
    fpr, tpr, _ = roc_curve(y, score)
    return fpr, tpr
