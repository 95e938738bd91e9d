"""Did the *student* move towards the teacher? Ridge probes of its features, before and after.

The pretext R² of validation cannot say it: the context predictor alone can fit the pretext on
frozen student features. These probes read the student's own feature of each validation patch
(every position of the window, encoded alone, as at extraction) and ask how much of
(a) the teacher's feature of the same patch and (b) the mean teacher feature of the patch's
window neighbours a linear map recovers, on held-out validation data. A student that learnt
from the teacher raises (a); one that learnt context raises (b).

Streamed and DDP-exact: each rank adds sufficient statistics (X'X, X'Y, Y'Y, sums, counts) of
its windows to two folds, one all-reduce sums them, and the ridge fits and their held-out R²
follow in closed form. Folds are validation slides (by parity; by window when they come from
one slide), so a probe is never scored on the slide it was fitted on. Targets are standardised
with the teacher's training statistics, the student's features with their pooled validation
mean and std (a scale change of the student alone does not move R²); the ridge penalty is
``alpha`` times the fold's patch count (standardised features: ``alpha`` = 1 shrinks a direction
of unit variance by half).
"""

from __future__ import annotations

import numpy as np
import torch

from ..distributed import DistInfo, all_reduce_flat_
from ..encoders.forward import autocast, model_input, to_device

PROBES = ("teacher", "context")  # (a) the patch's own teacher feature, (b) its neighbours' mean
N_FOLDS = 2


def probe_folds(dataset) -> np.ndarray:
    """Fold (0/1) of every validation window: its slide's parity among the validation slides,
    or the window's parity when every window comes from one slide."""
    slides = np.array([ref.slide for ref in dataset.refs])
    ranks = {s: i for i, s in enumerate(sorted(set(slides.tolist())))}
    if len(ranks) >= N_FOLDS:
        return np.array([ranks[s] % N_FOLDS for s in slides.tolist()])
    return np.arange(len(slides)) % N_FOLDS


@torch.no_grad()
def probe_sums(
    student, student_tf, standardizer, dataset, device: str, precision: str, batch_size: int,
    info: DistInfo,
) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """Per fold: the sufficient statistics of [x, 1] (student features, augmented) against
    both probe targets, summed over this rank's windows and then over all ranks."""
    student.eval()  # the caller restores its mode (student_probes)
    folds = probe_folds(dataset)
    idx = np.arange(len(dataset))[info.rank :: info.world_size]
    # every rank, windows or none, adds into sums of the same shapes and joins the all-reduce
    x_dim, y_dim = int(student.out_dim), int(standardizer.mean.numel())
    acc = [_zero_sums(x_dim, y_dim, device) for _ in range(N_FOLDS)]
    for start in range(0, len(idx), max(1, batch_size)):
        ix = idx[start : start + batch_size]
        batch = torch.utils.data.default_collate([dataset[int(i)] for i in ix])
        feats = _student_features(student, student_tf, batch["patches"], device, precision)
        z = standardizer.forward(to_device(batch["teacher"], device).float()).double()
        targets = {"teacher": z, "context": _neighbour_mean(z)}
        for f in range(N_FOLDS):
            keep = torch.from_numpy(folds[ix] == f).to(device)
            if bool(keep.any()):
                _add(acc[f], feats[keep], {k: t[keep] for k, t in targets.items()})
    all_reduce_flat_([t for fold in acc for t in fold.values()], info)  # in place
    return acc


def _student_features(student, student_tf, patches, device: str, precision: str):
    """(B, g^2, Ds) float64: the student on every patch of each window, each alone."""
    b, n_pos = patches.shape[:2]
    flat = to_device(patches.reshape(-1, *patches.shape[2:]), device)
    with autocast(device, precision):
        feats = student(model_input(flat, student_tf, device))
    return feats.double().reshape(b, n_pos, -1)


def _neighbour_mean(z: torch.Tensor) -> torch.Tensor:
    """(B, g^2, D): at each position, the mean of the other positions of its window."""
    n = z.shape[1]
    return (z.sum(dim=1, keepdim=True) - z) / (n - 1)


def _zero_sums(x_dim: int, y_dim: int, device) -> dict[str, torch.Tensor]:
    def zeros(*shape):
        return torch.zeros(shape, dtype=torch.float64, device=device)

    sums = {"xx": zeros(x_dim + 1, x_dim + 1)}
    for key in PROBES:
        sums.update({f"xy_{key}": zeros(x_dim + 1, y_dim), f"yy_{key}": zeros(),
                     f"y_{key}": zeros(y_dim)})  # fmt: skip
    return sums


def _add(sums: dict, feats: torch.Tensor, targets: dict[str, torch.Tensor]) -> None:
    x = feats.reshape(-1, feats.shape[-1])
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
    sums["xx"] += x.T @ x
    for key, t in targets.items():
        y = t.reshape(-1, t.shape[-1])
        sums[f"xy_{key}"] += x.T @ y
        sums[f"yy_{key}"] += (y * y).sum()
        sums[f"y_{key}"] += y.sum(0)


def probe_r2(folds: list[dict[str, torch.Tensor]], alpha: float = 1.0) -> dict[str, float]:
    """Held-out R² of each probe: fit on one fold, score on the other, pooled over both
    directions (1 - sum SSE / sum SST; SST about the scored fold's own mean, so predicting any
    constant scores <= 0). NaN when a fold has fewer than 2 patches."""
    n = [float(f["xx"][-1, -1]) for f in folds]
    if min(n) < 2:
        return {key: float("nan") for key in PROBES}
    xx_all = sum(f["xx"] for f in folds)
    scale = _standardiser(xx_all)
    out = {}
    for key in PROBES:
        sse = sst = 0.0
        for fit, test in ((0, 1), (1, 0)):
            a_fit = scale @ folds[fit]["xx"] @ scale.T
            b_fit = scale @ folds[fit][f"xy_{key}"]
            penalty = torch.eye(len(a_fit), dtype=a_fit.dtype, device=a_fit.device)
            penalty[-1, -1] = 0.0  # the intercept is not shrunk
            w = torch.linalg.solve(a_fit + alpha * n[fit] * penalty, b_fit)
            a_test = scale @ folds[test]["xx"] @ scale.T
            b_test = scale @ folds[test][f"xy_{key}"]
            yy, y_sum = folds[test][f"yy_{key}"], folds[test][f"y_{key}"]
            sse += float(yy - 2 * (w * b_test).sum() + (w * (a_test @ w)).sum())
            sst += float(yy - (y_sum @ y_sum) / n[test])
        out[key] = 1.0 - sse / sst if sst > 0 else float("nan")
    return out


def _standardiser(xx: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The affine map [x, 1] -> [(x - mean) / std, 1] as a matrix, from pooled X'X of [x, 1]."""
    n = xx[-1, -1]
    mean = xx[-1, :-1] / n
    var = (torch.diagonal(xx)[:-1] / n - mean**2).clamp_min(0.0)
    std = var.sqrt().clamp_min(eps * max(float(var.max().sqrt()), eps))
    scale = torch.eye(len(xx), dtype=xx.dtype, device=xx.device)
    scale[:-1, :-1] = torch.diag(1.0 / std)
    scale[:-1, -1] = -mean / std
    return scale


def student_probes(
    learner, dataset, cfg, device: str, info: DistInfo
) -> dict[str, float]:  # fmt: skip
    """``{"teacher": R², "context": R²}`` of the learner's student on the validation windows;
    the student's mode (train, BatchNorm frozen or not) is as it was afterwards."""
    from .steps import set_student_mode

    was_training = learner.student.training
    folds = probe_sums(
        learner.student, learner.student_tf, learner.standardizer, dataset, device,
        cfg.precision, cfg.batch_size, info,
    )  # fmt: skip
    if was_training:
        set_student_mode(learner.student, cfg.freeze_bn)
    return probe_r2(folds, cfg.probe_alpha)
