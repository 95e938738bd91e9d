"""Pretext metrics: how well the fine-tuner predicts teacher features, against predicting the mean.

A raw cosine flatters a constant guess when every teacher feature shares a large common
component, so validation also reports R² and the cosine of standardised features, where the
predict-the-mean baseline scores exactly 0. numpy only (used by the trainer and the benchmark).
"""

from __future__ import annotations

import numpy as np


def pretext_scores(pred, target, reference=None, eps: float = 1e-6) -> dict[str, float]:
    """How well masked-patch predictions match the teacher, against predicting the mean.

    `pred`, `target`: (N, D) predicted and true teacher features of masked patches;
    `reference`: (M, D) teacher features whose mean and per-dimension std standardise both
    (the training split's targets; default: `target`). Raw cosine flatters a constant guess
    when all features share a large common component (the mean feature alone scored 0.93-0.99
    before), so the scores are taken on standardised features:

    - ``r2``: 1 - SSE / SST summed over dimensions (variance-weighted R²). Predicting the mean
      of the evaluated targets scores exactly 0, any constant scores <= 0.
    - ``r2_mean_baseline``: R² of predicting the reference mean (0 when reference = target).
    - ``cos_std``: mean cosine of standardised prediction and target (a constant = the
      reference mean scores 0: the zero vector, counted as cosine 0).
    - ``cos_raw`` and ``cos_raw_mean_baseline``: the raw cosine and the same for the mean
      reference feature, to show how much of the raw number a constant already gets.
    """
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    ref = target if reference is None else np.asarray(reference, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 2 or ref.ndim != 2:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must be the same (N, D)")
    if ref.shape[1] != target.shape[1] or len(target) < 2:
        raise ValueError("need >= 2 targets and a reference of the same width")
    mu, sd = ref.mean(axis=0), ref.std(axis=0)
    sd = np.maximum(sd, eps * max(float(sd.max()), eps))  # dead dimensions do not blow up
    zt, zp = (target - mu) / sd, (pred - mu) / sd
    sst = float(((zt - zt.mean(axis=0)) ** 2).sum())
    return {
        "r2": 1.0 - float(((zp - zt) ** 2).sum()) / sst,
        "r2_mean_baseline": 1.0 - float((zt**2).sum()) / sst,
        "cos_std": float(np.mean(rowwise_cosine(zp, zt))),
        "cos_raw": float(np.mean(rowwise_cosine(pred, target))),
        "cos_raw_mean_baseline": float(np.mean(rowwise_cosine(mu[None, :], target))),
        "n": int(len(target)),
    }


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.broadcast_to(a, b.shape)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = na * nb
    out = np.zeros(len(b))
    ok = denom > 0
    out[ok] = (a[ok] * b[ok]).sum(axis=1) / denom[ok]
    return out


def pretext_sums(zp, zt, weight=None):
    """Sums (float64 tensor) from which :func:`scores_from_sums` gives ``r2``,
    ``r2_mean_baseline`` and ``cos_std`` of :func:`pretext_scores`, for predictions `zp` and
    targets `zt` (..., D) already standardised with the reference statistics; `weight` (...,)
    0/1 selects the scored positions (masked patches) without boolean indexing. Sums of batches
    and of ranks add up (one all-reduce), so validation streams and shards exactly."""
    import torch

    zp, zt = zp.double().reshape(-1, zp.shape[-1]), zt.double().reshape(-1, zt.shape[-1])
    w = torch.ones(len(zt), dtype=torch.float64, device=zt.device)
    if weight is not None:
        w = weight.reshape(-1).to(torch.float64)
    cos = torch.nn.functional.cosine_similarity(zp, zt, dim=-1, eps=1e-12)  # zero vector: 0
    head = torch.stack(
        [
            (w * ((zp - zt) ** 2).sum(-1)).sum(),
            (w * (zt**2).sum(-1)).sum(),
            w.sum(),
            (w * cos).sum(),
        ]
    )
    return torch.cat([head, (w[:, None] * zt).sum(0)])


def scores_from_sums(sums) -> dict[str, float]:
    """``r2``, ``r2_mean_baseline`` (predicting the reference mean, the zero vector) and
    ``cos_std`` from summed :func:`pretext_sums`."""
    sums = [float(v) for v in sums]
    sse, ssq, n, cos = sums[:4]
    s1 = np.asarray(sums[4:])
    if n < 2:
        return {"r2": float("nan"), "r2_mean_baseline": float("nan"), "cos_std": float("nan")}
    sst = ssq - float((s1**2).sum()) / n
    return {"r2": 1.0 - sse / sst, "r2_mean_baseline": 1.0 - ssq / sst, "cos_std": cos / n}
