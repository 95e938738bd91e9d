"""``train --feature-norm``: per-dimension standardisation of MIL inputs, fitted per fold.

Why: features from weak or random encoders share one large common component (cosine to the
mean feature 0.9-0.998), and ABMIL on raw features then succeeds or fails by their scale, not
their content. ``zscore`` subtracts the mean and divides by the std of every dimension, both
taken over the patches of the fold's TRAINING slides only (validation and test slides never
inform them). The statistics are written beside the fold's checkpoint as
``s_<k>_feature_norm.npz`` (CLAM's checkpoint stays a plain state dict CLAM can load), and
:func:`load_feature_norm` is the one reader, used by ``eval``, ``heatmap`` and resumed runs.
The default ``none`` is CLAM's: raw features.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..utils import ClamMcmkdError, atomic_path
from .config import FEATURE_NORMS
from .results import RUN_NORM_NAME, feature_norm_path, run_config

__all__ = [
    "FEATURE_NORMS",
    "FeatureNorm",
    "NormalizedBags",
    "fit_feature_norm",
    "load_feature_norm",
]
STD_EPS = 1e-6  # added to every std: a constant dimension maps to 0, not to inf


class FeatureNorm:
    """``(features - mean) / std`` for numpy arrays and torch tensors (on any device)."""

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self._torch: dict = {}

    def __call__(self, feats):
        if isinstance(feats, np.ndarray):
            return (feats - self.mean) / self.std
        key = (feats.device, feats.dtype)
        if key not in self._torch:
            import torch

            self._torch[key] = tuple(
                torch.from_numpy(a).to(device=feats.device, dtype=feats.dtype)
                for a in (self.mean, self.std)
            )
        mean, std = self._torch[key]
        return (feats - mean) / std

    def save(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, mean=self.mean, std=self.std)
        return Path(path)


def fit_feature_norm(bags: Iterable) -> FeatureNorm:
    """Mean and std per dimension over every patch of `bags` (arrays or tensors, N_i x D),
    accumulated in float64 in one pass (sums and sums of squares, centred per bag)."""
    n, total, total_sq = 0, None, None
    shift = None
    for bag in bags:
        x = np.asarray(bag.cpu().numpy() if hasattr(bag, "cpu") else bag, dtype=np.float64)
        if shift is None:
            shift = x.mean(axis=0)  # a shift keeps the sums of squares well conditioned
            total, total_sq = np.zeros_like(shift), np.zeros_like(shift)
        d = x - shift
        n += len(x)
        total += d.sum(axis=0)
        total_sq += (d**2).sum(axis=0)
    if not n:
        raise ClamMcmkdError("feature standardisation needs at least one training patch")
    mean = total / n
    var = np.maximum(total_sq / n - mean**2, 0.0)
    return FeatureNorm(shift + mean, np.sqrt(var) + STD_EPS)


class NormalizedBags:
    """A bag store seen through a :class:`FeatureNorm` (what training and eval read)."""

    def __init__(self, store, norm: FeatureNorm | None):
        self.store, self.norm = store, norm

    def __getitem__(self, slide_id: str):
        feats = self.store[slide_id]
        return feats if self.norm is None else self.norm(feats)


def load_feature_norm(models_dir: str | Path, fold: int, error=ClamMcmkdError):
    """The standardisation a run's fold was trained with, or None for raw features.

    Reads ``s_<fold>_feature_norm.npz`` (what ``train`` writes per fold), else
    ``feature_norm.npz`` (one set for the run), arrays ``mean`` and ``std`` of width D. A run
    whose train_config says it standardised but has no statistics is an error, not a silent
    mismatch. `error`: the exception class raised (the caller's stage error).
    """
    run = Path(models_dir)
    for path in (feature_norm_path(run, fold), run / RUN_NORM_NAME):
        if path.is_file():
            with np.load(path) as stats:
                mean, std = stats["mean"], stats["std"]
            if mean.shape != std.shape or mean.ndim != 1 or not (std > 0).all():
                raise error(f"{path}: 'mean' and 'std' must be 1-D, same width, std > 0")
            return FeatureNorm(mean, std)
    norm = run_config(run).get("feature_norm")
    if norm not in (None, "", "none"):
        raise error(f"{run}: trained with feature_norm={norm!r} but no statistics file")
    return None
